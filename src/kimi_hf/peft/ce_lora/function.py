"""Autograd for CE-LoRA layers: frozen base weight with an approximate input gradient.

Two Functions:

* :func:`ce_lora_linear` -- the whole layer ``y = x W^T + b + s (x A^T) B^T`` in one Function (one
  adapter, no dropout). Saves ``x`` for ``A``'s gradient and ``x A^T`` for ``B``'s, like PEFT's LoRA.
* :func:`ce_linear` -- the base layer alone, for every other case (dropout, several adapters, LoRA
  bias); PEFT's LoRA branch then runs beside it. Saves nothing.

Dtypes follow PEFT's LoRA ``Linear``: the base GEMM runs in the activations' dtype (or autocast's), the
LoRA branch in the adapter weights' dtype -- fp32 under ``get_peft_model``'s default
``autocast_adapter_dtype=True``, even for a bf16 model -- or in autocast's dtype when autocast is on; the
sum is rounded once to the base output's dtype, and LoRA's gradients are computed in the branch's dtype.
When branch and base share a dtype, the base GEMM adds onto the branch's output (``addmm_``) and, in
backward, LoRA's input gradient ``s (dY B) A`` rides in CE-LoRA's packed GEMM. Unlike PEFT, ``x`` is
saved as it came when the branch's dtype only widens it (bf16 to fp32 is exact) and widened again in
backward: same values, no fp32 copy of every adapted layer's input held until backward. When the branch is the
wider one (PEFT's fp32 adapters on a bf16 or fp16 model), its products and sums run in
:mod:`kimi_hf.kernels.lora_branch` (Triton on a GPU), which widens the 16-bit tensors in registers instead of
copying ``x``, ``dY`` and the base output to fp32 as PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_hf.kernels.lora_branch import lora_down, lora_up_add_, lora_weight_grad

from .state import CEChannelState


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the dispatcher call when it already has that dtype: this runs about eight times
    per adapted projection and training step, whose wall time can follow the host."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts a linear layer's ``x`` to (floating, not float64), or None where it leaves it."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return None


class _CELinearFunction(torch.autograd.Function):
    """``F.linear(x, W, b)``; backward ``dX`` from :meth:`CEChannelState.grad_input`, exact ``db``."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        ctx.state, ctx.weight, ctx.x_dtype = state, weight, x.dtype  # weight: a parameter, no copy
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x, _ = ctx.state.grad_input(grad_2d, ctx.weight)
            grad_x = _as(grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]), ctx.x_dtype)
        grad_b = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class _CELoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with exact LoRA gradients and CE-LoRA's ``dX`` through ``W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, state):
        autocast = _autocast_dtype(x)
        dtype = autocast or x.dtype  # F.linear's
        lora_dtype = dtype if torch.is_autocast_enabled(x.device.type) else lora_a.dtype
        x_2d = x.reshape(-1, x.shape[-1])
        a, b = _as(lora_a, lora_dtype), _as(lora_b, lora_dtype)
        # [T, r]; a widened x (PEFT's fp32 adapters on a bf16 model) is widened in the kernel's registers, not copied
        xa = x_2d @ a.T if lora_dtype == x.dtype else lora_down(x_2d, a, backend=state.backend)
        if lora_dtype == dtype:
            # The branch first, then the base GEMM adds onto it, scaled (beta), in its epilogue. Adding the branch
            # afterwards (addmm_ into the base output) read and wrote [T, O] once more: 4.4 ms of GPU time per
            # step of the ~0.9B Llama on an H100 (session 50). In-place addmm_ is not autocast: it casts as
            # F.linear would (and, like F.linear, refuses mismatched dtypes without autocast).
            operands = (x_2d, weight, bias)
            if autocast is not None:  # copies for this GEMM only: ctx keeps the weight itself
                operands = tuple(None if t is None else _as(t, autocast) for t in operands)
            x_base, w_base, b_base = operands
            out_2d = (xa @ b.T).addmm_(x_base, w_base.T, beta=scaling)
            if b_base is not None:  # a pass of its own (LLMs' projections seldom have a bias)
                out_2d.add_(b_base)
        else:  # PEFT adds the branch to the base output in the branch's dtype, then rounds
            out_2d = lora_up_add_(F.linear(x_2d, weight, bias), xa, b, scaling, backend=state.backend)
        out = out_2d.view(*x.shape[:-1], out_2d.shape[-1])
        widening = torch.promote_types(x.dtype, lora_dtype) == lora_dtype
        ctx.save_for_backward(
            (x_2d if widening else _as(x_2d, lora_dtype)) if ctx.needs_input_grad[3] else None,
            xa if ctx.needs_input_grad[4] else None,
            lora_a,
            lora_b,
        )
        ctx.state, ctx.weight, ctx.scaling, ctx.x_dtype, ctx.lora_dtype = state, weight, scaling, x.dtype, lora_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_2d, xa, lora_a, lora_b = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dtype, lora_dtype, scaling, backend = grad_2d.dtype, ctx.lora_dtype, ctx.scaling, ctx.state.backend
        a, b = _as(lora_a, lora_dtype), _as(lora_b, lora_dtype)
        fused = lora_dtype == dtype  # LoRA's dX term joins CE's packed GEMM only in the GEMM's dtype
        grad_x = dy_b = None
        if ctx.needs_input_grad[0]:
            grad_x, dy_b = ctx.state.grad_input(grad_2d, ctx.weight, (a, b, scaling) if fused else None)
        if dy_b is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            dy_b = lora_down(grad_2d, b.T, scaling, backend=backend)  # [T, r], dY as LoRA's branch sees it
        if grad_x is not None:
            if not fused:  # as PEFT: LoRA's input gradient in the branch's dtype, rounded, then added
                lora_up_add_(grad_x, dy_b, a.T, round_first=True, backend=backend)
            grad_x = _as(grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]), ctx.x_dtype)
        grad_a = None
        if ctx.needs_input_grad[3]:  # the fused path's operands share a dtype: one GEMM, no dispatch on the host
            grad_a = dy_b.T @ _as(x_2d, lora_dtype) if fused else lora_weight_grad(dy_b, x_2d, backend=backend)
        grad_b = None
        if ctx.needs_input_grad[4]:
            if fused:  # s dY^T (x A^T) in one GEMM (beta=0: the input is only a shape, never read)
                grad_b = torch.addmm(b, grad_2d.T, xa, beta=0, alpha=scaling)
            else:
                grad_b = lora_weight_grad(xa, grad_2d, scaling, transpose=True, backend=backend)
        grad_bias = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _check_frozen(weight: torch.Tensor) -> None:
    if weight.requires_grad:
        raise ValueError("CE-LoRA needs a frozen base weight (requires_grad=False); it does not train it")


def ce_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: CEChannelState) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x [..., I]``, ``weight [O, I]`` frozen) with CE-LoRA's input gradient."""
    _check_frozen(weight)
    return _CELinearFunction.apply(x, weight, bias, state)


def ce_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    state: CEChannelState,
) -> torch.Tensor:
    """``x W^T + b + scaling (x A^T) B^T`` with ``W [O, I]`` frozen, ``A [r, I]``, ``B [O, r]``.

    Values and the gradients of ``A``, ``B`` and ``b`` are LoRA's; ``dX`` follows ``state``.
    """
    _check_frozen(weight)
    return _CELoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, state)
