"""What CE-LoRA's fast backward needs for one layer between two reselections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .naive import build_stack, pad_b0

TILE = 64  # the packed GEMM's inner size is rounded up to this (cuBLAS/Triton fast path)
MIN_DOT = 16  # smallest tensor-core dot width
KEPT_TILE = 64  # granularity of the packing kernel's kept-column tiles (its BLOCK_K is a multiple)
BOUND_UNIT = 16  # projection bounds are multiples of this, so the kernel's channel loads stay aligned


def padded_rank(rank: int) -> int:
    """``rank`` rounded up to a multiple of 16: width of the low-rank block of ``G``."""
    return MIN_DOT * math.ceil(rank / MIN_DOT)


def kept_channels(out_features: int, ratio: float, rank: int) -> int | None:
    """Channels to keep: ``ceil(ratio * O)`` rounded up so that ``r_pad + k`` is a multiple of 64.

    ``rank`` is the width of the low-rank block (SVD rank, plus the LoRA rank when LoRA's own input
    gradient rides along). Rounding up keeps extra channels for free (the GEMM runs full tiles anyway)
    and avoids the slow GEMM path of odd inner sizes. Returns ``None`` when the packed GEMM would be as
    large as the exact one (``r_pad + k >= O``): then the exact ``dY W`` is both cheaper and exact.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"CE-LoRA keep ratio must be in (0, 1], got {ratio}")
    r_pad = padded_rank(rank)
    keep = math.ceil(ratio * out_features)
    keep = TILE * math.ceil((r_pad + keep) / TILE) - r_pad
    return keep if r_pad + keep < out_features else None


def projection_bounds(index: torch.Tensor, out_features: int) -> torch.Tensor:
    """Which output channels the packing kernel projects onto ``B0`` alongside each kept-column tile.

    Kept sub-tile ``s`` (kept columns ``[64 s, 64 s + 64)``) gets channels ``[16 b[s], 16 b[s + 1])``: up to
    its last kept channel, rounded up to a multiple of :data:`BOUND_UNIT`, the last one to the end. The
    ranges partition ``[0, O)`` (each channel is projected exactly once) and each one holds the channels
    its tile gathers (but for at most 15 at its start, taken by the previous range when rounding up), so
    the gather re-reads what the projection has just loaded. Returns ``b`` (units of ``BOUND_UNIT``),
    int32 ``[cdiv(k, 64) + 1]``, for the sorted kept channels ``index [k]``.
    """
    n_sub = -(-index.numel() // KEPT_TILE)
    last = index[KEPT_TILE - 1 :: KEPT_TILE][: n_sub - 1]  # last kept channel of every sub-tile but the last
    ends = torch.div(last + BOUND_UNIT, BOUND_UNIT, rounding_mode="floor")  # ceil((last + 1) / UNIT)
    edges = [torch.zeros(1, device=index.device, dtype=ends.dtype), ends]
    edges.append(torch.full((1,), -(-out_features // BOUND_UNIT), device=index.device, dtype=ends.dtype))
    return torch.cat(edges).to(torch.int32)


@dataclass
class CEPlan:
    """Fast-backward operands of one layer (all on the weight's device, in the compute dtype).

    b0_pad ``[O, r_pad]`` = ``[B0 | s*B_lora | 0]``, stack ``[r_pad + k, I]`` = ``[A0 ; A_lora ; 0 ; R[S, :]]``,
    index ``[k]`` int64 sorted, bounds ``[cdiv(k, KEPT_TILE) + 1]`` int32 (:func:`projection_bounds`).
    The LoRA slots (``svd_rank : svd_rank + lora_rank``) let LoRA's own input gradient ``s (dY B) A``
    ride in the same GEMM; they hold zeros when it does not (:meth:`set_lora`).
    """

    b0_pad: torch.Tensor
    stack: torch.Tensor
    index: torch.Tensor
    bounds: torch.Tensor
    svd_rank: int
    lora_rank: int

    @property
    def keep(self) -> int:
        return self.index.numel()

    @property
    def lora_slots(self) -> slice:
        return slice(self.svd_rank, self.svd_rank + self.lora_rank)

    def set_lora(self, lora_a: torch.Tensor | None, lora_b_scaled: torch.Tensor | None) -> None:
        """Write LoRA's current ``A [r, I]`` and ``s*B [O, r]`` into the slots (``None``: zeros)."""
        if self.lora_rank == 0:
            return
        if lora_a is None:
            self.b0_pad[:, self.lora_slots].zero_()
            self.stack[self.lora_slots].zero_()
        else:
            self.b0_pad[:, self.lora_slots].copy_(lora_b_scaled)
            self.stack[self.lora_slots].copy_(lora_a)


def make_plan(
    weight: torch.Tensor,
    b0: torch.Tensor,
    a0: torch.Tensor,
    index: torch.Tensor,
    dtype: torch.dtype,
    lora_rank: int = 0,
) -> CEPlan:
    """Build a :class:`CEPlan` from the frozen weight ``[O, I]``, fp32 factors and the kept ``index``.

    ``lora_rank`` reserves (zeroed) slots for LoRA's factors next to ``B0``/``A0``.
    """
    svd_rank = b0.shape[1]
    r_pad = padded_rank(svd_rank + lora_rank)
    return CEPlan(
        b0_pad=pad_b0(b0, r_pad, dtype),
        stack=build_stack(weight, b0, a0, index, r_pad, dtype),
        index=index,
        bounds=projection_bounds(index, weight.shape[0]),
        svd_rank=svd_rank,
        lora_rank=lora_rank,
    )
