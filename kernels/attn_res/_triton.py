"""Raw Triton kernels of the depth attention (launchers and autograd live in ``fused.py`` / ``two_phase.py``).

Layout: every source is a row-major [M, D] matrix (M = batch * tokens). Completed sources live in one
store [S_max, M, D] written once each (never stacked again) with their rsqrt statistics cached in
rstd [S_max, M] float32. ``u = query * gain`` (formed in-kernel) turns the key RMSNorm + dot into
``s_i = rstd_i * (u . v_i)``.
A program handles one token row with the whole hidden dimension in registers (D <= 16384), a few rows at once
(the prefill block boundaries ``store_scores_kernel`` and ``store_phase1_rows_kernel``, the RMSNorm kernels), or
a range of rows in turn (the backward).

Length-like integer arguments (M, n_src, n_q, P, rows per program) are never specialised
(``do_not_specialize``): Triton would otherwise compile another variant whenever such a value becomes 1 or
a multiple of 16 (a new prompt length or batch size), i.e. inside a user's loop.
"""

import triton
import triton.language as tl


@triton.jit
def _query_key(q_ptr, g_ptr, offsets, mask):
    """u = query * gain in float32: the key RMSNorm's gain folded into the pseudo-query."""
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return q * tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pair_keys(q_ptr, g_ptr, j, n_q, D, cols, mask):
    """``_query_key`` of queries j and j + 1 of n_q (q, g [n_q, D]), scored together in one round of reductions;
    query j + 1 reads as zeros where it does not exist (j + 1 = n_q)."""
    u0 = _query_key(q_ptr + j * D, g_ptr + j * D, cols, mask)
    return u0, _query_key(q_ptr + (j + 1) * D, g_ptr + (j + 1) * D, cols, mask & (cols * 0 + j + 1 < n_q))


@triton.jit
def _sum_pair(a, b, axis: tl.constexpr):
    """(sum(a, axis), sum(b, axis)) in one reduction: one round of warp shuffles and block barriers where two tl.sum
    calls take two (for a row per program, these rounds are most of a short launch's time). Joined into one tensor:
    ``tl.reduce`` of the tuple (a, b) needs as many barriers but put the training backward over its register limit
    (56 B of stack on sm_90)."""
    return tl.split(tl.sum(tl.join(a, b), axis=axis))


@triton.jit
def _sum_two_pairs(a, b, c, d, axis: tl.constexpr):
    """The sums of a, b, c and d over ``axis`` in one round of reductions, as ``_sum_pair`` does for two."""
    ab, cd = tl.split(tl.sum(tl.join(tl.join(a, b), tl.join(c, d)), axis=axis))
    sum_a, sum_b = tl.split(ab)
    sum_c, sum_d = tl.split(cd)
    return sum_a, sum_b, sum_c, sum_d


@triton.jit
def _new_rows(x_ptr, y_ptr, offs, mask, dtype: tl.constexpr, HAS_Y: tl.constexpr):
    """Rows of a new source x (+ y) at ``offs`` [..., BLOCK_D], rounded to the store's dtype: (those rows, them in
    float32). Their rstd: ``_rstd`` of the second."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        v += tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = v.to(dtype)
    return v, v.to(tl.float32)


@triton.jit
def _rstd(vf, D, eps):
    """rsqrt(mean(v^2) + eps) of the rows vf [..., BLOCK_D] (float32, zero past D): a source's key-norm statistic."""
    return 1.0 / tl.sqrt(tl.sum(vf * vf, axis=-1) / D + eps)


