"""Triton kernels of the chunked KDA backward (raw kernels only; launchers live in ``chunk.py``).

Layout and notation as in ``chunk_fwd.py``. With S the state at a chunk's start, dS' the gradient of
the state at its end, R = V - (k * exp(G)) S and T = M Diag(beta):
  dV' = A_qk^T dO + (k * exp(G_last - G)) dS'               (sequential pass, with dS)
  dS  = exp(G_last) * dS' + scale (q * exp(G))^T dO - W^T dV'
  dV  = T^T dV',  d(k exp G) = -dV S^T,  d(k exp(G_last - G)) = V' dS'^T,  d(q exp G) = scale dO S^T
  dA_qk = tril(dO V'^T),  dT = tril(dV' R^T),  dM = dT Diag(beta),  d(beta P) = -strict_tril(M^T dM M^T)
and the pairwise terms sum_d a_id b_jd exp(G_id - G_jd) send gradients to a, b and G (+ on the a
side, - on the b side). The cumulative sum is undone by a reverse cumsum inside the chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .chunk_fwd import (
    _chunk_bounds, _load_cum_decay, _load_row, _load_rows, _state_tile, _store_rows, _tile_and_item, softplus,
)  # fmt: skip


@triton.jit
def kda_state_bwd_kernel(
    qg, kh, gl, W, A_qk, do, dh, dv_new, dht, dh0, cu_seqlens, chunk_offsets, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (sequence, V tile; head), chunks in reverse: writes dS' (gradient of each chunk's end state)
    to ``dh [NC, H, K, V]`` and dV' to ``dv_new``; the gradient of the initial state to ``dh0``.
    The previous chunk's tiles are loaded before the current chunk's dots."""
    i_v, i_n = _tile_and_item(tl.cdiv(V, BV))
    i_h = tl.program_id(1)
    bos, eos, c0, cols, cmask, st_offs, st_mask, b_dS, cols_v, vmask = _state_tile(
        cu_seqlens, chunk_offsets, dht, i_n, i_h, i_v, H, K, V, BK, BV, HAS_DHT
    )
    idx = tl.arange(0, BT)
    NT = tl.cdiv(eos - bos, BT)
    i_t = NT - 1
    rows = bos + i_t * BT + idx
    rmask = (rows < eos) & (rows >= bos)
    b_qg = _load_rows(qg, rows, rmask, cols, cmask, H, i_h, K)
    b_kh = _load_rows(kh, rows, rmask, cols, cmask, H, i_h, K)
    b_w = _load_rows(W, rows, rmask, cols, cmask, H, i_h, K)
    b_A = _load_rows(A_qk, rows, rmask, idx, idx < BT, H, i_h, BT)
    b_do = _load_rows(do, rows, rmask, cols_v, vmask, H, i_h, V)
    b_gl = tl.load(gl + ((c0 + i_t) * H + i_h) * K + cols, mask=cols < K * tl.minimum(NT, 1), other=0.0)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        tl.store(dh + ((c0 + i_t) * H + i_h) * K * V + st_offs, b_dS.to(dh.dtype.element_ty), mask=st_mask)
        prows = rows - BT
        pmask = prows >= bos
        p_qg = _load_rows(qg, prows, pmask, cols, cmask, H, i_h, K)
        p_kh = _load_rows(kh, prows, pmask, cols, cmask, H, i_h, K)
        p_w = _load_rows(W, prows, pmask, cols, cmask, H, i_h, K)
        p_A = _load_rows(A_qk, prows, pmask, idx, idx < BT, H, i_h, BT)
        p_do = _load_rows(do, prows, pmask, cols_v, vmask, H, i_h, V)
        has_prev = tl.minimum(i_t, 1)
        p_gl = tl.load(gl + ((c0 + i_t - 1) * H + i_h) * K + cols, mask=cols < K * has_prev, other=0.0)
        dt = b_w.dtype
        b_dvn = tl.dot(tl.trans(b_A), b_do, input_precision=IEEE)
        b_dvn += tl.dot(b_kh, b_dS.to(dt), input_precision=IEEE)
        _store_rows(dv_new, b_dvn, rows, rmask, cols_v, vmask, H, i_h, V)
        b_dS = b_dS * b_gl[:, None]
        b_dS += tl.dot(tl.trans(b_qg), b_do, input_precision=IEEE)
        b_dS -= tl.dot(tl.trans(b_w), b_dvn.to(dt), input_precision=IEEE)
        rows, rmask, b_qg, b_kh, b_w, b_A, b_do, b_gl = prows, pmask, p_qg, p_kh, p_w, p_A, p_do, p_gl
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + st_offs, b_dS, mask=st_mask)


