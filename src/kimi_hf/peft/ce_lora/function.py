"""Autograd for CE-LoRA layers: frozen base weight with an approximate input gradient.

Two Functions:

* :func:`ce_lora_linear` -- the whole layer ``y = x W^T + b + s (x A^T) B^T`` in one Function (one
  adapter, no dropout): the LoRA branch adds into the base GEMM's output (``addmm``), and in backward
  LoRA's input gradient ``s (dY B) A`` rides in CE-LoRA's packed GEMM. Saves what PEFT's LoRA saves
  (``x`` for ``A``'s gradient, ``x A^T`` for ``B``'s), in the compute dtype.
* :func:`ce_linear` -- the base layer alone, for every other case (dropout, several adapters, LoRA
  bias); PEFT's LoRA branch then runs beside it. Saves nothing.

The compute dtype is the base output's dtype (the activation dtype, or autocast's); LoRA parameters
(often fp32 in PEFT) are cast to it, and their gradients come back in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import CEChannelState


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
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        grad_b = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class _CELoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` with exact LoRA gradients and CE-LoRA's ``dX`` through ``W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, state):
        out = F.linear(x, weight, bias).contiguous()
        dtype = out.dtype
        x_2d = x.reshape(-1, x.shape[-1]).to(dtype)
        xa = x_2d @ lora_a.to(dtype).T  # [T, r]
        out.view(-1, out.shape[-1]).addmm_(xa, lora_b.to(dtype).T, alpha=scaling)
        ctx.save_for_backward(
            x_2d if ctx.needs_input_grad[3] else None,
            xa if ctx.needs_input_grad[4] else None,
            lora_a,
            lora_b,
        )
        ctx.state, ctx.weight, ctx.scaling, ctx.x_dtype = state, weight, scaling, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_2d, xa, lora_a, lora_b = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dtype = grad_2d.dtype
        a, b_scaled = lora_a.to(dtype), lora_b.to(dtype) * ctx.scaling
        grad_x = dy_b = None
        if ctx.needs_input_grad[0]:
            grad_x, dy_b = ctx.state.grad_input(grad_2d, ctx.weight, (a, b_scaled))
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            dy_b = grad_2d @ b_scaled if dy_b is None else dy_b
            grad_a = dy_b.T @ x_2d
        if ctx.needs_input_grad[4]:
            grad_b = (grad_2d.T @ xa).mul_(ctx.scaling)
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