@triton.jit
def store_source_kernel(x_ptr, y_ptr, slot_ptr, rstd_ptr, D, eps, HAS_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """slot[row] = x[row] (+ y[row]); rstd[row] = rsqrt(mean(slot[row]^2) + eps) of the stored (rounded) value."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    v, vf = _new_rows(x_ptr, y_ptr, row * D + cols, mask, slot_ptr.dtype.element_ty, HAS_Y)
    tl.store(slot_ptr + row * D + cols, v, mask=mask)
    tl.store(rstd_ptr + row, _rstd(vf, D, eps))


@triton.jit
def _gain(wn_ptr, cols, mask):
    """A PreNorm's gain [BLOCK_D] in float32. The one-row kernels load it with their inputs, at the top: loaded
    where it is used, after the row's reductions (and after a store, which the load could alias), its latency
    came on top of theirs."""
    return tl.load(wn_ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _prenorm_row(h, wn, D, norm_eps):
    """A sublayer's PreNorm of the row h (already in the output dtype) with the gain wn (float32, ``_gain``):
    wn * (h * rsqrt(mean(h^2) + norm_eps)), rounded to h's dtype before the gain, as transformers' RMSNorm does.
    Returns (normed row, its rsqrt)."""
    hf = h.to(tl.float32)
    hr = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + norm_eps)
    return ((hf * hr).to(h.dtype).to(tl.float32) * wn).to(h.dtype), hr


@triton.jit
def _prenorm_rows(xf, dtype: tl.constexpr, w, D, eps):
    """The PreNorm of rows: xf [BR, BLOCK_D] float32 (values of dtype ``dtype``), gain w [BLOCK_D] float32; like
    ``_prenorm_row``, x * rsqrt(mean(x^2) + eps) is rounded to ``dtype`` before the gain. Returns (normed rows in
    float32, their rsqrt [BR])."""
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    return (xf * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :], rstd


@triton.jit
def _partial_row(part_ptr, row, D, cols, mask, eps, HAS_PARTIAL: tl.constexpr):
    """The running block's partial sum (row ``row``) in float32 and its rstd, computed here (it is never stored)."""
    if HAS_PARTIAL:
        vp = tl.load(part_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        rp = 1.0 / tl.sqrt(tl.sum(vp * vp, axis=0) / D + eps)
    else:
        vp = cols.to(tl.float32) * 0.0
        rp = tl.full((), 0.0, tl.float32)
    return vp, rp


@triton.jit
def _source_tile(
    store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D,
    HAS_PARTIAL: tl.constexpr, SRC_TILE: tl.constexpr, RSTD: tl.constexpr,
):  # fmt: skip
    """Sources s0 .. s0 + SRC_TILE - 1 of one row as a [SRC_TILE, BLOCK_D] float32 tile, every row's load issued at
    once (one memory latency per tile, not per source). Source n_src is the partial sum (vp, rstd rp) with
    HAS_PARTIAL; rows past it are zeros. Returns (tile, rstd [SRC_TILE], stored, is_partial): ``stored`` marks the
    rows read from the store, ``is_partial`` the partial's row. Without RSTD the stored rows' rstd is not loaded
    (zeros): the caller takes it from the tile, in a reduction it makes anyway (``_tile_softmax``)."""
    idx = s0 + tl.arange(0, SRC_TILE)
    stored = idx < n_src
    offs = (idx.to(tl.int64) * M + row) * D
    v = tl.load(store_ptr + offs[:, None] + cols[None, :], mask=stored[:, None] & mask[None, :], other=0.0)
    v = v.to(tl.float32)
    r = tl.zeros((SRC_TILE,), tl.float32)
    if RSTD:
        r = tl.load(rstd_ptr + idx.to(tl.int64) * M + row, mask=stored, other=0.0)
    is_partial = idx == n_src
    if HAS_PARTIAL:
        v = tl.where(is_partial[:, None], vp[None, :], v)
        r = tl.where(is_partial, rp, r)
    else:
        is_partial = is_partial & stored  # no partial row: all false
    return v, r, stored, is_partial


@triton.jit
def _tile_scores(v, r, valid, u, lse):
    """Scores s = r (u . v) [SRC_TILE] of a source tile and, given the forward's log-sum-exp, the weights
    alpha = exp(s - lse) (zero on padding rows)."""
    s = r * tl.sum(v * u[None, :], axis=1)
    return s, tl.where(valid, tl.exp(s - lse), 0.0)


@triton.jit
def _scored_tile(
    store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D, u, lse,
    HAS_PARTIAL: tl.constexpr, SRC_TILE: tl.constexpr,
):  # fmt: skip
    """``_source_tile`` and its ``_tile_scores``: (tile, rstd, stored, is_partial, s, alpha)."""
    v, r, stored, is_partial = _source_tile(
        store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D, HAS_PARTIAL, SRC_TILE, True
    )
    s, alpha = _tile_scores(v, r, stored | is_partial, u, lse)
    return v, r, stored, is_partial, s, alpha


@triton.jit
def _grad_rows(s0, stored, M, row, cols, mask, D, SRC_TILE: tl.constexpr):
    """Offsets [SRC_TILE, BLOCK_D] and mask of the stored sources' gradient rows of a tile starting at source s0."""
    offs = (((s0 + tl.arange(0, SRC_TILE)).to(tl.int64) * M + row) * D)[:, None] + cols[None, :]
    return offs, stored[:, None] & mask[None, :]


@triton.jit
def _row_tile(store_ptr, rstd_ptr, part_ptr, n_src, M, row, cols, mask, D, HAS_PARTIAL: tl.constexpr,
              SRC_TILE: tl.constexpr, TILE_RSTD: tl.constexpr, APART: tl.constexpr):  # fmt: skip
    """A row whose sources (n_src stored + the partial sum) fit one [SRC_TILE, BLOCK_D] tile, every load in flight
    together: ``_source_tile`` with the partial sum's raw row vp, its rstd left to ``_tile_softmax`` (so that the
    loads need not wait for a reduction), and with TILE_RSTD the stored rows' too (not loaded). With APART the tile
    holds the stored sources only and vp stays apart (``_apart_softmax``). Returns (tile, rstd of the stored rows
    (zeros with HAS_PARTIAL and TILE_RSTD), stored, is_partial, vp)."""
    vp = cols.to(tl.float32)  # a placeholder without a partial sum (``_source_tile`` then ignores it)
    if HAS_PARTIAL:
        vp = tl.load(part_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    v, r, stored, is_partial = _source_tile(
        store_ptr, rstd_ptr, vp, 0.0, 0, n_src, M, row, cols, mask, D, HAS_PARTIAL and not APART, SRC_TILE,
        not (HAS_PARTIAL and TILE_RSTD),
    )
    return v, r, stored, is_partial, vp


@triton.jit
def _tile_softmax(v, r, stored, is_partial, u, D, eps, HAS_PARTIAL: tl.constexpr, TILE_RSTD: tl.constexpr):
    """The softmax over a ``_row_tile``: with the partial sum, its rstd comes from the scores' reduction, two sums per
    source (v . u, v . v) in one round, and with TILE_RSTD every stored row's too (``store_source_kernel``'s formula
    over the same stored values), in place of loads that ptxas issues late, after the tile's first use where
    registers are short (sm_90, the backward at 255 registers: a second memory latency per row, 8% of its stall
    samples in session 31's ncu profile). Returns (rstd, scores s, p = exp(s - max) (zero on padding rows), max,
    sum(p))."""
    if HAS_PARTIAL:
        v_u, v_v = _sum_pair(v * u[None, :], v * v, 1)
        r_tile = 1.0 / tl.sqrt(v_v / D + eps)
        r = r_tile if TILE_RSTD else tl.where(is_partial, r_tile, r)
    else:
        v_u = tl.sum(v * u[None, :], axis=1)
    s = r * v_u
    valid = stored | is_partial
    m = tl.max(tl.where(valid, s, float("-inf")), axis=0)
    p = tl.where(valid, tl.exp(s - m), 0.0)
    return r, s, p, m, tl.sum(p, axis=0)


@triton.jit
def _tile_row(x, i):
    """Element i of x [SRC_TILE] (a row sum that rode in row i of a tile's round of reductions), as a scalar: a
    masked sum over the tile's rows, which each thread holds."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == i, x, 0.0), axis=0)


@triton.jit
def _apart_softmax(v, r, stored, vp, u, D, eps, TILE_RSTD: tl.constexpr):
    """``_tile_softmax`` over a tile of stored sources v [SRC_TILE >= 2, BLOCK_D] (rstd r) and the partial sum vp
    [BLOCK_D] kept apart from it (its row would double the tile): its two sums (vp . u, vp . vp) ride in rows 0 and 1
    of the tile's round. With TILE_RSTD the stored rows' rstd comes from it too (r unused), v . v in a third tile of
    sums: the forward's choice (one memory latency per row); in the backward that third tile cost more than the
    late rstd loads (its rows of 4 + 1 sources 6% slower, session 31), so the two take the rstd of the same stored
    values, summed in another order. Returns (rstd, scores s, p = exp(s - max)
    (zero on padding rows), the partial's rstd, score and p, max, sum of all p)."""
    rows = tl.arange(0, v.shape[0])
    extra = tl.where((rows == 0)[:, None], (vp * u)[None, :], tl.where((rows == 1)[:, None], (vp * vp)[None, :], 0.0))
    if TILE_RSTD:  # (the join's fourth tile is the third again: the compiler merges the copy)
        v_sums, e_sums = tl.split(tl.sum(tl.join(tl.join(v * u[None, :], v * v), tl.join(extra, extra)), axis=1))
        v_u, v_v = tl.split(v_sums)
        e, _ = tl.split(e_sums)
        r = 1.0 / tl.sqrt(v_v / D + eps)
    else:
        v_u, e = _sum_pair(v * u[None, :], extra, 1)
    rp = 1.0 / tl.sqrt(_tile_row(e, 1) / D + eps)
    s = r * v_u
    s_p = rp * _tile_row(e, 0)
    m = tl.maximum(tl.max(tl.where(stored, s, float("-inf")), axis=0), s_p)
    p = tl.where(stored, tl.exp(s - m), 0.0)
    p_p = tl.exp(s_p - m)
    return r, s, p, rp, s_p, p_p, m, tl.sum(p, axis=0) + p_p


@triton.jit(do_not_specialize=["n_src", "M"])
def depth_attn_fwd_kernel(
    store_ptr, rstd_ptr, part_ptr, q_ptr, g_ptr, wn_ptr, out_ptr, lse_ptr, hrstd_ptr,
    n_src, M, D, eps, norm_eps,
    HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr, SRC_TILE: tl.constexpr,
    ONE_TILE: tl.constexpr, APART: tl.constexpr,
):  # fmt: skip
    """h[row] = softmax-weighted sum of the n_src stored sources (+ the partial sum), online softmax over tiles of
    SRC_TILE sources (a tile's loads are issued together, with one cross-warp reduction per tile; which tile is
    fastest is measured, not assumed: ``fused.FWD_SOURCE_TILE``). ONE_TILE (every source and the partial fit one
    tile of SRC_TILE): ``_row_tile`` and ``_tile_softmax``, the partial's rstd joined to the scores' reduction.
    APART (with ONE_TILE and HAS_PARTIAL): SRC_TILE stored sources on the tile and the partial sum apart from it
    (``_apart_softmax``), as the backward's APART: one memory latency per row where the online softmax over tiles
    of one source waited for each source in turn.

    With HAS_NORM the sublayer's PreNorm is fused: out = wn * (h * rsqrt(mean(h^2) + norm_eps)) (rounded to the
    output dtype before the gain, as transformers' RMSNorm does) and h itself is never written.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    u = _query_key(q_ptr, g_ptr, cols, mask)
    if HAS_NORM:  # with the inputs, in its own dtype until used (96 registers at D 2048, 4 warps; 90 before)
        wn = tl.load(wn_ptr + cols, mask=mask, other=0.0)
    if ONE_TILE:
        v, r, stored, is_partial, vp = _row_tile(
            store_ptr, rstd_ptr, part_ptr, n_src, M, row, cols, mask, D, HAS_PARTIAL, SRC_TILE, True, APART
        )
        if APART:
            _, _, p, _, _, p_p, m, denom = _apart_softmax(v, r, stored, vp, u, D, eps, True)
            acc = tl.sum(p[:, None] * v, axis=0) + p_p * vp
        else:
            _, _, p, m, denom = _tile_softmax(v, r, stored, is_partial, u, D, eps, HAS_PARTIAL, True)
            acc = tl.sum(p[:, None] * v, axis=0)
    else:
        vp, rp = _partial_row(part_ptr, row, D, cols, mask, eps, HAS_PARTIAL)
        n_all = n_src
        if HAS_PARTIAL:
            n_all = n_src + 1
        m = tl.full((), float("-inf"), tl.float32)
        denom = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for s0 in range(0, n_all, SRC_TILE):
            v, r, stored, is_partial = _source_tile(
                store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D, HAS_PARTIAL, SRC_TILE, True
            )
            s = tl.where(stored | is_partial, r * tl.sum(v * u[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))  # finite: every tile holds a source
            p = tl.exp(s - m_new)
            scale = tl.exp(m - m_new)
            denom = denom * scale + tl.sum(p, axis=0)
            acc = acc * scale + tl.sum(p[:, None] * v, axis=0)
            m = m_new
    h = (acc / denom).to(out_ptr.dtype.element_ty)
    if HAS_NORM:
        h, hr = _prenorm_row(h, wn.to(tl.float32), D, norm_eps)
        tl.store(hrstd_ptr + row, hr)
    tl.store(out_ptr + row * D + cols, h, mask=mask)
    tl.store(lse_ptr + row, m + tl.log(denom))


@triton.jit
def _prenorm_bwd(h, dout, wn, hr, D, dtype: tl.constexpr):
    """Backward of the fused PreNorm out = wn * (h * hr).to(dtype): (dh, this row's gain gradient)."""
    xhat = h.to(dtype).to(tl.float32) * hr  # the rounded h the forward normalised
    g = dout * wn
    return hr * (g - xhat * (tl.sum(g * xhat, axis=0) / D)), dout * xhat.to(dtype).to(tl.float32)


@triton.jit
def _tile_dh(v, vp, h, dout, wn, hr, D, dtype: tl.constexpr, HAS_NORM: tl.constexpr, APART: tl.constexpr):
    """dh (the gradient of h [BLOCK_D], from dout through the fused PreNorm with HAS_NORM, as ``_prenorm_bwd``) and
    (v_i - h) . dh [SRC_TILE] of a one-tile row, every sum over D in one round of reductions (the PreNorm's sum,
    dh . v_i and dh . h took three). With APART the partial sum vp [BLOCK_D] is not in the tile (of at least two
    rows), and its (vp - h) . dh comes from the same round. Returns (dh, those dots, the partial's (zero without
    APART), this row's gain gradient (zeros without HAS_NORM)).

    dh = hr (g - K xq) with g = dout wn, xq the rounded h times hr and K = (g . xq) / D depends on one of the sums,
    so the others are taken against g and xq and combined: (v_i - h) . dh = hr ((v_i - h) . g - K (v_i - h) . xq).
    Each sum is over v_i - h, not v_i and h apart: the softmax's ds_i = alpha_i (v_i - h) . dh, and the difference
    dh . v_i - dh . h cancels most of the two sums' digits (session 30, fp32 under the interpreter against float64:
    the query's gradient at 3.2e-6 against 6.9e-6 with the two sums, the sources' at 1.4e-6 against 1.8e-6)."""
    rows = tl.arange(0, v.shape[0])
    first = (rows == 0)[:, None]
    centred = v - h[None, :]
    cp = vp - h  # (used only with APART)
    if HAS_NORM:
        xq = h.to(dtype).to(tl.float32) * hr  # the rounded h the forward normalised
        g = dout * wn
        # the row sums ride in rows 0 and 1 of the round's second pair: g . xq, and with APART (vp - h) . g and
        # (vp - h) . xq (without it the pair is g . xq twice: the compiler merges the copy)
        if APART:
            extra = tl.where(first, (g * xq)[None, :], tl.where((rows == 1)[:, None], (cp * g)[None, :], 0.0))
            extra2 = tl.where(first, (cp * xq)[None, :], 0.0)
        else:
            extra = tl.where(first, (g * xq)[None, :], 0.0)
            extra2 = extra
        sums = tl.sum(tl.join(tl.join(centred * g[None, :], centred * xq[None, :]), tl.join(extra, extra2)), axis=1)
        c_sums, row_sums = tl.split(sums)
        c_g, c_xq = tl.split(c_sums)
        e, e2 = tl.split(row_sums)
        k = _tile_row(e, 0) / D
        cp_dh = 0.0
        if APART:
            cp_dh = hr * (_tile_row(e, 1) - k * _tile_row(e2, 0))
        return hr * (g - xq * k), hr * (c_g - k * c_xq), cp_dh, dout * xq.to(dtype).to(tl.float32)
    else:
        if APART:
            c_dh, e = _sum_pair(centred * dout[None, :], tl.where(first, (cp * dout)[None, :], 0.0), 1)
            return dout, c_dh, _tile_row(e, 0), dout * 0.0
        else:
            return dout, tl.sum(centred * dout[None, :], axis=1), 0.0, dout * 0.0


@triton.jit
def _tile_grad(v, r, s, alpha, u, dh, c_dh, D):
    """Gradients of a source tile: dv = alpha dh + ds (r u - s r^2 v / D) [SRC_TILE, BLOCK_D] and ds r [SRC_TILE],
    with ds = alpha (dh . v - dh . h) (c_dh = dh . v - dh . h per source)."""
    ds = alpha * c_dh
    dv = alpha[:, None] * dh[None, :] + ds[:, None] * (r[:, None] * u[None, :] - (s * r * r / D)[:, None] * v)
    return dv, ds * r


@triton.jit(do_not_specialize=["n_src", "M", "rows_per_program"])
def depth_attn_bwd_kernel(
    store_ptr, rstd_ptr, part_ptr, q_ptr, g_ptr, wn_ptr, dout_ptr, lse_ptr, hrstd_ptr, gstore_ptr, dpart_ptr, du_ptr,
    dwn_ptr, dh_ptr, coef_ptr, u_ptr,
    n_src, M, D, eps, rows_per_program,
    HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr, SRC_TILE: tl.constexpr,
    ONE_TILE: tl.constexpr, DEFER: tl.constexpr, COEF_PAD: tl.constexpr, APART: tl.constexpr,
    ROW_PARAMS: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Backward of ``depth_attn_fwd_kernel`` for a range of rows: the weights alpha_i (recomputed) and
    h = sum_i alpha_i v_i (with HAS_NORM also the PreNorm backward: dh from dout, and the gain's gradient dwn), then
    per source ds_i = alpha_i (dh . v_i - dh . h) (dh . h is the softmax's mean),
    dv_i = alpha_i dh + ds_i (r_i u - s_i r_i^2 v_i / D), du += ds_i r_i v_i.

    ONE_TILE (all sources and the partial fit one tile of SRC_TILE): the tile is loaded once, together with the
    stored sources' gradient rows, and kept in registers; alpha is the softmax of its scores. Otherwise two passes
    over the tiles (h, then the gradients; the second reads the row's sources again, from cache), with
    alpha_i = exp(s_i - lse) from the forward's log-sum-exp.
    Stored sources' gradients are ACCUMULATED into gstore (a block's gradient sums over every later reader), or
    without ACCUMULATE stored there (the first writer of those rows: no read of them); the partial sum's gradient
    is written to dpart; each program writes its partial du (and dwn) row, reduced by
    ``param_grad_kernel`` (deterministic).

    APART (with ONE_TILE and HAS_PARTIAL): the tile holds the stored sources only, and the partial sum is a row of its
    own beside it (``_apart_softmax``, ``_tile_dh``): 4 stored sources and the partial would take a tile of 8, whose
    registers at 8 warps leave one program per SM, where a tile of 4 at 4 warps leaves two; 2 and the partial a tile
    of 4 with a padding row, where a tile of 2 takes a narrow launch (``fused._narrow_launch``).
    EVEN_D: D is BLOCK_D (no column past D: sm_90, D 2048, 1-8% fewer instructions per row).
    ROW_PARAMS: the query, gain and PreNorm weight are re-read for every row (from L1) instead of held by the
    program, 32 registers fewer to hold where the launch caps them to fit more programs per SM.
    STAGES: Triton's software pipelining of the row loop (``fused.BWD_STAGES``): the next rows' loads in flight
    through shared memory while this row computes.

    DEFER (needs ONE_TILE): the stored sources' gradients are not touched here. Each of them is
    dv_i = alpha_i dh + c_i u - e_i v_i with c_i = ds_i r_i and e_i = ds_i s_i r_i^2 / D, so the row's dh goes to
    dh [M, D] and (alpha_i, c_i, e_i) to coef [M, 3, COEF_PAD] float32 (COEF_PAD >= n_src), program 0 writes u
    [D] float32, and ``deferred_grad_kernel`` later adds the sum over a group of readers of the same sources into
    gstore in one pass: a group of K readers then reads and writes each stored gradient once, not K times.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    if EVEN_D:  # D == BLOCK_D: a mask true at compile time, so no predicated loads or selects (fewer instructions)
        mask = cols < BLOCK_D
    else:
        mask = cols < D
    if not ROW_PARAMS:
        u = _query_key(q_ptr, g_ptr, cols, mask)
        if HAS_NORM:
            wn = _gain(wn_ptr, cols, mask)
    du = tl.zeros((BLOCK_D,), tl.float32)
    dwn = tl.zeros((BLOCK_D,), tl.float32)
    n_all = n_src
    if HAS_PARTIAL:
        n_all = n_src + 1
    row_start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: S_max * M * D may exceed 2^31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in tl.range(row_start, row_end, num_stages=STAGES):
        if ROW_PARAMS:
            u = _query_key(q_ptr, g_ptr, cols, mask)
            if HAS_NORM:
                wn = _gain(wn_ptr, cols, mask)
        dout = tl.load(dout_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            hr = tl.load(hrstd_ptr + row)
        if ONE_TILE:
            # Every load of the row goes out before the first reduction (the sources with the partial sum's raw row,
            # their gradient rows), and the partial's rstd comes from the scores' reduction: two rounds in all.
            # the stored rows' rstd from the tile only where their gradients are deferred and the partial is in the
            # tile: the direct rows hold their gradient rows (on a tile of 2 at 168 registers they spill 56 B, not
            # 36, 4% slower), and apart it takes a third tile of sums (``_apart_softmax``) (session 31)
            v, r, stored, is_partial, vp = _row_tile(
                store_ptr, rstd_ptr, part_ptr, n_src, M, row, cols, mask, D, HAS_PARTIAL, SRC_TILE,
                DEFER and not APART, APART,
            )
            g_offs, g_mask = _grad_rows(0, stored, M, row, cols, mask, D, SRC_TILE)
            if not DEFER and ACCUMULATE:
                g_old = tl.load(gstore_ptr + g_offs, mask=g_mask, other=0.0)
            # the softmax of the recomputed scores (the whole row is in the tile): its weights sum to one, where
            # exp(s - lse) with the forward's lse carried the two summations' difference into every gradient
            if APART:
                r, s, p, rp, s_p, p_p, _, denom = _apart_softmax(v, r, stored, vp, u, D, eps, False)
                a_p = p_p / denom
            else:
                r, s, p, _, denom = _tile_softmax(v, r, stored, is_partial, u, D, eps, HAS_PARTIAL, DEFER)
            alpha = p / denom
            h = tl.sum(alpha[:, None] * v, axis=0)
            if APART:
                h += a_p * vp
        else:
            lse = tl.load(lse_ptr + row)
            vp, rp = _partial_row(part_ptr, row, D, cols, mask, eps, HAS_PARTIAL)
            h = tl.zeros((BLOCK_D,), tl.float32)
            for s0 in range(0, n_all, SRC_TILE):
                v, r, stored, is_partial, s, alpha = _scored_tile(
                    store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D, u, lse, HAS_PARTIAL, SRC_TILE
                )
                h += tl.sum(alpha[:, None] * v, axis=0)
        if ONE_TILE:
            if HAS_NORM:
                dh, c_dh, cp_dh, dwn_row = _tile_dh(v, vp, h, dout, wn, hr, D, dout_ptr.dtype.element_ty, True, APART)
                dwn += dwn_row
            else:
                dh, c_dh, cp_dh, _ = _tile_dh(v, vp, h, dout, dout, 0.0, D, dout_ptr.dtype.element_ty, False, APART)
            dv, ds_r = _tile_grad(v, r, s, alpha, u, dh, c_dh, D)
            if DEFER:
                tl.store(dh_ptr + row * D + cols, dh.to(dh_ptr.dtype.element_ty), mask=mask)
                c_offs = row * 3 * COEF_PAD + tl.arange(0, SRC_TILE)
                tl.store(coef_ptr + c_offs, alpha, mask=stored)
                tl.store(coef_ptr + c_offs + COEF_PAD, ds_r, mask=stored)
                tl.store(coef_ptr + c_offs + 2 * COEF_PAD, ds_r * s * r / D, mask=stored)
            else:
                if ACCUMULATE:
                    dv += g_old.to(tl.float32)
                tl.store(gstore_ptr + g_offs, dv.to(gstore_ptr.dtype.element_ty), mask=g_mask)
            du += tl.sum(ds_r[:, None] * v, axis=0)
            if DEFER and HAS_PARTIAL and not APART:
                # only the partial's row of the tile's gradient is used (the stored rows' wait in coef): its row of
                # ``_tile_grad`` as a tile of one, its values picked out of the tile, the rest of dv left dead (sm_90,
                # tile of 4: 1608 SASS instructions per row loop, not 1821)
                vp = tl.sum(tl.where(is_partial[:, None], v, 0.0), axis=0)
                rp, s_p, a_p = _tile_row(r, n_src), _tile_row(s, n_src), _tile_row(alpha, n_src)
                cp_dh = _tile_row(c_dh, n_src)
            if APART or (DEFER and HAS_PARTIAL):  # the partial's row of ``_tile_grad``, as a tile of one
                one = tl.zeros((1,), tl.float32)
                dv_p, dsr_p = _tile_grad(vp[None, :], rp + one, s_p + one, a_p + one, u, dh, cp_dh + one, D)
                dvp = tl.sum(dv_p, axis=0)
                if APART:
                    du += tl.sum(dsr_p[:, None] * vp[None, :], axis=0)
            else:
                dvp = tl.sum(tl.where(is_partial[:, None], dv, 0.0), axis=0)
        else:
            if HAS_NORM:
                dh, dwn_row = _prenorm_bwd(h, dout, wn, hr, D, dout_ptr.dtype.element_ty)
                dwn += dwn_row
            else:
                dh = dout
            # dh . h apart: summing v - h as ``_tile_dh`` does keeps h live through the loop (388 B of spills, not 200)
            dh_h = tl.sum(dh * h, axis=0)
            dvp = tl.zeros((BLOCK_D,), tl.float32)
            for s0 in range(0, n_all, SRC_TILE):
                v, r, stored, is_partial, s, alpha = _scored_tile(
                    store_ptr, rstd_ptr, vp, rp, s0, n_src, M, row, cols, mask, D, u, lse, HAS_PARTIAL, SRC_TILE
                )
                dv, ds_r = _tile_grad(v, r, s, alpha, u, dh, tl.sum(v * dh[None, :], axis=1) - dh_h, D)
                g_offs, g_mask = _grad_rows(s0, stored, M, row, cols, mask, D, SRC_TILE)
                if ACCUMULATE:
                    dv += tl.load(gstore_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
                tl.store(gstore_ptr + g_offs, dv.to(gstore_ptr.dtype.element_ty), mask=g_mask)
                du += tl.sum(ds_r[:, None] * v, axis=0)
                dvp += tl.sum(tl.where(is_partial[:, None], dv, 0.0), axis=0)
        if HAS_PARTIAL:
            tl.store(dpart_ptr + row * D + cols, dvp.to(dpart_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + pid * D + cols, du, mask=mask)
    if HAS_NORM:
        tl.store(dwn_ptr + pid * D + cols, dwn, mask=mask)
    if DEFER:
        if pid == 0:
            tl.store(u_ptr + cols, _query_key(q_ptr, g_ptr, cols, mask), mask=mask)


@triton.jit(do_not_specialize=["n_src", "M"])
def deferred_grad_kernel(
    store_ptr, gstore_ptr, dh_ptr, coef_ptr, u_ptr, n_src, M, D,
    K: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """The stored sources' gradients from K readers of the same n_src sources (``depth_attn_bwd_kernel`` with
    DEFER), one row per program: gstore[i] += sum_k (alpha_ki dh_k + c_ki u_k) - (sum_k e_ki) v_i for i < n_src,
    from dh [K, M, D], coef [K, M, 3, N_PAD] float32 and u [K, D] float32. The sum over readers stays in float32
    registers ([N_PAD, BLOCK_D]) and each gradient row is read and written once (without ACCUMULATE only written:
    gstore[i] = that sum)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    src = tl.arange(0, N_PAD)
    stored = src < n_src
    acc = tl.zeros((N_PAD, BLOCK_D), tl.float32)
    e = tl.zeros((N_PAD,), tl.float32)
    for k in tl.static_range(K):  # unrolled: every reader's loads can be in flight together
        dh = tl.load(dh_ptr + (k * M + row) * D + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + k * D + cols, mask=mask, other=0.0)
        c_offs = (k * M + row) * 3 * N_PAD + src
        alpha = tl.load(coef_ptr + c_offs, mask=stored, other=0.0)
        c = tl.load(coef_ptr + c_offs + N_PAD, mask=stored, other=0.0)
        e += tl.load(coef_ptr + c_offs + 2 * N_PAD, mask=stored, other=0.0)
        acc += alpha[:, None] * dh[None, :] + c[:, None] * u[None, :]
    offs = (src.to(tl.int64)[:, None] * M + row) * D + cols[None, :]
    smask = stored[:, None] & mask[None, :]
    v = tl.load(store_ptr + offs, mask=smask, other=0.0).to(tl.float32)
    acc -= e[:, None] * v
    if ACCUMULATE:
        acc += tl.load(gstore_ptr + offs, mask=smask, other=0.0).to(tl.float32)
    tl.store(gstore_ptr + offs, acc.to(gstore_ptr.dtype.element_ty), mask=smask)


@triton.jit(do_not_specialize=["P"])
def param_grad_kernel(
    du_ptr, dwn_ptr, q_ptr, g_ptr, dq_ptr, dg_ptr, dwn_out_ptr, P, D,
    HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Finish the depth attention's backward in one launch: sum the P per-program rows of du (and dwn) [P, D],
    then dq = du * g and dg = du * q (u = q * g), each in its parameter's dtype. A program owns BLOCK columns
    and reads [ROWS, BLOCK] tiles (a row at a time would leave the loop bound by load latency)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    du = tl.zeros((BLOCK,), tl.float32)
    dwn = tl.zeros((BLOCK,), tl.float32)
    for p0 in range(0, P, ROWS):
        rows = p0 + tl.arange(0, ROWS)
        tile_mask = (rows < P)[:, None] & mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        du += tl.sum(tl.load(du_ptr + offs, mask=tile_mask, other=0.0), axis=0)
        if HAS_NORM:
            dwn += tl.sum(tl.load(dwn_ptr + offs, mask=tile_mask, other=0.0), axis=0)
    q = tl.load(q_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dq_ptr + cols, (du * g).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + cols, (du * q).to(dg_ptr.dtype.element_ty), mask=mask)
    if HAS_NORM:
        tl.store(dwn_out_ptr + cols, dwn.to(dwn_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _phase1_query(
    v, r, valid, u, out_ptr, lse_ptr, j, M, D, row, cols, mask, WRITE_OUT: tl.constexpr, FIRST_OUT: tl.constexpr
):  # fmt: skip
    """Phase 1 of query j (u = its pseudo-query times its key-norm gain, ``_query_key``) for one row whose sources
    are the register tile v [N_PAD, BLOCK_D] (rstd r, rows ``valid``): all its scores in one reduction over D, its
    output in one over the sources (within a thread).
    Stores lse[j, row] and, with WRITE_OUT, out[j, row]; returns the output row (rounded to out's dtype). Without
    WRITE_OUT the row has one source, which is its output exactly (a softmax over one score is 1): the launcher
    returns that stored source as every query's output instead of Q copies of it. Without FIRST_OUT, out holds
    queries 1 .. n_q - 1 (query j at out[j - 1]) and query 0's output is only returned (``store_phase1_kernel``
    writes its PreNorm instead)."""
    s = tl.where(valid, r * tl.sum(v * u[None, :], axis=1), float("-inf"))
    m = tl.max(s, axis=0)
    p = tl.exp(s - m)  # zero on padding rows
    denom = tl.sum(p, axis=0)
    tl.store(lse_ptr + j * M + row, m + tl.log(denom))
    h = tl.sum((p / denom)[:, None] * v, axis=0).to(out_ptr.dtype.element_ty)
    if WRITE_OUT:
        if FIRST_OUT:
            tl.store(out_ptr + (j * M + row) * D + cols, h, mask=mask)
        elif j > 0:
            tl.store(out_ptr + ((j - 1) * M + row) * D + cols, h, mask=mask)
    return h


@triton.jit
def _phase1_one_tile(
    store_ptr, rstd_ptr, q_ptr, g_ptr, out_ptr, lse_ptr, n_src, n_q, M, D, row,
    N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_OUT: tl.constexpr,
):  # fmt: skip
    """Phase 1 of one row whose n_src <= N_PAD sources fit one [N_PAD, BLOCK_D] register tile (BLOCK_D >= D): the
    tile is loaded once, every load in flight together. (A function of its own: in the kernel's body its 2-D tile
    would share a name with the other path's 1-D rows, which Triton's loops refuse.)"""
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    v, r, stored, _ = _source_tile(  # no partial sum in phase 1: its row and rstd arguments are unused
        store_ptr, rstd_ptr, cols.to(tl.float32), 0.0, 0, n_src, M, row, cols, mask, D, False, N_PAD, True
    )
    for j in range(n_q):
        u = _query_key(q_ptr + j * D, g_ptr + j * D, cols, mask)
        _phase1_query(v, r, stored, u, out_ptr, lse_ptr, j, M, D, row, cols, mask, WRITE_OUT, True)


@triton.jit(do_not_specialize=["n_prev", "n_q", "M"])
def store_phase1_kernel(
    x_ptr, y_ptr, store_ptr, rstd_ptr, q_ptr, g_ptr, wn_ptr, out_ptr, lse_ptr, first_ptr,
    n_prev, n_q, M, D, eps, norm_eps,
    HAS_Y: tl.constexpr, HAS_NORM: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_OUT: tl.constexpr, FIRST_OUT: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """A block boundary at inference in one launch: source n_prev = x (+ y) is stored with its rstd (as
    ``store_source_kernel``), then phase 1 runs the n_q queries against sources 0 .. n_prev, held in one
    [N_PAD, BLOCK_D] register tile (the new source straight from registers). With HAS_NORM, query 0's sublayer
    input goes to first [M, D]: the PreNorm of its output (a block's first sublayer has no partial sum).
    WRITE_OUT, FIRST_OUT: see ``_phase1_query`` (WRITE_OUT off when the new source is the only one; FIRST_OUT off
    when ``first`` replaces query 0's output). Without STORE the new source is not written, only its rstd: x is its
    slot already (an embedding gathered into slot 0).

    Program ``row * n_q + j`` runs query j of its row; the j = 0 program stores the new source. The queries run side
    by side (a row's programs adjacent in launch order, so that its sources come from L2 after the first read),
    which shortens a launch whose rows cannot fill the GPU (decoding; prefill: ``store_phase1_rows_kernel``)."""
    row = (tl.program_id(0) // n_q).to(tl.int64)
    j0 = tl.program_id(0) % n_q
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # Every load first (the stored sources, the first query, the gain, the new source's summands): in program order
    # after the new source's reduction and store, the tile's loads waited for them (a second memory latency).
    v, r, stored, _ = _source_tile(  # rows 0 .. n_prev - 1; the new source's row n_prev is filled below
        store_ptr, rstd_ptr, cols.to(tl.float32), 0.0, 0, n_prev, M, row, cols, mask, D, False, N_PAD, True
    )
    u = _query_key(q_ptr + j0 * D, g_ptr + j0 * D, cols, mask)
    if HAS_NORM:
        wn = _gain(wn_ptr, cols, mask)
    v_new, v_new_f = _new_rows(x_ptr, y_ptr, row * D + cols, mask, store_ptr.dtype.element_ty, HAS_Y)
    r_new = _rstd(v_new_f, D, eps)
    if j0 == 0:
        if STORE:
            tl.store(store_ptr + (n_prev * M + row) * D + cols, v_new, mask=mask)
        tl.store(rstd_ptr + n_prev * M + row, r_new)
    is_new = tl.arange(0, N_PAD) == n_prev
    v = tl.where(is_new[:, None], v_new_f[None, :], v)
    r = tl.where(is_new, r_new, r)
    valid = stored | is_new
    h = _phase1_query(v, r, valid, u, out_ptr, lse_ptr, j0, M, D, row, cols, mask, WRITE_OUT, FIRST_OUT)
    if HAS_NORM:
        if j0 == 0:
            first = _prenorm_row(h, wn, D, norm_eps)[0]
            tl.store(first_ptr + row * D + cols, first, mask=mask)


@triton.jit
def _rows_summands(v, v_new, u, NEW_APART: tl.constexpr):
    """The summands of one query's scores over a row group, reduced over D by the caller (alone, or joined with
    another query's): v * u [BR, N_PAD, BLOCK_D] for the tile of sources and, with NEW_APART, the new source's
    v_new * u [BR, BLOCK_D] in row 0 of a tile of v's shape (zeros elsewhere: its sum over D and the sources is the
    new source's dot). Without NEW_APART the second is the first again (unused)."""
    a = v * u[None, None, :]
    b = a
    if NEW_APART:
        b = tl.where((tl.arange(0, v.shape[1]) == 0)[None, :, None], (v_new * u[None, :])[:, None, :], 0.0)
    return a, b


@triton.jit
def _rows_output(
    v_u, new_u, v, r, valid, v_new, r_new, out_ptr, lse_ptr, j, M, D, rows, rmask, cols, cmask,
    NEW_APART: tl.constexpr, FIRST_OUT: tl.constexpr,
):  # fmt: skip
    """Query j's softmax and output over a row group, given its dots with the tile of sources v_u [BR, N_PAD] and,
    with NEW_APART, with the new source (new_u [BR, N_PAD], zero past row 0; v_new [BR, BLOCK_D], rstd r_new [BR]).
    Stores lse[j, rows] and out[j, rows] (out[j - 1] without FIRST_OUT, nothing for j = 0) where ``rmask`` [BR];
    returns the output rows [BR, BLOCK_D] (rounded to out's dtype)."""
    s = tl.where(valid, r * v_u, float("-inf"))
    if NEW_APART:
        s_new = r_new * tl.sum(new_u, axis=1)
        m = tl.maximum(tl.max(s, axis=1), s_new)
        p_new = tl.exp(s_new - m)
        p = tl.exp(s - m[:, None])  # zero on padding sources
        denom = tl.sum(p, axis=1) + p_new
        h = tl.sum((p / denom[:, None])[:, :, None] * v, axis=1) + (p_new / denom)[:, None] * v_new
    else:
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])  # zero on padding sources
        denom = tl.sum(p, axis=1)
        h = tl.sum((p / denom[:, None])[:, :, None] * v, axis=1)
    tl.store(lse_ptr + j * M + rows, m + tl.log(denom), mask=rmask)
    h = h.to(out_ptr.dtype.element_ty)
    mask = rmask[:, None] & cmask[None, :]
    if FIRST_OUT:
        tl.store(out_ptr + (j * M + rows[:, None]) * D + cols[None, :], h, mask=mask)
    elif j > 0:
        tl.store(out_ptr + ((j - 1) * M + rows[:, None]) * D + cols[None, :], h, mask=mask)
    return h


@triton.jit
def _phase1_rows_query(
    v, r, valid, v_new, r_new, u, out_ptr, lse_ptr, j, M, D, rows, rmask, cols, cmask,
    NEW_APART: tl.constexpr, FIRST_OUT: tl.constexpr,
):  # fmt: skip
    """``_phase1_query`` for BR rows at once: their sources are the register tile v [BR, N_PAD, BLOCK_D] (rstd
    r [BR, N_PAD], sources ``valid`` [1, N_PAD]); every row's scores come from one reduction over D. With NEW_APART
    the rows' new source v_new [BR, BLOCK_D] (rstd r_new [BR]) is one more source, kept apart from the tile (it would
    double it): its score rides in row 0 of the tile's round (``_sum_pair``). Stores and returns as
    ``_rows_output``."""
    a, b = _rows_summands(v, v_new, u, NEW_APART)
    if NEW_APART:
        v_u, new_u = _sum_pair(a, b, 2)
    else:
        v_u = tl.sum(a, axis=2)
        new_u = v_u
    return _rows_output(v_u, new_u, v, r, valid, v_new, r_new, out_ptr, lse_ptr, j, M, D, rows, rmask, cols, cmask,
                        NEW_APART, FIRST_OUT)  # fmt: skip


@triton.jit
def _phase1_rows_pair(
    v, r, valid, v_new, r_new, q_ptr, g_ptr, out_ptr, lse_ptr, j, n_q, M, D, rows, rmask, cols, cmask,
    NEW_APART: tl.constexpr, FIRST_OUT: tl.constexpr,
):  # fmt: skip
    """``_phase1_rows_query`` for queries j and j + 1 with both queries' scores from one round of reductions over D
    (a query's round is a chain of shuffles and block barriers: pairs halve their number); query j + 1 exists only
    if j + 1 < n_q (else nothing of it is stored: ``_pair_keys``). Returns query j's output rows."""
    u0, u1 = _pair_keys(q_ptr, g_ptr, j, n_q, D, cols, cmask)
    a0, b0 = _rows_summands(v, v_new, u0, NEW_APART)
    a1, b1 = _rows_summands(v, v_new, u1, NEW_APART)
    if NEW_APART:
        v_u0, v_u1, new_u0, new_u1 = _sum_two_pairs(a0, a1, b0, b1, 2)
    else:
        v_u0, v_u1 = _sum_pair(a0, a1, 2)
        new_u0, new_u1 = v_u0, v_u1
    h = _rows_output(v_u0, new_u0, v, r, valid, v_new, r_new, out_ptr, lse_ptr, j, M, D, rows, rmask, cols, cmask,
                     NEW_APART, FIRST_OUT)  # fmt: skip
    _rows_output(v_u1, new_u1, v, r, valid, v_new, r_new, out_ptr, lse_ptr, j + 1, M, D, rows,
                 rmask & (rows * 0 + j + 1 < n_q), cols, cmask, NEW_APART, FIRST_OUT)  # fmt: skip
    return h


@triton.jit(do_not_specialize=["n_prev", "n_q", "M"])
def store_phase1_rows_kernel(
    x_ptr, y_ptr, store_ptr, rstd_ptr, q_ptr, g_ptr, wn_ptr, out_ptr, lse_ptr, first_ptr,
    n_prev, n_q, M, D, eps, norm_eps,
    HAS_Y: tl.constexpr, HAS_NORM: tl.constexpr, FIRST_OUT: tl.constexpr, N_PAD: tl.constexpr,
    NEW_APART: tl.constexpr, BR: tl.constexpr, BLOCK_D: tl.constexpr, QUERY_PAIRS: tl.constexpr,
):  # fmt: skip
    """The prefill block boundary over n_prev >= 1 stored sources, every query of BR rows per program:
    ``store_phase1_kernel``'s work (store x (+ y) as source n_prev, phase 1 of every query over sources
    0 .. n_prev, query 0's PreNorm into first with HAS_NORM) with the rows' sources in one [BR, N_PAD, BLOCK_D]
    register tile, read once, and each query's u loaded and reduced once per BR rows. NEW_APART (n_prev a power of
    two, N_PAD = n_prev): the new source is kept apart from the tile of stored ones, which it would double.
    QUERY_PAIRS: the queries' scores two at a time, in one round of reductions (``_phase1_rows_pair``). A kernel
    of its own, with no runtime choice of the program's queries: one kernel for both layouts, a runtime range of
    queries per program, took 2-27% longer than this one (session 27, H100, M 8192 D 2048)."""
    dtype = store_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    src = tl.arange(0, N_PAD)
    stored = src < n_prev
    is_new = src == n_prev  # (never, with NEW_APART)
    # Every load first, as in store_phase1_kernel: the stored sources, query 0, the gain, the new source's summands
    slots = src.to(tl.int64)[None, :] * M + rows[:, None]  # [BR, N_PAD]
    smask = rmask[:, None] & stored[None, :]
    v = tl.load(store_ptr + slots[:, :, None] * D + cols[None, None, :], mask=smask[:, :, None] & cmask[None, None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    r = tl.load(rstd_ptr + slots, mask=smask, other=0.0)
    if not QUERY_PAIRS:
        u = _query_key(q_ptr, g_ptr, cols, cmask)
    if HAS_NORM:
        wn = _gain(wn_ptr, cols, cmask)
    offs = rows[:, None] * D + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    v_new, v_new_f = _new_rows(x_ptr, y_ptr, offs, mask, dtype, HAS_Y)
    tl.store(store_ptr + (n_prev * M + rows[:, None]) * D + cols[None, :], v_new, mask=mask)
    r_new = _rstd(v_new_f, D, eps)
    tl.store(rstd_ptr + n_prev * M + rows, r_new, mask=rmask)
    valid = stored[None, :]
    if not NEW_APART:  # the new source in the tile's row n_prev
        v = tl.where(is_new[None, :, None], v_new_f[:, None, :], v)
        r = tl.where(is_new[None, :], r_new[:, None], r)
        valid = (stored | is_new)[None, :]
    if QUERY_PAIRS:
        h = _phase1_rows_pair(v, r, valid, v_new_f, r_new, q_ptr, g_ptr, out_ptr, lse_ptr, 0, n_q, M, D, rows, rmask,
                              cols, cmask, NEW_APART, FIRST_OUT)  # fmt: skip
    else:
        h = _phase1_rows_query(v, r, valid, v_new_f, r_new, u, out_ptr, lse_ptr, 0, M, D, rows, rmask, cols, cmask,
                               NEW_APART, FIRST_OUT)  # fmt: skip
    if HAS_NORM:
        first = _prenorm_rows(h.to(tl.float32), dtype, wn, D, norm_eps)[0]
        tl.store(first_ptr + offs, first.to(dtype), mask=mask)
    if QUERY_PAIRS:
        for j in range(2, n_q, 2):
            _phase1_rows_pair(v, r, valid, v_new_f, r_new, q_ptr, g_ptr, out_ptr, lse_ptr, j, n_q, M, D, rows, rmask,
                              cols, cmask, NEW_APART, FIRST_OUT)  # fmt: skip
    else:
        for j in range(1, n_q):
            u = _query_key(q_ptr + j * D, g_ptr + j * D, cols, cmask)
            _phase1_rows_query(v, r, valid, v_new_f, r_new, u, out_ptr, lse_ptr, j, M, D, rows, rmask, cols, cmask,
                               NEW_APART, FIRST_OUT)  # fmt: skip


@triton.jit(do_not_specialize=["n_q", "M"])
def store_scores_kernel(
    x_ptr, y_ptr, slot_ptr, rstd_ptr, q_ptr, g_ptr, wn_ptr, lse_ptr, first_ptr,
    n_q, M, D, eps, norm_eps,
    HAS_Y: tl.constexpr, HAS_NORM: tl.constexpr, BR: tl.constexpr, BLOCK_D: tl.constexpr, STORE: tl.constexpr,
    QUERY_PAIRS: tl.constexpr,
):  # fmt: skip
    """The block boundary that stores the first source, BR rows per program: slot = x (+ y) with its rstd (without
    STORE only the rstd: x is the slot already; QUERY_PAIRS: the queries' dots two at a time), then
    phase 1 over that lone source, whose output is the source itself and whose lse is its score,
    lse[j] = rstd * (u_j . v), for each of the n_q queries; with HAS_NORM, query 0's sublayer input goes to first
    [M, D] (the PreNorm of the source). What ``store_phase1_kernel`` does with WRITE_OUT off, but each query's u is
    loaded and reduced once per BR rows: at one row per program the queries' chain of loads and reductions, not the
    bytes, set the time (session 25, H100, M 8192 D 2048, 8 queries: 100.7 us against a 44.8 us floor; here 61.6 at
    four rows)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rmask = rows < M
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    if HAS_NORM:
        wn = _gain(wn_ptr, cols, cmask)
    v, vf = _new_rows(x_ptr, y_ptr, offs, mask, slot_ptr.dtype.element_ty, HAS_Y)
    if STORE:
        tl.store(slot_ptr + offs, v, mask=mask)
    rstd = _rstd(vf, D, eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    if HAS_NORM:
        first = _prenorm_rows(vf, v.dtype, wn, D, norm_eps)[0]
        tl.store(first_ptr + offs, first.to(v.dtype), mask=mask)
    if QUERY_PAIRS:  # two queries' dots in each round of reductions (``_phase1_rows_pair``)
        for j in range(0, n_q, 2):
            u0, u1 = _pair_keys(q_ptr, g_ptr, j, n_q, D, cols, cmask)
            dot0, dot1 = _sum_pair(vf * u0[None, :], vf * u1[None, :], 1)
            tl.store(lse_ptr + j * M + rows, rstd * dot0, mask=rmask)
            tl.store(lse_ptr + (j + 1) * M + rows, rstd * dot1, mask=rmask & (rows * 0 + j + 1 < n_q))
    else:
        for j in range(n_q):
            u = _query_key(q_ptr + j * D, g_ptr + j * D, cols, cmask)
            tl.store(lse_ptr + j * M + rows, rstd * tl.sum(vf * u[None, :], axis=1), mask=rmask)


@triton.jit(do_not_specialize=["n_src", "n_q", "M"])
def phase1_kernel(
    store_ptr, rstd_ptr, q_ptr, g_ptr, out_ptr, lse_ptr,
    n_src, n_q, M, D,
    Q_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
):  # fmt: skip
    """Two-phase inference, phase 1: n_q pseudo-queries (q, g [n_q, D]) against the n_src completed sources.

    Writes out [n_q, M, D] (softmax-normalised over the sources; only with WRITE_OUT, see ``_phase1_query``) and
    lse [n_q, M]. ONE_TILE: the row's sources fit one register tile (``_phase1_one_tile``). Otherwise the sources
    are read one at a time, twice (scores, then outputs), and the hidden dimension is walked in BLOCK_D chunks so
    that the [Q_PAD, BLOCK_D] query tile stays in registers.
    """
    row = tl.program_id(0).to(tl.int64)
    if ONE_TILE:
        _phase1_one_tile(store_ptr, rstd_ptr, q_ptr, g_ptr, out_ptr, lse_ptr, n_src, n_q, M, D, row, N_PAD, BLOCK_D,
                         WRITE_OUT)  # fmt: skip
        return
    qs = tl.arange(0, Q_PAD)
    idx = tl.arange(0, N_PAD)
    q_mask = qs < n_q
    scores = tl.zeros((Q_PAD, N_PAD), tl.float32)
    for i in range(n_src):
        dots = tl.zeros((Q_PAD,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            v = tl.load(store_ptr + (i * M + row) * D + cols, mask=mask, other=0.0).to(tl.float32)
            u = _query_key(q_ptr, g_ptr, qs[:, None] * D + cols[None, :], q_mask[:, None] & mask[None, :])
            dots += tl.sum(u * v[None, :], axis=1)
        r = tl.load(rstd_ptr + i * M + row)
        scores = tl.where(idx[None, :] == i, (r * dots)[:, None], scores)
    valid = idx[None, :] < n_src
    scores = tl.where(valid, scores, float("-inf"))
    m = tl.max(scores, axis=1)
    p = tl.where(valid, tl.exp(scores - m[:, None]), 0.0)
    denom = tl.sum(p, axis=1)
    alpha = p / denom[:, None]
    tl.store(lse_ptr + qs * M + row, m + tl.log(denom), mask=q_mask)
    if not WRITE_OUT:
        return
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros((Q_PAD, BLOCK_D), tl.float32)
        for i in range(n_src):
            v = tl.load(store_ptr + (i * M + row) * D + cols, mask=mask, other=0.0).to(tl.float32)
            a_i = tl.sum(tl.where(idx[None, :] == i, alpha, 0.0), axis=1)
            acc += a_i[:, None] * v[None, :]
        o_ptrs = out_ptr + (qs[:, None] * M + row) * D + cols[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & mask[None, :])


@triton.jit
def phase2_kernel(
    o_ptr, lse_ptr, part_ptr, add_ptr, new_part_ptr, q_ptr, g_ptr, wn_ptr, h_ptr, D, eps, norm_eps,
    HAS_PARTIAL: tl.constexpr, HAS_ADD: tl.constexpr, STORE_SUM: tl.constexpr, SCORE_OUT: tl.constexpr,
    HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Two-phase inference, phase 2: merge one query's phase-1 row with the partial-sum source (online softmax),
    then (HAS_NORM) the sublayer's PreNorm, as in ``depth_attn_fwd_kernel``: one launch per sublayer.

    HAS_ADD: the partial sum is first brought up to date, part + add (rounded to its dtype, as the eager addition
    rounds), and with STORE_SUM written to new_part: the previous sublayer's output is added in this launch
    instead of its own. SCORE_OUT: the phase-1 row is a lone source (phase 1 over one source), whose lse is its own
    score, computed here from the row in the partial sum's round of reductions (lse_ptr is not read).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_NORM:
        wn = _gain(wn_ptr, cols, mask)
    h = tl.load(o_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PARTIAL:
        u = _query_key(q_ptr, g_ptr, cols, mask)
        vp = tl.load(part_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if not SCORE_OUT:
            lse = tl.load(lse_ptr + row)  # before the store below, which it would otherwise wait behind
        if HAS_ADD:
            vp += tl.load(add_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            vp = vp.to(new_part_ptr.dtype.element_ty)
            if STORE_SUM:
                tl.store(new_part_ptr + row * D + cols, vp, mask=mask)
            vp = vp.to(tl.float32)
        if SCORE_OUT:
            dot, square, out_dot, out_square = _sum_two_pairs(u * vp, vp * vp, u * h, h * h, 0)
            lse = out_dot / tl.sqrt(out_square / D + eps)
        else:
            dot, square = _sum_pair(u * vp, vp * vp, 0)
        s = dot / tl.sqrt(square / D + eps)
        m = tl.maximum(lse, s)
        w_o = tl.exp(lse - m)
        w_p = tl.exp(s - m)
        h = (w_o * h + w_p * vp) / (w_o + w_p)
    h = h.to(h_ptr.dtype.element_ty)
    if HAS_NORM:
        h, _ = _prenorm_row(h, wn, D, norm_eps)
    tl.store(h_ptr + row * D + cols, h, mask=mask)


@triton.jit(do_not_specialize=["M"])
def rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, add_ptr, sum_ptr, M, D, eps,
    BR: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ADD: tl.constexpr,
):  # fmt: skip
    """y = w * (x * rsqrt(mean(x^2) + eps)).to(x dtype), in y's dtype (the promotion of x's and w's); rstd [M].

    HAS_ADD (inference): x is first replaced by x + add, rounded to sum's dtype and written to sum [M, D] (the
    standard residual's addition, fused into the next PreNorm)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BLOCK_D)
    w = _gain(w_ptr, cols, cols < D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_ADD:
        x = x.to(tl.float32) + tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, x, mask=mask)
    y, rstd = _prenorm_rows(x.to(tl.float32), x.dtype, w, D, eps)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit(do_not_specialize=["M"])
def rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, D,
    BR: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr,
):  # fmt: skip
    """dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w; each program walks BLOCKS row blocks and writes
    its partial weight gradient sum(dy * xhat_rounded) as one row of dw [P, D] (summed by the launcher)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    for block in range(pid * BLOCKS, pid * BLOCKS + BLOCKS):
        rows = (block * BR + tl.arange(0, BR)).to(tl.int64)
        mask = (rows < M)[:, None] & mask_d[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        dw += tl.sum(dy * xhat.to(x.dtype).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * D + cols, dw, mask=mask_d)
