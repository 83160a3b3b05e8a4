"""Launchers and autograd Function of the Triton RMSNorm that the standard residual stream uses as PreNorm.

Block/Full AttnRes fuse each sublayer's PreNorm into the depth-attention read (``fused.py``); this kernel
gives the standard residual the same advantage (one read and one write forward, only x and rstd kept for
backward) so that the two are compared at their best. Rows of D channels, a few rows per program.
"""

from __future__ import annotations

import torch

from .._backend import refuse_create_graph
from .._grid import cdiv
from . import _triton
from .fused import block_d, num_warps

# Backward programs walk this many row blocks each: the weight-gradient partials stay small ([P, D]).
_BWD_BLOCKS_PER_PROGRAM = 8


def _rows_and_warps(d: int) -> tuple[int, int, int]:
    """(rows per program block, padded D, warps): about 2K elements per block, as the gated norm kernels; the warps
    of AttnRes's one-row kernels (``fused.num_warps``), whose anchor this is."""
    width = block_d(d)
    return max(1, min(64, 2048 // width)), width, num_warps(d)


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, D] contiguous, weight [D] -> (y [M, D] in promote(x, weight) dtype, rstd [M] float32, normed input).

    With ``add`` [M, D] contiguous the normed input is x + add (in promote(x, add) dtype, written by the same
    kernel: the standard residual's addition fused into the next PreNorm); without it, x itself.
    """
    m, d = x.shape
    rows, width, warps = _rows_and_warps(d)
    y = torch.empty((m, d), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    total = x if add is None else torch.empty((m, d), dtype=torch.promote_types(x.dtype, add.dtype), device=x.device)
    _triton.rms_norm_fwd_kernel[(cdiv(m, rows),)](
        x, weight, y, rstd, add if add is not None else x, total, m, d, eps,
        BR=rows, BLOCK_D=width, HAS_ADD=add is not None, num_warps=warps,
    )  # fmt: skip
    return y, rstd, total


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [M, D] contiguous -> (dx [M, D] in x's dtype, dweight [D] in weight's dtype)."""
    m, d = x.shape
    if m == 0:  # no rows: no program to launch (the block count below would be 0), and no weight gradient
        return torch.empty_like(x), torch.zeros_like(weight)
    rows, width, warps = _rows_and_warps(d)
    blocks = min(_BWD_BLOCKS_PER_PROGRAM, cdiv(m, rows))
    programs = cdiv(m, rows * blocks)
    dx = torch.empty_like(x)
    dw = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _triton.rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, dw, m, d, BR=rows, BLOCK_D=width, BLOCKS=blocks, num_warps=warps
    )
    return dx, dw.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim; saves x and rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        d = x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        w = weight.contiguous()
        y, rstd, _ = rms_norm_fwd(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        refuse_create_graph("RMSNorm")
        x2, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, w, rstd)
        return dx.view(dy.shape), dw, None
