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
    lora_a, lora_b, _ = lora
    expected = {"A": (plan.lora_rank, in_features), "B": (out_features, plan.lora_rank)}
    for name, tensor in (("A", lora_a), ("B", lora_b)):
        if tuple(tensor.shape) != expected[name] or tensor.dtype != plan.stack.dtype:
            raise ValueError(
                f"LoRA's {name} must be {plan.stack.dtype} of shape {expected[name]} (the plan's LoRA rank and layer "
                f"shape), got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )


def ce_pack_grad_output(
    grad_output: torch.Tensor,
    plan: CEPlan,
    backend: str | None = None,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``G = [dY s B | dY B0 | dY[:, S]]``, ``[T, r_pad + k]``, from ``dY [T, O]`` (same dtype as the plan).

    ``lora = (A [r, I], B [O, r], s)`` (the plan's LoRA rank and dtype) also writes ``A`` into the plan's LoRA rows of
    ``stack``, so that ``G @ plan.stack`` includes LoRA's input gradient ``(dY s B) A``. Without it, ``G``'s LoRA
    columns and those rows are zeros.
    """
    _check(grad_output, plan, lora)
    grad_output = grad_output.contiguous()
    if lora is None:
        plan.clear_lora()
    else:
        lora = (lora[0].contiguous(), lora[1].contiguous(), lora[2])
        plan.lora_in_stack = True
    if resolve_backend(backend, grad_output) == "triton":
        from .pack import triton_pack_grad_output  # triton is imported only when used

        lora_rows = plan.stack[plan.lora_slots] if lora is not None else None
        return triton_pack_grad_output(grad_output, plan.b0_pad, plan.keep, plan.slots, lora, lora_rows)
    if lora is not None:
        plan.stack[plan.lora_slots].copy_(lora[0])
    return naive_pack_grad_output(grad_output, plan.b0_pad, plan.index, *(lora[1:] if lora is not None else ()))


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
