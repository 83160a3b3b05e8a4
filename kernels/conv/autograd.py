"""Autograd wrapper around the causal conv Triton kernels."""

from __future__ import annotations

import torch

from .._backend import refuse_create_graph
from .triton_kernels import causal_conv1d_bwd, causal_conv1d_fwd


class CausalConv1dFunction(torch.autograd.Function):
    """Returns (y, final_state or None); gradients for x, weight, bias and initial_state."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        silu: bool,
        output_final_state: bool,
        cu_seqlens: torch.Tensor | None,
    ):
        x = x.contiguous()  # weight and bias arrive contiguous (causal_conv1d's checks)
        initial_state = initial_state.contiguous() if initial_state is not None else None
        y, final_state, seq_ids = causal_conv1d_fwd(
            x, weight, bias, initial_state, output_final_state, cu_seqlens, silu
        )
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens, seq_ids)
        ctx.silu = silu
        return y, final_state

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dfinal_state: torch.Tensor | None):
        refuse_create_graph("causal_conv1d")
        x, weight, bias, initial_state, cu_seqlens, seq_ids = ctx.saved_tensors
        dfinal_state = dfinal_state.contiguous() if dfinal_state is not None else None
        dx, dweight, dbias, dinitial_state = causal_conv1d_bwd(
            dy.contiguous(), dfinal_state, x, weight, bias, initial_state, cu_seqlens, seq_ids, ctx.silu
        )
        return dx, dweight, dbias, dinitial_state, None, None, None
