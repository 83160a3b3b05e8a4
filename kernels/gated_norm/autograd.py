"""Autograd wrapper around the gated RMSNorm Triton kernels."""

from __future__ import annotations

import torch

from .._backend import refuse_create_graph
from .triton_kernels import gated_rms_norm_bwd, gated_rms_norm_fwd


class GatedRMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight * act(gate) over the last dim; saves rstd, not y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        g2d = gate.reshape(-1, shape[-1]).contiguous()
        w = weight.contiguous()
        y, rstd = gated_rms_norm_fwd(x2d, g2d, w, eps, activation)
        ctx.save_for_backward(x2d, g2d, w, rstd)
        ctx.activation = activation
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        refuse_create_graph("gated_rms_norm")
        x2d, g2d, w, rstd = ctx.saved_tensors
        dx, dgate, dweight = gated_rms_norm_bwd(dy.reshape(x2d.shape).contiguous(), x2d, g2d, w, rstd, ctx.activation)
        return dx.view(dy.shape), dgate.view(dy.shape), dweight, None, None
