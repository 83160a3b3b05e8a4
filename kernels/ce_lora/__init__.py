"""CE-LoRA's approximate input gradient through a frozen linear weight (arXiv 2502.01378).

``dX ~= [dY B0 | dY[:, S]] @ [A0 ; R[S, :]]`` with ``W = B0 A0 + R``: one packing pass over ``dY``
(Triton: :mod:`.pack`; torch: :func:`.naive.naive_pack_grad_output`) and one dense GEMM of inner size
``r_pad + k`` (a multiple of 64). ``backend=None`` picks Triton for CUDA tensors (not fp64), the torch
reference elsewhere (see :func:`kimi_hf.kernels.resolve_backend`).
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .naive import (
    SCORES,
    channel_scores,
    low_rank_factors,
    naive_ce_grad_input,
    naive_pack_grad_output,
    residual_row_norms,
    select_channels,
)
from .plan import CEPlan, channel_slots, kept_channels, make_plan, padded_rank

__all__ = [
    "SCORES",
    "CEPlan",
    "ce_grad_input",
    "ce_pack_grad_output",
    "channel_scores",
    "channel_slots",
    "kept_channels",
    "low_rank_factors",
    "make_plan",
    "naive_ce_grad_input",
    "naive_pack_grad_output",
    "padded_rank",
    "residual_row_norms",
    "select_channels",
]


def _check(grad_output: torch.Tensor, plan: CEPlan) -> None:
    if grad_output.dim() != 2:
        raise ValueError(f"grad_output must be 2-D [T, O], got shape {tuple(grad_output.shape)}")
    if grad_output.shape[1] != plan.b0_pad.shape[0]:
        raise ValueError(
            f"grad_output has {grad_output.shape[1]} channels but the plan was built for {plan.b0_pad.shape[0]}"
        )
    if grad_output.dtype != plan.stack.dtype:
        raise ValueError(f"grad_output dtype {grad_output.dtype} != plan dtype {plan.stack.dtype}")


def ce_pack_grad_output(grad_output: torch.Tensor, plan: CEPlan, backend: str | None = None) -> torch.Tensor:
    """``G = [dY B0 | dY[:, S]]``, ``[T, r_pad + k]``, from ``dY [T, O]`` (same dtype as the plan)."""
    _check(grad_output, plan)
    grad_output = grad_output.contiguous()
    if resolve_backend(backend, grad_output) == "triton":
        from .pack import triton_pack_grad_output  # triton is imported only when used

        return triton_pack_grad_output(grad_output, plan.b0_pad, plan.keep, plan.slots)
    return naive_pack_grad_output(grad_output, plan.b0_pad, plan.index)


def ce_grad_input(grad_output: torch.Tensor, plan: CEPlan, backend: str | None = None) -> torch.Tensor:
    """Approximate ``dX = dY W`` as ``G @ [A0 ; R[S, :]]``: ``[T, I]`` from ``dY [T, O]``."""
    return ce_pack_grad_output(grad_output, plan, backend) @ plan.stack
