"""Triton kernels of the short causal depthwise conv (+ SiLU) and its one-token decode update.

Tokens are handled as rows of the flattened ``[B*T, D]`` input. Each row knows its sequence
(``t // T``, or a per-token sequence id for packed varlen input) and that sequence's bounds, so a
tile may straddle sequences without mixing them. Inputs before a sequence's start come from its
initial state ``[N, D, W]`` (or are zero). The backward recomputes the pre-activation instead of
storing it (W is tiny, 4, and the extra loads hit the cache), stores dL/d(pre-activation) once in fp32, and
takes dx from W shifted rows of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2


@triton.jit
def _bounds(seq, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """First row and end row (exclusive) of sequences ``seq`` (int64 vectors)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + seq).to(tl.int64)
        eos = tl.load(cu_seqlens + seq + 1).to(tl.int64)
    else:
        bos = seq * T
        eos = bos + T
    return bos, eos


@triton.jit
def _locate(rows, seq_ids, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """Sequence index, first row and end row (exclusive) of each row, as int64 vectors."""
    if IS_VARLEN:
        seq = tl.load(seq_ids + rows).to(tl.int64)
    else:
        # In int32: row indices fit (causal_conv1d_fwd checks B * T < 2**31), and an int64 division is a
        # ~90-instruction subroutine per row (sm_90).
        seq = (rows.to(tl.int32) // T).to(tl.int64)
    bos, eos = _bounds(seq, cu_seqlens, T, IS_VARLEN)
    return seq, bos, eos


@triton.jit
def _load_input(x, h, src, seq, bos, cols, row_mask, D, W: tl.constexpr, HAS_H: tl.constexpr):
    """Input at rows ``src`` (may precede the sequence start ``bos``) -> fp32 ``[R, BD]``.

    Rows before ``bos`` read the initial state: position src - bos = -p is slot W - p of the state.
    """
    col_mask = (cols < D)[None, :]
    in_seq = (src >= bos) & row_mask
    val = tl.load(x + src[:, None] * D + cols[None, :], mask=in_seq[:, None] & col_mask, other=0.0).to(tl.float32)
    if HAS_H:
        slot = W + src - bos
        in_hist = row_mask & (src < bos) & (slot >= 0)
        ptr = h + seq[:, None] * D * W + cols[None, :] * W + slot[:, None]
        val += tl.load(ptr, mask=in_hist[:, None] & col_mask, other=0.0).to(tl.float32)
    return val


@triton.jit
def _preact(x, w, b, h, t, seq, bos, cols, row_mask, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr):
    """z[t] = sum_j w[:, j] * input[t - W + 1 + j] + bias, fp32 ``[R, BD]``."""
    col_mask = cols < D
    acc = tl.zeros([t.shape[0], cols.shape[0]], dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(w + cols * W + j, mask=col_mask, other=0.0).to(tl.float32)
        acc += w_j[None, :] * _load_input(x, h, t + (j - W + 1), seq, bos, cols, row_mask, D, W, HAS_H)
    if HAS_BIAS:
        acc += tl.load(b + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _grad_preact(x, w, b, h, dy, t, seq, bos, eos, cols, row_mask, D, W: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr, SILU: tl.constexpr):
    """dL/dz at rows ``t`` (zero outside [bos, eos)), fp32 ``[R, BD]``."""
    valid = row_mask & (t >= bos) & (t < eos)
    mask = valid[:, None] & (cols < D)[None, :]
    dz = tl.load(dy + t[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = _preact(x, w, b, h, t, seq, bos, cols, valid, D, W, HAS_BIAS, HAS_H)
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz


@triton.jit
def _dx_from_dz(w, dz, dfs, s, seq, bos, eos, cols, row_mask, D, W: tl.constexpr, HAS_DFS: tl.constexpr):
    """dL/d input at rows ``s`` (s may precede bos: history slots) from the stored dz ``[NT, D]`` fp32, fp32
    ``[R, BD]``.

    Input s feeds z[s + k] through w[:, W - 1 - k] (only where s + k lies in the sequence), and the final state if
    s is among the last W rows.
    """
    col_mask = cols < D
    acc = tl.zeros([s.shape[0], cols.shape[0]], dtype=tl.float32)
    for k in tl.static_range(W):
        w_k = tl.load(w + cols * W + (W - 1 - k), mask=col_mask, other=0.0).to(tl.float32)
        t = s + k
        ok = row_mask & (t >= bos) & (t < eos)
        acc += w_k[None, :] * tl.load(dz + t[:, None] * D + cols[None, :], mask=ok[:, None] & col_mask[None, :],
                                      other=0.0)
    if HAS_DFS:
        slot = s - eos + W  # >= W only for rows past the last sequence, which get no gradient
        ok = row_mask & (slot >= 0) & (slot < W)
        ptr = dfs + seq[:, None] * D * W + cols[None, :] * W + slot[:, None]
        acc += tl.load(ptr, mask=ok[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x, w, b, h, y, seq_ids, cu_seqlens, NT, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr,
):
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_mask = rows < NT
    seq, bos, _ = _locate(tl.where(row_mask, rows, 0), seq_ids, cu_seqlens, T, IS_VARLEN)
    z = _preact(x, w, b, h, rows, seq, bos, cols, row_mask, D, W, HAS_BIAS, HAS_H)
    if SILU:
        z = z * tl.sigmoid(z)
    mask = row_mask[:, None] & (cols < D)[None, :]
    tl.store(y + rows[:, None] * D + cols[None, :], z.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _conv_final_state_kernel(
    x, h, fs, cu_seqlens, T, D,
    W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, HAS_H: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """fs[n, :, i] = input at row eos - W + i of sequence n (history or zero before its start)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    slots = tl.arange(0, BW)
    seq = n + tl.zeros([BW], dtype=tl.int64)
    bos, eos = _bounds(seq, cu_seqlens, T, IS_VARLEN)
    val = _load_input(x, h, eos - W + slots, seq, bos, cols, slots < W, D, W, HAS_H)
    mask = (slots < W)[:, None] & (cols < D)[None, :]
    tl.store(fs + n * D * W + cols[None, :] * W + slots[:, None], val.to(fs.dtype.element_ty), mask=mask)


@triton.jit
def _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, j: tl.constexpr, W: tl.constexpr, HAS_H: tl.constexpr):
    """dz[t] * input[t - W + 1 + j] for the tile's rows, fp32 ``[BT, BD]`` (zero for taps past the width)."""
    if j < W:
        return b_dz * _load_input(x, h, rows + (j - W + 1), seq, bos, cols, row_mask, D, W, HAS_H)
    return tl.zeros_like(b_dz)


@triton.jit
def _conv_bwd_dz_kernel(
    x, w, b, h, dy, dz, dw_partial, db_partial, seq_ids, cu_seqlens, NT, T, D, SUB,
    W: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_H: tl.constexpr, IS_VARLEN: tl.constexpr, SILU: tl.constexpr,
):
    """For SUB blocks of BT rows: dz = dL/d(pre-activation), stored fp32 (zero outside the sequences), and the
    weight/bias gradients summed over those rows into one partial row, dw[:, j] = sum_t dz[t] input[t - W + 1 + j]
    (the same shifted inputs as the recomputed pre-activation, so they hit the cache).

    A sum over a tile's rows crosses warps (shared memory and a barrier): taken once per tap and tile, it was most
    of this kernel's time. Up to W = 4 (the models' width) each tap's products are summed per element over the SUB
    tiles, one register tile per tap, and over the rows once at the end; wider convs sum each tile's rows.
    """
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    slots = tl.arange(0, BW)
    col_mask = cols < D
    acc_w = tl.zeros([BD, BW], dtype=tl.float32)
    tap0 = tl.zeros([BT, BD], dtype=tl.float32)
    tap1 = tl.zeros([BT, BD], dtype=tl.float32)
    tap2 = tl.zeros([BT, BD], dtype=tl.float32)
    tap3 = tl.zeros([BT, BD], dtype=tl.float32)
    acc_b = tl.zeros([BT, BD], dtype=tl.float32)
    for sub in range(SUB):
        rows = ((pid_t * SUB + sub) * BT + tl.arange(0, BT)).to(tl.int64)
        row_mask = rows < NT
        seq, bos, eos = _locate(tl.where(row_mask, rows, 0), seq_ids, cu_seqlens, T, IS_VARLEN)
        b_dz = _grad_preact(x, w, b, h, dy, rows, seq, bos, eos, cols, row_mask, D, W, HAS_BIAS, HAS_H, SILU)
        tl.store(dz + rows[:, None] * D + cols[None, :], b_dz, mask=row_mask[:, None] & col_mask[None, :])
        if W <= 4:
            tap0 += _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, 0, W, HAS_H)
            tap1 += _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, 1, W, HAS_H)
            tap2 += _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, 2, W, HAS_H)
            tap3 += _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, 3, W, HAS_H)
        else:
            for j in tl.static_range(W):
                prod = _tap_product(x, h, b_dz, rows, seq, bos, cols, row_mask, D, j, W, HAS_H)
                acc_w += tl.where(slots[None, :] == j, tl.sum(prod, axis=0)[:, None], 0.0)
        acc_b += b_dz
    if W <= 4:
        acc_w = tl.where(slots[None, :] == 0, tl.sum(tap0, axis=0)[:, None], acc_w)
        acc_w = tl.where(slots[None, :] == 1, tl.sum(tap1, axis=0)[:, None], acc_w)
        acc_w = tl.where(slots[None, :] == 2, tl.sum(tap2, axis=0)[:, None], acc_w)
        acc_w = tl.where(slots[None, :] == 3, tl.sum(tap3, axis=0)[:, None], acc_w)
    mask_w = col_mask[:, None] & (slots[None, :] < W)
    tl.store(dw_partial + (pid_t * D + cols[:, None]) * W + slots[None, :], acc_w, mask=mask_w)
    if HAS_BIAS:
        tl.store(db_partial + pid_t * D + cols, tl.sum(acc_b, axis=0), mask=col_mask)


@triton.jit
def _conv_bwd_dx_kernel(
    w, dz, dfs, dx, seq_ids, cu_seqlens, NT, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_DFS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dx for a tile of BT rows from the stored dz."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_mask = rows < NT
    seq, bos, eos = _locate(tl.where(row_mask, rows, 0), seq_ids, cu_seqlens, T, IS_VARLEN)
    b_dx = _dx_from_dz(w, dz, dfs, rows, seq, bos, eos, cols, row_mask, D, W, HAS_DFS)
    tl.store(dx + rows[:, None] * D + cols[None, :], b_dx.to(dx.dtype.element_ty),
             mask=row_mask[:, None] & (cols < D)[None, :])


@triton.jit
def _conv_bwd_initial_state_kernel(
    w, dz, dfs, dh, cu_seqlens, T, D,
    W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, HAS_DFS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """dh[n, :, i]: gradient of history slot i, i.e. of the input at row bos - W + i, from the stored dz."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    slots = tl.arange(0, BW)
    seq = n + tl.zeros([BW], dtype=tl.int64)
    bos, eos = _bounds(seq, cu_seqlens, T, IS_VARLEN)
    grad = _dx_from_dz(w, dz, dfs, bos - W + slots, seq, bos, eos, cols, slots < W, D, W, HAS_DFS)
    mask = (slots < W)[:, None] & (cols < D)[None, :]
    tl.store(dh + n * D * W + cols[None, :] * W + slots[:, None], grad.to(dh.dtype.element_ty), mask=mask)


@triton.jit
def _conv_update_rows(
    x, state, w, b, y, n, cols, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
    W: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """Sequence n, channels ``cols``: state <- [state[:, 1:], x]; y = act(sum(state * w) + b)."""
    slots = tl.arange(0, BW)
    col_mask = cols < D
    base = state + n * stride_sn + cols[:, None] * stride_sd
    # The whole [BD, W] tile is read before it is written back, so the in-place shift is safe.
    shifted = tl.load(
        base + (slots[None, :] + 1) * stride_sw, mask=col_mask[:, None] & (slots[None, :] + 1 < W), other=0.0
    )
    b_x = tl.load(x + n * stride_xn + cols, mask=col_mask, other=0.0).to(shifted.dtype)
    new = tl.where(slots[None, :] == W - 1, b_x[:, None], shifted)
    tl.store(base + slots[None, :] * stride_sw, new, mask=col_mask[:, None] & (slots[None, :] < W))
    b_w = tl.load(w + cols[:, None] * W + slots[None, :], mask=col_mask[:, None] & (slots[None, :] < W), other=0.0)
    z = tl.sum(new.to(tl.float32) * b_w.to(tl.float32), axis=1)
    if HAS_BIAS:
        z += tl.load(b + cols, mask=col_mask, other=0.0).to(tl.float32)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y + n * stride_yn + cols, z.to(y.dtype.element_ty), mask=col_mask)


@triton.jit
def _conv_update_kernel(
    x, state, w, b, y, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
    W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """One token per sequence: state <- [state[:, 1:], x]; y = act(sum(state * w) + b)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    _conv_update_rows(x, state, w, b, y, n, cols, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
                      W, BW, HAS_BIAS, SILU)  # fmt: skip


@triton.jit
def _conv_update_group_kernel(
    x0, x1, x2, s0, s1, s2, w0, w1, w2, b0, b1, b2, y0, y1, y2,
    D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
    W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """:func:`_conv_update_kernel` for up to three convolutions of one shape (the third grid axis picks one), so
    that KDA's q, k and v convs take one launch per decode step."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    which = tl.program_id(2)
    if which == 0:
        _conv_update_rows(x0, s0, w0, b0, y0, n, cols, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
                          W, BW, HAS_BIAS, SILU)  # fmt: skip
    elif which == 1:
        _conv_update_rows(x1, s1, w1, b1, y1, n, cols, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
                          W, BW, HAS_BIAS, SILU)  # fmt: skip
    else:
        _conv_update_rows(x2, s2, w2, b2, y2, n, cols, D, stride_xn, stride_sn, stride_sd, stride_sw, stride_yn,
                          W, BW, HAS_BIAS, SILU)  # fmt: skip


def _seq_ids(cu_seqlens: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sequence index of every packed row (no host sync: a device-side search).

    Clamped to the last sequence so that rows past ``cu_seqlens[-1]`` never index out of bounds.
    """
    rows = torch.arange(num_rows, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ids = torch.searchsorted(cu_seqlens[1:], rows, right=True)
    return ids.clamp_(max=cu_seqlens.numel() - 2).to(torch.int32)


# The backward runs in two passes: dz (the pre-activation recomputed from W shifted inputs, times the SiLU
# derivative) with the weight gradient, then dx from W shifted rows of the stored dz. One pass that recomputed dz for
# each of the W taps of dx (W * W input loads per element, [8 x 128] tiles to stay under the register limit) took
# 13.3 ms of a 103 ms Kimi Linear training step on the H200 (session 7 profile, 18 convs of [8192, 2048]). A dz
# program takes BWD_TILES_PER_PROGRAM tiles of BWD_ROWS rows, so that the weight-gradient partial sums stay small.
# Tiles: the fastest of 16 settings in GPU time (session 22, H100, B1 T8192 D4096 W4 bf16; BENCHMARKS.md): forward
# and dx on [64 x 128] at 8 warps (forward 89.5 us against 100.2 on [32 x 128]), dz on [32 x 128] at 4 warps
# (forward + backward 461 us, against 573 at 8 warps and 759 before the per-tap sums).
ROWS, CHANNELS, WARPS = 64, 128, 8
_MAX_ROWS = 2**31  # row indices are int32 in the kernels' sequence lookup
BWD_ROWS, BWD_WARPS, BWD_TILES_PER_PROGRAM = 32, 4, 4


def _tile(rows: int, dim: int, max_rows: int) -> tuple[int, int]:
    return min(max_rows, next_power_of_2(max(rows, 1))), min(CHANNELS, next_power_of_2(dim))


def causal_conv1d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """x ``[B, T, D]`` contiguous, weight ``[D, W]`` contiguous, initial_state ``[N, D, W]`` contiguous.

    Returns y ``[B, T, D]``, the final state ``[N, D, W]`` (x's dtype) or None, and the per-row
    sequence ids (varlen only; reused by the backward).
    """
    batch, length, dim = x.shape
    width = weight.shape[1]
    rows = batch * length
    if rows >= _MAX_ROWS:
        raise ValueError(f"the Triton conv takes fewer than 2**31 tokens (B * T), got B={batch}, T={length}")
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    seq_ids = _seq_ids(cu_seqlens, rows) if cu_seqlens is not None else None
    block_t, block_d = _tile(rows, dim, ROWS)
    y = torch.empty_like(x)
    _conv_fwd_kernel[(cdiv(rows, block_t), cdiv(dim, block_d))](
        x, weight, bias, initial_state, y, seq_ids, cu_seqlens, rows, length, dim,
        W=width, BT=block_t, BD=block_d, HAS_BIAS=bias is not None, HAS_H=initial_state is not None,
        IS_VARLEN=cu_seqlens is not None, SILU=silu, num_warps=WARPS,
    )
    final_state = None
    if output_final_state:
        final_state = x.new_empty(num_seqs, dim, width)
        _conv_final_state_kernel[(num_seqs, cdiv(dim, block_d))](
            x, initial_state, final_state, cu_seqlens, length, dim,
            W=width, BW=next_power_of_2(width), BD=block_d, HAS_H=initial_state is not None,
            IS_VARLEN=cu_seqlens is not None, num_warps=4,
        )
    return y, final_state, seq_ids


def causal_conv1d_bwd(
    dy: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias, dinitial_state) in the dtypes of the respective inputs."""
    batch, length, dim = x.shape
    width = weight.shape[1]
    rows = batch * length
    block_t, block_d = _tile(rows, dim, BWD_ROWS)
    sub = max(1, min(BWD_TILES_PER_PROGRAM, cdiv(rows, block_t)))
    programs_t = cdiv(rows, block_t * sub)
    dz = torch.empty(rows, dim, device=x.device, dtype=torch.float32)
    dw_partial = torch.empty(programs_t, dim, width, device=x.device, dtype=torch.float32)
    db_partial = torch.empty(programs_t, dim, device=x.device, dtype=torch.float32) if bias is not None else None
    is_varlen, has_dfs = cu_seqlens is not None, dfinal_state is not None
    _conv_bwd_dz_kernel[(programs_t, cdiv(dim, block_d))](
        x, weight, bias, initial_state, dy, dz, dw_partial, db_partial, seq_ids, cu_seqlens, rows, length, dim, sub,
        W=width, BW=next_power_of_2(width), BT=block_t, BD=block_d, HAS_BIAS=bias is not None,
        HAS_H=initial_state is not None, IS_VARLEN=is_varlen, SILU=silu, num_warps=BWD_WARPS,
    )
    dx = torch.empty_like(x)
    block_t, block_d = _tile(rows, dim, ROWS)
    _conv_bwd_dx_kernel[(cdiv(rows, block_t), cdiv(dim, block_d))](
        weight, dz, dfinal_state, dx, seq_ids, cu_seqlens, rows, length, dim,
        W=width, BT=block_t, BD=block_d, HAS_DFS=has_dfs, IS_VARLEN=is_varlen, num_warps=WARPS,
    )
    dinitial_state = None
    if initial_state is not None:
        dinitial_state = torch.empty_like(initial_state)
        _conv_bwd_initial_state_kernel[(initial_state.shape[0], cdiv(dim, block_d))](
            weight, dz, dfinal_state, dinitial_state, cu_seqlens, length, dim,
            W=width, BW=next_power_of_2(width), BD=block_d, HAS_DFS=has_dfs, IS_VARLEN=is_varlen,
            num_warps=4,
        )
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dinitial_state


def causal_conv1d_update_fwd(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """x ``[N, D]`` (unit channel stride), conv_state ``[N, D, W]`` (any strides, updated in place)."""
    num_seqs, dim = x.shape
    width = weight.shape[1]
    block_d = min(256, next_power_of_2(dim))
    y = torch.empty_like(x)
    _conv_update_kernel[(num_seqs, cdiv(dim, block_d))](
        x, conv_state, weight, bias, y, dim, x.stride(0), *conv_state.stride(), y.stride(0),
        W=width, BW=next_power_of_2(width), BD=block_d, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return y


def causal_conv1d_update_group_fwd(
    xs: Sequence[torch.Tensor],
    conv_states: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    silu: bool,
) -> list[torch.Tensor]:
    """Up to three :func:`causal_conv1d_update_fwd` of one shape in one launch: xs ``[N, D]`` with one row stride
    (unit channel stride), conv_states ``[N, D, W]`` with one set of strides, weights ``[D, W]`` contiguous, biases
    all None or all ``[D]``."""
    num_seqs, dim = xs[0].shape
    width = weights[0].shape[1]
    block_d = min(256, next_power_of_2(dim))
    ys = [torch.empty_like(xs[0]) for _ in xs]
    # unused slots repeat the first convolution's tensors; the grid never reaches them
    pad = lambda group: [*group, *[group[0]] * (3 - len(group))]  # noqa: E731
    _conv_update_group_kernel[(num_seqs, cdiv(dim, block_d), len(xs))](
        *pad(xs), *pad(conv_states), *pad(weights), *pad(biases), *pad(ys), dim, xs[0].stride(0),
        *conv_states[0].stride(), ys[0].stride(0),
        W=width, BW=next_power_of_2(width), BD=block_d, HAS_BIAS=biases[0] is not None, SILU=silu, num_warps=4,
    )  # fmt: skip
    return ys
