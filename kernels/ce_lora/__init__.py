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


def _check(
    grad_output: torch.Tensor, plan: CEPlan, lora: tuple[torch.Tensor, torch.Tensor, float] | None
) -> None:
    if grad_output.dim() != 2:
        raise ValueError(f"grad_output must be 2-D [T, O], got shape {tuple(grad_output.shape)}")
    out_features, in_features = plan.b0_pad.shape[0], plan.stack.shape[1]
    if grad_output.shape[1] != out_features:
        raise ValueError(f"grad_output has {grad_output.shape[1]} channels but the plan was built for {out_features}")
    if grad_output.dtype != plan.stack.dtype:
        raise ValueError(f"grad_output dtype {grad_output.dtype} != plan dtype {plan.stack.dtype}")
    if lora is None:
        return
    lora_a, lora_b, _ = lora  # compared as they come: this runs on every layer's backward
    if lora_a.shape != (plan.lora_rank, in_features) or lora_b.shape != (out_features, plan.lora_rank):
        raise ValueError(
            f"LoRA's A and B must be [{plan.lora_rank}, {in_features}] and [{out_features}, {plan.lora_rank}] (the "
            f"plan's LoRA rank and layer shape), got {list(lora_a.shape)} and {list(lora_b.shape)}"
        )
    if lora_a.dtype != plan.stack.dtype or lora_b.dtype != plan.stack.dtype:
        raise ValueError(
            f"LoRA's A and B must be {plan.stack.dtype} (the plan's), got {lora_a.dtype} and {lora_b.dtype}"
        )


def ce_pack_grad_output(
    grad_output: torch.Tensor,
    plan: CEPlan,
    backend: str | None = None,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``G = [dY s B | dY B0 | dY[:, S]]``, ``[T, r_pad + k]``, from ``dY [T, O]`` (same dtype as the plan).

    ``lora = (A [r, I], B [O, r], s)`` (the plan's LoRA rank and dtype) writes ``s B`` into the plan's LoRA columns of
    ``b0_pad`` and ``A`` into its LoRA rows of ``stack`` (the Triton kernel copies ``A`` in its own launch), so that
    ``G @ plan.stack`` includes LoRA's input gradient ``(dY s B) A``. Without it, those columns and rows are zeros.
    """
    _check(grad_output, plan, lora)
    grad_output = grad_output.contiguous()
    lora_a = lora_rows = None
    if lora is None:
        plan.clear_lora()
    else:
        lora_a, lora_b, scaling = lora
        lora_a, lora_rows = lora_a.contiguous(), plan.use_lora(lora_b, scaling)
    if resolve_backend(backend, grad_output) == "triton":
        from .pack import triton_pack_grad_output  # triton is imported only when used

        return triton_pack_grad_output(grad_output, plan.b0_pad, plan.keep, plan.slots, lora_a, lora_rows)
    if lora_a is not None:
        lora_rows.copy_(lora_a)
    return naive_pack_grad_output(grad_output, plan.b0_pad, plan.index)


def ce_grad_input(
    grad_output: torch.Tensor,
    plan: CEPlan,
    backend: str | None = None,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Approximate ``dX = dY W`` as ``G @ [A0 ; R[S, :]]``: ``[T, I]`` from ``dY [T, O]``; with ``lora`` (see
    :func:`ce_pack_grad_output`) LoRA's input gradient ``(dY s B) A`` is added."""
    return ce_pack_grad_output(grad_output, plan, backend, lora=lora) @ plan.stack
