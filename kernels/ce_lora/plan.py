"""What CE-LoRA's fast backward needs for one layer between two reselections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .naive import build_stack, pack_positions, pad_b0

TILE = 64  # the packed GEMM's inner size is rounded up to this (cuBLAS/Triton fast path)
MIN_DOT = 16  # smallest tensor-core dot width


def padded_rank(rank: int) -> int:
    """``rank`` rounded up to a multiple of 16: width of the low-rank block of ``G``."""
    return MIN_DOT * math.ceil(rank / MIN_DOT)


def kept_channels(out_features: int, ratio: float, rank: int) -> int | None:
    """Channels to keep: ``ceil(ratio * O)`` rounded up so that ``r_pad + k`` is a multiple of 64.

    Rounding up keeps extra channels for free (the GEMM runs full tiles anyway) and avoids the slow
    GEMM path of odd inner sizes. Returns ``None`` when the packed GEMM would be as large as the exact
    one (``r_pad + k >= O``): then the exact ``dY W`` is both cheaper and exact.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"CE-LoRA keep ratio must be in (0, 1], got {ratio}")
    r_pad = padded_rank(rank)
    keep = math.ceil(ratio * out_features)
    keep = TILE * math.ceil((r_pad + keep) / TILE) - r_pad
    return keep if r_pad + keep < out_features else None


@dataclass
class CEPlan:
    """Fast-backward operands of one layer (all on the weight's device, in the compute dtype).

    b0_pad ``[O, r_pad]``, stack ``[r_pad + k, I]`` (= ``[A0 ; R[S, :]]``), index ``[k]`` int64 sorted,
    pos ``[O]`` int32 (``G`` column of each output channel, -1 if dropped).
    """

    b0_pad: torch.Tensor
    stack: torch.Tensor
    index: torch.Tensor
    pos: torch.Tensor

    @property
    def keep(self) -> int:
        return self.index.numel()


def make_plan(
    weight: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, index: torch.Tensor, dtype: torch.dtype
) -> CEPlan:
    """Build a :class:`CEPlan` from the frozen weight ``[O, I]``, fp32 factors and the kept ``index``."""
    r_pad = padded_rank(b0.shape[1])
    return CEPlan(
        b0_pad=pad_b0(b0, r_pad, dtype),
        stack=build_stack(weight, b0, a0, index, r_pad, dtype),
        index=index,
        pos=pack_positions(index, weight.shape[0], r_pad),
    )
