"""What CE-LoRA's fast backward needs for one layer between two reselections."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .naive import build_stack, pad_b0

TILE = 64  # the packed GEMM's inner size is rounded up to this (cuBLAS/Triton fast path)
MIN_DOT = 16  # smallest tensor-core dot width


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
    # rounded first: 0.56 * 200 is 112.00000000000001 in floats, whose ceil kept one more channel and, at a tile
    # boundary, a whole extra tile of 64 (176 channels instead of 112)
    keep = math.ceil(round(ratio * out_features, 6))
    keep = TILE * math.ceil((r_pad + keep) / TILE) - r_pad
    return keep if r_pad + keep < out_features else None


def channel_slots(index: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 ``[O]``: the kept column of ``G`` each channel goes to (its rank in the sorted ``index [k]``), -1 where
    it is not kept. The packing kernel stores every channel of a tile of ``dY`` through it."""
    slots = torch.full((out_features,), -1, device=index.device, dtype=torch.int32)
    slots[index] = torch.arange(index.numel(), device=index.device, dtype=torch.int32)
    return slots


@dataclass
class CEPlan:
    """Fast-backward operands of one layer (all on the weight's device, in the compute dtype).

    b0_pad ``[O, r_pad]`` = ``[s*B_lora | B0 | 0]``, stack ``[r_pad + k, I]`` = ``[A_lora ; A0 ; 0 ; R[S, :]]``,
    index ``[k]`` int64 sorted; slots ``[O]`` int32, each channel's kept column (:func:`channel_slots`).
    The LoRA slots (``0 : lora_rank``) let LoRA's own input gradient ``s (dY B) A`` ride in the same GEMM: a pack
    with LoRA (:func:`~kimi_hf.kernels.ce_lora.ce_pack_grad_output`) writes LoRA's current factors there; they hold
    zeros otherwise.
    """

    b0_pad: torch.Tensor
    stack: torch.Tensor
    index: torch.Tensor
    slots: torch.Tensor
    svd_rank: int
    lora_rank: int
    lora_in_use: bool = False  # whether a pack wrote LoRA's factors into the slots since they were zeroed
    # the LoRA slots' views, b0_pad's columns [O, r] and stack's rows [r, I], made once: every approximate backward
    # with LoRA writes them, on a training step whose wall time can follow the host
    lora_columns: torch.Tensor = field(init=False, repr=False)
    lora_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lora_columns = self.b0_pad[:, self.lora_slots]
        self.lora_rows = self.stack[self.lora_slots]

    @property
    def keep(self) -> int:
        return self.index.numel()

    @property
    def lora_slots(self) -> slice:
        # first: dY s B is then G's leading columns, 16-byte aligned for the GEMM of LoRA's A gradient (at column
        # svd_rank cuBLAS fell back to a 2-element-aligned kernel, 2.3 ms per step of the ~0.9B Llama)
        return slice(0, self.lora_rank)

    def use_lora(self, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        """Write ``scaling * B [O, r]`` into the LoRA slots of ``b0_pad``; returns the stack's LoRA rows ``[r, I]``,
        where the pack puts ``A`` (:func:`~kimi_hf.kernels.ce_lora.ce_pack_grad_output`)."""
        torch.mul(lora_b, scaling, out=self.lora_columns)  # scaled and copied in one kernel
        self.lora_in_use = True
        return self.lora_rows

    def clear_lora(self) -> None:
        """Zero the LoRA slots if a pack wrote LoRA's factors there: once when packs without LoRA follow (``B``'s
        slots would add ``s (dY B) A`` to their ``dX``), not on every backward."""
        if self.lora_in_use:
            self.lora_columns.zero_()
            self.lora_rows.zero_()
            self.lora_in_use = False


def make_plan(
    weight: torch.Tensor,
    b0: torch.Tensor,
    a0: torch.Tensor,
    index: torch.Tensor,
    dtype: torch.dtype,
    lora_rank: int = 0,
) -> CEPlan:
    """Build a :class:`CEPlan` from the frozen weight ``[O, I]``, fp32 factors and the kept ``index``.

    ``index``: distinct kept channels in any order (the plan keeps them sorted, so that ``G``'s kept columns follow
    ``dY``'s channel order and a tile of ``dY`` is stored to consecutive rows of ``G^T``; the approximation does not
    depend on the order). ``lora_rank`` reserves (zeroed) slots for LoRA's factors next to ``B0``/``A0``. Checking
    that the channels are distinct and in range reads two flags back to the host (one sync), once per plan.
    """
    out_features = weight.shape[0]
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64) or index.numel() > out_features:
        raise ValueError(
            f"index must be a 1-D int32/int64 tensor of at most {out_features} channels, got {index.dtype} of shape "
            f"{tuple(index.shape)}"
        )
    index = index.long().sort().values
    # one read-back for both checks (an out-of-range channel would fail deep in channel_slots' indexing)
    flags = torch.stack([(index[1:] == index[:-1]).any(), (index[:1] < 0).any() | (index[-1:] >= out_features).any()])
    repeated, outside = flags.tolist()
    if repeated:
        raise ValueError("index must hold distinct channels: a repeated one would be counted twice in dX")
    if outside:
        raise ValueError(
            f"index must hold channels in [0, {out_features}), got {index[0].item()} to {index[-1].item()}"
        )
    svd_rank = b0.shape[1]
    r_pad = padded_rank(svd_rank + lora_rank)
    return CEPlan(
        b0_pad=pad_b0(b0, r_pad, dtype, offset=lora_rank),
        stack=build_stack(weight, b0, a0, index, r_pad, dtype, offset=lora_rank),
        index=index,
        slots=channel_slots(index, out_features),
        svd_rank=svd_rank,
        lora_rank=lora_rank,
    )
