"""Autograd for ``y = x W^T + b`` with a frozen ``W`` whose input gradient CE-LoRA approximates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import CEChannelState


class _CELinearFunction(torch.autograd.Function):
    """Exact forward; backward ``dX`` from :meth:`CEChannelState.grad_input`, exact ``db`` if asked.

    Saves no activation: ``dX`` needs only ``dY`` and the frozen weight (a parameter, not a copy), and
    ``W`` gets no gradient. (LoRA's branch saves its own input, exactly as in PEFT's LoRA.)
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: CEChannelState
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        ctx.state = state
        ctx.weight = weight  # a parameter: keeping a reference costs no memory
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.state.grad_input(grad_2d, ctx.weight)
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        grad_b = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


def ce_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: CEChannelState) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x [..., I]``, ``weight [O, I]``) with CE-LoRA's input gradient.

    ``weight`` must be frozen (``requires_grad=False``): CE-LoRA approximates only ``dX``.
    """
    if weight.requires_grad:
        raise ValueError("ce_linear needs a frozen weight (requires_grad=False); CE-LoRA does not train it")
    return _CELinearFunction.apply(x, weight, bias, state)