@triton.jit
def kda_pair_bwd_kernel(
    k, v, beta, P, M, h, v_new, dv_new, do, dv, dbeta, dA_qk, dP, G, chunk_indices, cu_seqlens, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): what needs whole rows of K and V. Writes dv = beta * M^T dV', dbeta, and the
    gradients of the two pairwise matrices, dA_qk = tril(dO V'^T) and d(P) (``[TT, H, BT]`` fp32), for
    :func:`kda_key_bwd_kernel`."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    b_G, b_last, idx, rows, rmask, cols, cmask = _load_cum_decay(G, t0, eos, H, i_h, K, 0, BT, BK)
    dt = h.dtype.element_ty
    b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_kg = (b_k * tl.exp(b_G)).to(dt)
    b_beta = tl.load(beta + rows.to(tl.int64) * H + i_h, mask=rmask, other=0.0).to(tl.float32)
    tmask = idx < BT
    b_M = _load_rows(M, rows, rmask, idx, tmask, H, i_h, BT).to(tl.float32)
    b_Mt = tl.trans(b_M).to(dt)
    b_dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    st = (i_c * H + i_h).to(tl.int64) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        vmask = cols_v < V
        b_S = tl.load(h + st + cols[:, None] * V + cols_v[None, :], mask=cmask[:, None] & vmask[None, :], other=0.0)
        b_vn = _load_rows(v_new, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_dvn = _load_rows(dv_new, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_do = _load_rows(do, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_v = _load_rows(v, rows, rmask, cols_v, vmask, H, i_h, V).to(tl.float32)
        _store_rows(dv, tl.dot(b_Mt, b_dvn, input_precision=IEEE) * b_beta[:, None], rows, rmask, cols_v, vmask,
                    H, i_h, V)  # fmt: skip
        b_dAqk += tl.dot(b_do, tl.trans(b_vn), input_precision=IEEE)
        b_R = b_v - tl.dot(b_kg, b_S, input_precision=IEEE)
        b_dT += tl.dot(b_dvn, tl.trans(b_R.to(dt)), input_precision=IEEE)
    lower = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    # T = M Diag(beta): dM = dT Diag(beta), dbeta_j += sum_i dT_ij M_ij; d(beta P) = -M^T dM M^T.
    b_dT = tl.where(lower, b_dT, 0.0)
    b_dbeta = tl.sum(b_dT * b_M, axis=0)
    b_dM = b_dT * b_beta[None, :]
    b_dA = tl.dot(tl.dot(tl.trans(b_M), b_dM, input_precision=IEEE), tl.trans(b_M), input_precision=IEEE)
    b_dA = tl.where(strict, -b_dA, 0.0)
    b_P = _load_rows(P, rows, rmask, idx, tmask, H, i_h, BT)
    b_dbeta += tl.sum(b_dA * b_P, axis=1)
    tl.store(dbeta + rows.to(tl.int64) * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=rmask)
    _store_rows(dP, b_dA * b_beta[:, None], rows, rmask, idx, tmask, H, i_h, BT)
    _store_rows(dA_qk, tl.where(lower, b_dAqk, 0.0), rows, rmask, idx, tmask, H, i_h, BT)


@triton.jit
def kda_direct_bwd_kernel(
    k, G, h, dh, v_new, dv, do, dq, dkp, dkm, dlast_part, chunk_indices, cu_seqlens, scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, block of BK key channels; head), all BT rows: the terms through the chunk-start state S
    and the end-state gradient dS' (``[BT, V] x [V, BK]`` dots). Writes, fp32 ``[TT, H, K]``: dq = scale
    exp(G) dO S^T, dkp = -exp(G) dv S^T (k terms that carry exp(+G)) and dkm = exp(G_last - G) V' dS'^T
    (those with exp(-G)), which :func:`kda_key_bwd_kernel` completes with the in-chunk pairs; and the
    gradient of the chunk's last G to ``dlast_part [NC, H, K]``."""
    i_k, i_c = _tile_and_item(tl.cdiv(K, BK))
    i_h = tl.program_id(1)
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    b_G, b_last, idx, rows, rmask, cols, cmask = _load_cum_decay(G, t0, eos, H, i_h, K, i_k * BK, BT, BK)
    dt = h.dtype.element_ty
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    b_dkg = tl.zeros([BT, BK], dtype=tl.float32)  # d(k exp G) = -dv S^T
    b_dkh = tl.zeros([BT, BK], dtype=tl.float32)  # d(k exp(G_last - G)) = V' dS'^T
    b_dlast = tl.zeros([BK], dtype=tl.float32)
    st = (i_c * H + i_h).to(tl.int64) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        vmask = cols_v < V
        st_offs = st + cols[:, None] * V + cols_v[None, :]
        st_mask = cmask[:, None] & vmask[None, :]
        b_S = tl.load(h + st_offs, mask=st_mask, other=0.0)
        b_dS = tl.load(dh + st_offs, mask=st_mask, other=0.0)
        b_do = _load_rows(do, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_vn = _load_rows(v_new, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_dx = _load_rows(dv, rows, rmask, cols_v, vmask, H, i_h, V).to(dt)
        b_dq += tl.dot(b_do, tl.trans(b_S), input_precision=IEEE)
        b_dkh += tl.dot(b_vn, tl.trans(b_dS), input_precision=IEEE)
        b_dkg -= tl.dot(b_dx, tl.trans(b_S), input_precision=IEEE)
        b_dlast += tl.sum(b_S.to(tl.float32) * b_dS.to(tl.float32), axis=1)
    b_gexp = tl.exp(b_G)
    b_dkm = b_dkh * tl.exp(b_last[None, :] - b_G)
    _store_rows(dq, b_dq * b_gexp * scale, rows, rmask, cols, cmask, H, i_h, K)
    _store_rows(dkp, b_dkg * b_gexp, rows, rmask, cols, cmask, H, i_h, K)
    _store_rows(dkm, b_dkm, rows, rmask, cols, cmask, H, i_h, K)
    # G_last enters through kh = k exp(G_last - G) (every row) and the state decay (once per chunk).
    b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_part = tl.sum(b_dkm * b_k, axis=0) + b_dlast * tl.exp(b_last)
    tl.store(dlast_part + (i_c * H + i_h).to(tl.int64) * K + cols, b_part, mask=cmask)


@triton.jit
def _direct_terms(G, dq, dk, dG, rows, rmask, cols, cmask, H, i_h, K):
    """A sub-block's decays G and the direct terms of :func:`kda_direct_bwd_kernel` (dq, dkp in ``dk``, dkm in
    ``dG``), each ``[BC, BK]`` fp32."""
    b_G = _load_rows(G, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_dq = _load_rows(dq, rows, rmask, cols, cmask, H, i_h, K)
    b_dkp = _load_rows(dk, rows, rmask, cols, cmask, H, i_h, K)
    b_dkm = _load_rows(dG, rows, rmask, cols, cmask, H, i_h, K)
    return b_G, b_dq, b_dkp, b_dkm


@triton.jit
def _earlier_pairs_bwd(k, G, dA_qk, dP, t0, m0, eos, b_G, rows, rmask, cols, cmask, H, i_h, K,
                       BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """For the sub-block at row ``m0`` (``b_G`` its ``[BC, BK]`` decays), the pairs with the earlier sub-blocks of
    the chunk, one ``[BC, BC] x [BC, BK]`` dot per partner sub-block, through the pivot p = the sub-block's first
    row (the last valid row if the sub-block starts past the end): returns sum_j dA_qk[i, j] k_j exp(G_i - G_j)
    and the same with dP, each ``[BC, BK]``."""
    b_Gp = _load_row(G, tl.minimum(t0 + m0, eos - 1), eos, cols, H, i_h, K)
    b_aq = tl.zeros([BC, cols.shape[0]], dtype=tl.float32)
    b_ak = tl.zeros([BC, cols.shape[0]], dtype=tl.float32)
    pcols = tl.arange(0, BC)
    for j0 in range(0, m0, BC):
        p_rows = t0 + j0 + tl.arange(0, BC)
        p_mask = p_rows < eos
        b_Gj = _load_rows(G, p_rows, p_mask, cols, cmask, H, i_h, K).to(tl.float32)
        b_kj = _load_rows(k, p_rows, p_mask, cols, cmask, H, i_h, K).to(tl.float32)
        b_kp = b_kj * tl.exp(tl.where(p_mask[:, None], b_Gp[None, :] - b_Gj, float("-inf")))
        b_dA = _load_rows(dA_qk, rows, rmask, j0 + pcols, pcols < BC, H, i_h, BT)
        b_dPb = _load_rows(dP, rows, rmask, j0 + pcols, pcols < BC, H, i_h, BT)
        b_aq += tl.dot(b_dA, b_kp, input_precision=IEEE)
        b_ak += tl.dot(b_dPb, b_kp, input_precision=IEEE)
    b_to_row = tl.exp(tl.where(rmask[:, None], b_G - b_Gp[None, :], float("-inf")))
    return b_to_row * b_aq, b_to_row * b_ak


@triton.jit
def _later_pairs_bwd(q, k, G, dA_qk, dP, t0, m0, eos, scale, b_G, rmask, cols, cmask, H, i_h, K,
                     BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """For the sub-block at row ``m0``, the pairs with the later sub-blocks, one dot pair per partner sub-block,
    through the pivot l = the sub-block's last valid row: sum_i (scale dA_qk[i, j] q_i + dP[i, j] k_i)
    exp(G_i - G_j) for the rows j of this sub-block (``[BC, BK]``)."""
    b_Gl = _load_row(G, tl.minimum(t0 + m0 + BC, eos) - 1, eos, cols, H, i_h, K)
    b_acc = tl.zeros([BC, cols.shape[0]], dtype=tl.float32)
    sub_cols = m0 + tl.arange(0, BC)
    for j0 in range(m0 + BC, BT, BC):
        p_rows = t0 + j0 + tl.arange(0, BC)
        p_mask = p_rows < eos
        b_Gj = _load_rows(G, p_rows, p_mask, cols, cmask, H, i_h, K).to(tl.float32)
        b_from = tl.exp(tl.where(p_mask[:, None], b_Gj - b_Gl[None, :], float("-inf")))
        b_qj = _load_rows(q, p_rows, p_mask, cols, cmask, H, i_h, K).to(tl.float32) * scale
        b_kj = _load_rows(k, p_rows, p_mask, cols, cmask, H, i_h, K).to(tl.float32)
        b_dA = _load_rows(dA_qk, p_rows, p_mask, sub_cols, sub_cols < BT, H, i_h, BT)
        b_dPb = _load_rows(dP, p_rows, p_mask, sub_cols, sub_cols < BT, H, i_h, BT)
        b_acc += tl.dot(tl.trans(b_dA), b_qj * b_from, input_precision=IEEE)
        b_acc += tl.dot(tl.trans(b_dPb), b_kj * b_from, input_precision=IEEE)
    return tl.exp(tl.where(rmask[:, None], b_Gl[None, :] - b_G, float("-inf"))) * b_acc


@triton.jit
def _diag_pairs_bwd(q, k, G, dA_qk, dP, b_G, b_q, b_k, t0, m0, eos, scale, rows, rmask, cols, cmask, H, i_h, K,
                    SPAN: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """For the sub-block at row ``m0`` (``b_G``, ``b_q``, ``b_k``: its ``[BC, BK]`` decays, q and k; fp32), the pairs
    inside it: returns dq and dkp before the scale, sum_{j <= i} dA_qk[i, j] k_j E_ij and the same with dP, and dkm,
    sum_{i >= t} (scale dA_qk[i, t] q_i + dP[i, t] k_i) E_it (E_ij = exp(G_i - G_j)). Tensor-core dots through the
    sub-block's middle row m, E_ij = exp(G_i - G_m) exp(G_m - G_j), when every |G_i - G_m| of this key block is at
    most SPAN (each factor then far inside fp32's range); else one partner at a time with exact decays."""
    idx = tl.arange(0, BC)
    n_valid = tl.minimum(eos - (t0 + m0), BC)
    b_m = _load_row(G, t0 + m0 + tl.minimum(BC // 2, n_valid - 1), eos, cols, H, i_h, K)  # its middle row
    b_G = tl.where(rmask[:, None], b_G, b_m[None, :])  # rows past the end: no decay from m
    b_d = b_G - b_m[None, :]
    if tl.max(tl.abs(b_d)) <= SPAN:
        lower = idx[:, None] >= idx[None, :]
        b_dA = tl.where(lower, _load_rows(dA_qk, rows, rmask, m0 + idx, idx < BC, H, i_h, BT), 0.0)
        b_dPs = tl.where(lower, _load_rows(dP, rows, rmask, m0 + idx, idx < BC, H, i_h, BT), 0.0)
        b_up, b_down = tl.exp(b_d), tl.exp(-b_d)
        b_kd = b_k * b_down
        d_q = b_up * tl.dot(b_dA, b_kd, input_precision=IEEE)
        d_kp = b_up * tl.dot(b_dPs, b_kd, input_precision=IEEE)
        d_km = tl.dot(tl.trans(b_dA), b_q * (scale * b_up), input_precision=IEEE)
        d_km = b_down * tl.dot(tl.trans(b_dPs), b_k * b_up, d_km, input_precision=IEEE)
    else:
        d_q = tl.zeros(b_G.shape, dtype=tl.float32)
        d_kp = tl.zeros(b_G.shape, dtype=tl.float32)
        d_km = tl.zeros(b_G.shape, dtype=tl.float32)
        for j in range(0, BC):
            r = t0 + m0 + j
            b_Gj = _load_row(G, r, eos, cols, H, i_h, K)
            b_kj = _load_row(k, r, eos, cols, H, i_h, K)
            b_qj = _load_row(q, r, eos, cols, H, i_h, K) * scale
            # row i's partner j (j <= i): column j of dA_qk, dP; column t's partner j (j >= t): their row j
            col = (rows.to(tl.int64) * H + i_h) * BT + m0 + j
            row = (r.to(tl.int64) * H + i_h) * BT + m0 + idx
            b_to = tl.exp(tl.where((idx >= j)[:, None], b_G - b_Gj[None, :], float("-inf"))) * b_kj[None, :]
            d_q += tl.load(dA_qk + col, mask=rmask, other=0.0)[:, None] * b_to
            d_kp += tl.load(dP + col, mask=rmask, other=0.0)[:, None] * b_to
            on = idx <= tl.where(r < eos, j, -1)  # t <= j, none past the sequence end
            # masked in the exponent: past the end b_Gj is 0, and exp(0 - G_t) overflows for strong decays (inf * 0)
            b_from = tl.exp(tl.where(on[:, None], b_Gj[None, :] - b_G, float("-inf")))
            b_dA_row = tl.load(dA_qk + row, mask=on, other=0.0)
            b_dP_row = tl.load(dP + row, mask=on, other=0.0)
            d_km += (b_dA_row[:, None] * b_qj[None, :] + b_dP_row[:, None] * b_kj[None, :]) * b_from
    return d_q, d_kp, d_km


@triton.jit
def kda_key_bwd_kernel(
    q, k, G, dA_qk, dP, dq, dk, dG, chunk_indices, cu_seqlens, scale, H, K,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, SPAN: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, block of BK key channels, sub-block of BC rows; head): adds the in-chunk pair terms to the
    direct terms of :func:`kda_direct_bwd_kernel` (read from ``dq``, ``dk`` (= dkp) and ``dG`` (= dkm), fp32)
    and writes, in place, dq and dk (with respect to the normalised q/k) and dG before the in-chunk reverse
    cumsum. Every term is a sum over key channels of per-channel
    products, so channel blocks are independent; a program holds [BC, BK] and [BT, BK] tiles only.

    Pairs with earlier rows use this sub-block's first row p as a pivot (exp(G_i - G_p) exp(G_p - G_j)),
    pairs with later rows its last row l (exp(G_i - G_l) exp(G_l - G_j)): every factor is <= 1. Each other
    sub-block is one [BC, BC] x [BC, BK] dot, on [BC, BK] tiles and only for the partners that exist (against
    one masked dot over the whole chunk's [BT, BK] tiles: 161 registers instead of 255 with spills, and 11% off
    fwd+bwd on the H200). The pairs inside the sub-block are added last (:func:`_diag_pairs_bwd`), once the other
    pairs' tiles are dead. (Until session 18 a kernel of one token per program added them to the direct terms first,
    a read-modify-write of three fp32 gradients: fwd+bwd 4.080 against 3.757 ms at B1 T8192 on the H200.)
    """
    NS: tl.constexpr = BT // BC
    i_ks, i_c = _tile_and_item(tl.cdiv(K, BK) * NS)
    i_h = tl.program_id(1)
    i_k, i_s = i_ks // NS, i_ks % NS
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    m0 = i_s * BC
    cols = i_k * BK + tl.arange(0, BK)
    cmask = cols < K
    rows = t0 + m0 + tl.arange(0, BC)
    rmask = rows < eos
    b_G, b_dq, b_dkp, b_dkm = _direct_terms(G, dq, dk, dG, rows, rmask, cols, cmask, H, i_h, K)
    # the other sub-blocks one at a time: [BC, BK] tiles, and only the partners that exist
    d_q, d_kp = _earlier_pairs_bwd(k, G, dA_qk, dP, t0, m0, eos, b_G, rows, rmask, cols, cmask, H, i_h, K,
                                   BT, BC, IEEE)  # fmt: skip
    b_dq += d_q * scale
    b_dkp += d_kp
    b_dkm += _later_pairs_bwd(q, k, G, dA_qk, dP, t0, m0, eos, scale, b_G, rmask, cols, cmask, H, i_h, K,
                              BT, BC, IEEE)  # fmt: skip
    b_q = _load_rows(q, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    d_q, d_kp, d_km = _diag_pairs_bwd(q, k, G, dA_qk, dP, b_G, b_q, b_k, t0, m0, eos, scale, rows, rmask, cols,
                                      cmask, H, i_h, K, SPAN, BT, BC, IEEE)  # fmt: skip
    b_dq += d_q * scale
    b_dkp += d_kp
    b_dkm += d_km
    # G's gradient is q * dq + k * (dkp - dkm) because q only ever appears with exp(+G).
    _store_rows(dG, b_q * b_dq + b_k * (b_dkp - b_dkm), rows, rmask, cols, cmask, H, i_h, K)
    _store_rows(dq, b_dq, rows, rmask, cols, cmask, H, i_h, K)
    _store_rows(dk, b_dkp + b_dkm, rows, rmask, cols, cmask, H, i_h, K)


@triton.jit
def kda_gate_bwd_kernel(
    dg, dlast_part, g_raw, A_log, dt_bias, dA_log_part, ddt_bias_part, chunk_indices, cu_seqlens, H, K,
    BT: tl.constexpr, BK: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, block of BK key channels; head), in place on ``dg`` (holding dG): the gradient of the
    chunk's last G joins its last row, the in-chunk cumulative sum is undone by a reverse cumsum, and with
    the fused gate (g = -exp(A_log) softplus(x + dt_bias)) dg goes through it, with per-chunk partial sums
    for A_log and dt_bias."""
    NKB = tl.cdiv(K, BK)
    i_k, i_c = _tile_and_item(NKB)
    i_h = tl.program_id(1)
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    idx = tl.arange(0, BT)
    rows = t0 + idx
    rmask = rows < eos
    cols = i_k * BK + tl.arange(0, BK)
    cmask = cols < K
    b_dG = _load_rows(dg, rows, rmask, cols, cmask, H, i_h, K)
    b_dlast = tl.load(dlast_part + (i_c * H + i_h).to(tl.int64) * K + cols, mask=cmask, other=0.0)
    n_valid = tl.minimum(eos - t0, BT)
    b_dG += tl.where((idx == n_valid - 1)[:, None], b_dlast[None, :], 0.0)
    b_dG = tl.where(rmask[:, None], b_dG, 0.0)
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    if GATE:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_x = _load_rows(g_raw, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
        b_x += tl.load(dt_bias + i_h * K + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        b_sp = softplus(b_x)
        valid = rmask[:, None] & cmask[None, :]
        # g = -a softplus(x): dg/dA_log = g, dg/dx = -a sigmoid(x)
        part = (i_c * H + i_h) * NKB + i_k
        tl.store(dA_log_part + part, tl.sum(tl.sum(tl.where(valid, -b_a * b_sp * b_dg, 0.0), axis=1)))
        b_dg = tl.where(valid, -b_a * tl.sigmoid(b_x) * b_dg, 0.0)
        tl.store(ddt_bias_part + (i_c * H + i_h) * K + cols, tl.sum(b_dg, axis=0), mask=cmask)
    _store_rows(dg, b_dg, rows, rmask, cols, cmask, H, i_h, K)


@triton.jit
def l2norm_bwd_kernel(x, dy, dx, n_rows, D, EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Rows of ``[n_rows, D]``: y = x / sqrt(|x|^2 + eps), dx = (dy - y (y . dy)) / sqrt(|x|^2 + eps)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    b_x = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + EPS)
    b_y = b_x * b_rstd[:, None]
    b_dx = (b_dy - b_y * tl.sum(b_y * b_dy, axis=1)[:, None]) * b_rstd[:, None]
    tl.store(dx + offs, b_dx.to(dx.dtype.element_ty), mask=mask)
