"""Triton kernels of the gated RMSNorm: y = x * rstd * weight * act(gate), rows of D channels.

Forward keeps rstd [M] (fp32) for the backward. Each backward program walks a few consecutive row
blocks and sums the weight gradient's products per element in registers, over its rows once at the end (a
sum over a block's rows crosses warps), and writes one [D] partial (summed by torch) per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2


@triton.jit
def _activate(gate, ACTIVATION: tl.constexpr):
    """act(gate) and its derivative, both fp32."""
    sig = tl.sigmoid(gate)
    if ACTIVATION == "sigmoid":
        return sig, sig * (1.0 - sig)
    return gate * sig, sig * (1.0 + gate * (1.0 - sig))


@triton.jit
def _gated_rms_norm_fwd_kernel(
    x, gate, weight, y, rstd, M, D, eps,
    BR: tl.constexpr, BD: tl.constexpr, ACTIVATION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    b_x = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    b_g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
    b_w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    act, _ = _activate(b_g, ACTIVATION)
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * act
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, b_rstd, mask=rows < M)


@triton.jit
def _gated_rms_norm_bwd_kernel(
    dy, x, gate, weight, rstd, dx, dgate, dweight_partial, M, D,
    BR: tl.constexpr, BD: tl.constexpr, BLOCKS: tl.constexpr, ACTIVATION: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    mask_d = cols < D
    b_w = tl.load(weight + cols, mask=mask_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BR, BD], dtype=tl.float32)
    for block in range(pid * BLOCKS, pid * BLOCKS + BLOCKS):
        rows = (block * BR + tl.arange(0, BR)).to(tl.int64)
        mask = (rows < M)[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        b_x = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        b_g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
        b_rstd = tl.load(rstd + rows, mask=rows < M, other=0.0)
        act, dact = _activate(b_g, ACTIVATION)
        normed = b_x * b_rstd[:, None]
        b_dw += b_dy * normed * act
        tl.store(dgate + offs, (b_dy * normed * b_w[None, :] * dact).to(dgate.dtype.element_ty), mask=mask)
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)), with dn the gradient w.r.t. the normed x.
        dn = b_dy * b_w[None, :] * act
        b_dx = b_rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / D)[:, None])
        tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=mask)
    tl.store(dweight_partial + pid * D + cols, tl.sum(b_dw, axis=0), mask=mask_d)


# About ELEMENTS (2K) elements per block at 8 warps: 32 (forward) / ~80 (backward) registers on sm_90 for
# D <= 1024. Eight blocks per backward program keep the dweight partials at 1/(8 * rows per block) of the input.
ELEMENTS, WARPS = 2048, 8
BWD_ELEMENTS, BWD_WARPS, BWD_BLOCKS_PER_PROGRAM = 2048, 8, 8


def _block_rows(dim: int, elements: int) -> tuple[int, int]:
    """(rows per block, padded D) for blocks of about ``elements``."""
    block_d = next_power_of_2(dim)
    return max(1, min(64, elements // block_d)), block_d


def gated_rms_norm_fwd(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, gate ``[M, D]`` contiguous, weight ``[D]`` -> (y ``[M, D]`` in x's dtype, rstd ``[M]`` fp32)."""
    rows, dim = x.shape
    block_r, block_d = _block_rows(dim, ELEMENTS)
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    _gated_rms_norm_fwd_kernel[(cdiv(rows, block_r),)](
        x, gate, weight, y, rstd, rows, dim, eps, BR=block_r, BD=block_d, ACTIVATION=activation, num_warps=WARPS,
    )
    return y, rstd


def gated_rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dgate in the inputs' dtypes, dweight in weight's dtype); all ``[M, D]`` contiguous."""
    rows, dim = x.shape
    if rows == 0:  # no program to launch; the weight gets no gradient contribution
        return torch.empty_like(x), torch.empty_like(gate), torch.zeros_like(weight)
    block_r, block_d = _block_rows(dim, BWD_ELEMENTS)
    blocks = min(BWD_BLOCKS_PER_PROGRAM, cdiv(rows, block_r))
    programs = cdiv(rows, block_r * blocks)
    dx = torch.empty_like(x)
    dgate = torch.empty_like(gate)
    dweight_partial = torch.empty(programs, dim, device=x.device, dtype=torch.float32)
    _gated_rms_norm_bwd_kernel[(programs,)](
        dy, x, gate, weight, rstd, dx, dgate, dweight_partial, rows, dim,
        BR=block_r, BD=block_d, BLOCKS=blocks, ACTIVATION=activation, num_warps=BWD_WARPS,
    )
    return dx, dgate, dweight_partial.sum(0).to(weight.dtype)
