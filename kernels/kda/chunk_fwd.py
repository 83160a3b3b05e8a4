"""Triton kernels of the chunked KDA forward (raw kernels only; launchers live in ``chunk.py``).

All tensors are flattened over (batch, time): ``[TT, H, D]`` contiguous, with sequences given by
``cu_seqlens`` (equal-length batches use ``cu_seqlens = arange(B + 1) * T``). Chunks of ``BT`` tokens
never straddle two sequences; ``chunk_indices[c] = (sequence, chunk within it)`` and
``chunk_offsets[n]`` = index of sequence n's first chunk. Rows past the end of a sequence are
loaded as zeros (k = 0 adds nothing, g = 0 decays nothing) and never stored.

Per chunk, with G the in-chunk cumulative log-decay (G_i includes g_i):
  P[i, j]    = sum_d k_id k_jd exp(G_id - G_jd)             (j < i)
  A_qk[i, j] = scale * sum_d q_id k_jd exp(G_id - G_jd)     (j <= i)
  M = (I + Diag(beta) P)^-1,  W = M (beta * k * exp(G)),  U = M (beta * v)
  V' = U - W S,  O = scale * (q * exp(G)) S + A_qk V',  S <- exp(G_last) * S + (k * exp(G_last - G))^T V'
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_offsets(rows, cols, H, i_h, D):
    """Offsets of rows ``rows`` (global token indices), columns ``cols`` of head ``i_h`` in ``[TT, H, D]``."""
    return (rows[:, None].to(tl.int64) * H + i_h) * D + cols[None, :]


@triton.jit
def _load_rows(ptr, rows, rmask, cols, cmask, H, i_h, D):
    """Rows ``rows`` of head ``i_h`` of a ``[TT, H, D]`` tensor, columns ``cols`` (masked entries: 0)."""
    return tl.load(ptr + _tile_offsets(rows, cols, H, i_h, D), mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, x, rows, rmask, cols, cmask, H, i_h, D):
    mask = rmask[:, None] & cmask[None, :]
    tl.store(ptr + _tile_offsets(rows, cols, H, i_h, D), x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def softplus(x):
    """``log(1 + exp(x))`` with torch's threshold: linear past 20 (the gate ``-exp(A_log) * softplus(g + dt_bias)``
    of every KDA kernel)."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _tile_and_item(n_tiles):
    """(tile, item) of a program whose first grid axis counts ``item * n_tiles + tile`` (the second is the head): the
    tiles of one item (a sequence's or a chunk's tiles of value columns or key channels) are launched next to each
    other, so the rows that all of them read come from L2, not once per tile from memory. (With the tiles on the
    last grid axis, each tile of every item ran in its own waves at large batches: session 19, H100, B8 T4096 H32,
    the forward state pass took 1.38 ms against fla's 0.93, whose V tiles are adjacent.)"""
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT: tl.constexpr):
    """(sequence, first token of the chunk, end of the sequence) of chunk ``i_c``."""
    i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int32)
    i_t = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int32)
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    return i_n, bos + i_t * BT, eos


@triton.jit
def _load_cum_decay(G, t0, eos, H, i_h, K, k0, BT: tl.constexpr, BK: tl.constexpr):
    """G rows of a chunk, channels ``k0 .. k0 + BK`` (``[BT, BK]`` fp32); rows past the sequence end
    repeat the last valid row (as if g = 0 there). Also returns the last row, the row indices, the
    rows, their mask, the columns and the column mask.

    The last row is loaded (a cached row: the tile was just read), not picked out of the tile by a reduction across
    its rows: in W/U (now :func:`_last_decay`) that took the forward from 5.215 to 5.178 ms (session 19, H100, B8
    T4096, outputs identical).
    In the backward's pair and direct kernels it also cut their spills (68 -> 60 and 56 -> 0 B, kda_registers.py);
    their time with it was not measured."""
    idx = tl.arange(0, BT)
    rows = t0 + idx
    rmask = rows < eos
    cols = k0 + tl.arange(0, BK)
    cmask = cols < K
    b_G = _load_rows(G, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_last = _load_row(G, t0 + tl.minimum(eos - t0, BT) - 1, eos, cols, H, i_h, K)
    b_G = tl.where(rmask[:, None], b_G, b_last[None, :])
    return b_G, b_last, idx, rows, rmask, cols, cmask


@triton.jit
def _load_gqk(G, q, k, rows, rmask, cols, cmask, scale, H, i_h, K):
    """The ``[rows, cols]`` tiles of G, scale * q and k of head ``i_h``, fp32."""
    b_G = _load_rows(G, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_q = _load_rows(q, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32) * scale
    b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    return b_G, b_q, b_k


@triton.jit
def _load_row(ptr, r, eos, cols, H, i_h, D):
    """Row ``r`` (a global token index) of head ``i_h`` of a ``[TT, H, D]`` tensor, columns ``cols``, as an fp32
    vector (zeros for columns past D, and everywhere if ``r`` is past the sequence end ``eos``)."""
    limit = tl.where(r < eos, D, 0)
    return tl.load(ptr + (r.to(tl.int64) * H + i_h) * D + cols, mask=cols < limit, other=0.0).to(tl.float32)


@triton.jit
def kda_flagged_fwd_kernel(
    q, k, v, G, beta, A_qk, P, M, W, U, qg, kh, gl, exact, chunk_indices, cu_seqlens, scale, NC, H, K, V,
    BT: tl.constexpr, BC: tl.constexpr, BK_DIAG: tl.constexpr, BK_PAIRS: tl.constexpr, BK_WU: tl.constexpr,
    BV: tl.constexpr, SPAN: tl.constexpr, INVERSE: tl.constexpr, WU: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The chunks that :func:`kda_chunk_dots_fwd_kernel` flags (``exact [NC, H]``, int32) and leaves out, each whole in
    one program: A_qk and P inside each sub-block (:func:`_diag_dots_sub_block`) and between them
    (:func:`_pairs_chunk`), then with ``INVERSE`` M (:func:`_inverse_chunk`, from P) and with ``WU`` W/U's work
    (:func:`_wu_chunk`, from M), with a barrier before each step that reads what the steps before it stored.

    Each program takes ``BLOCK`` consecutive (chunk, head) items (flattened as ``exact`` is) and loads their flags
    at once; where none is set, the usual case, it returns: 0.002-0.004 ms of GPU time with no chunk flagged on an
    H100 (session 45, B1 T8192 to B8 T4096 H32), where a kernel per step, each with programs walking a stride of the
    chunks and reading a flag at a time, took 0.023-0.059 ms (session 44), and one program per chunk (per sub-block for
    the diagonal step) 0.085 ms at B8 T4096 (session 43)."""
    first = tl.program_id(0) * BLOCK
    items = first + tl.arange(0, BLOCK)
    if tl.max(tl.load(exact + items, mask=items < NC * H, other=0)) != 0:
        for item in range(first, tl.minimum(first + BLOCK, NC * H)):
            if tl.load(exact + item) != 0:
                i_c, i_h = item // H, item % H
                for i_s in range(0, BT // BC):
                    _diag_dots_sub_block(q, k, G, A_qk, P, chunk_indices, cu_seqlens, i_c, i_s, i_h, scale, H, K, BT,
                                         BC, BK_DIAG, SPAN, IEEE)  # fmt: skip
                _pairs_chunk(q, k, G, A_qk, P, chunk_indices, cu_seqlens, i_c, i_h, scale, H, K, BT, BC, BK_PAIRS,
                             IEEE)  # fmt: skip
                if INVERSE:
                    tl.debug_barrier()  # every thread's P stored
                    _inverse_chunk(P, beta, M, chunk_indices, cu_seqlens, i_c, i_h, H, BT, BC, IEEE)
                    if WU:
                        tl.debug_barrier()  # every thread's M stored
                        _wu_chunk(q, k, v, G, beta, M, W, U, qg, kh, gl, chunk_indices, cu_seqlens, i_c, i_h, scale,
                                  H, K, V, BT, BK_WU, BV, IEEE)  # fmt: skip


@triton.jit
def _diag_dots_sub_block(q, k, G, A_qk, P, chunk_indices, cu_seqlens, i_c, i_s, i_h, scale, H, K, BT: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, SPAN: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Sub-block ``i_s`` of chunk ``i_c``, head ``i_h``: its diagonal ``[BC, BC]`` tiles of A_qk and P with exact
    in-chunk decays, A_qk[i, j] = scale sum_d q_id k_jd exp(G_id - G_jd) for j <= i and P[i, j] the same with k_i for
    j < i (zeros above), as tensor-core dots through the sub-block's middle row m: exp(G_i - G_j) = exp(G_i - G_m)
    exp(G_m - G_j), block of ``BK`` key channels by block. A block whose |G_i - G_m| are all at most SPAN (both
    factors far inside fp32's range) is two ``[BC, BK] x [BK, BC]`` dots; any other block goes one partner at a time
    with exact decays. Each block's share of the sums is exact either way, so the two paths mix freely within a
    sub-block. (Until session 20 a kernel of one token per program took an exp per partner and channel, about 8.5 K
    per row against 2 K here: 0.925 against 0.539 ms at B8 T4096 H32 on an H100.)"""
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    s0 = t0 + i_s * BC  # the sub-block's first token
    if s0 < eos:
        idx = tl.arange(0, BC)
        rows = s0 + idx
        rmask = rows < eos
        mid = s0 + tl.minimum(BC // 2, eos - s0 - 1)
        b_A = tl.zeros([BC, BC], dtype=tl.float32)
        b_P = tl.zeros([BC, BC], dtype=tl.float32)
        for kb in range(0, K, BK):
            cols = kb + tl.arange(0, BK)
            cmask = cols < K
            b_G, b_q, b_k = _load_gqk(G, q, k, rows, rmask, cols, cmask, scale, H, i_h, K)
            b_d = tl.where(rmask[:, None], b_G - _load_row(G, mid, eos, cols, H, i_h, K)[None, :], 0.0)
            if tl.max(tl.abs(b_d)) <= SPAN:
                b_up = tl.exp(b_d)
                b_kd = tl.trans(b_k * tl.exp(-b_d))
                b_A = tl.dot(b_q * b_up, b_kd, b_A, input_precision=IEEE)
                b_P = tl.dot(b_k * b_up, b_kd, b_P, input_precision=IEEE)
            else:
                for j in range(0, BC):
                    b_Gj = _load_row(G, s0 + j, eos, cols, H, i_h, K)
                    b_kj = _load_row(k, s0 + j, eos, cols, H, i_h, K)
                    # masked in the exponent: an upper or out-of-sequence entry would overflow before a mask
                    on = ((idx >= j) & rmask)[:, None]
                    b_e = tl.exp(tl.where(on, b_G - b_Gj[None, :], float("-inf"))) * b_kj[None, :]
                    hit = (idx == j)[None, :]
                    b_A += tl.where(hit, tl.sum(b_q * b_e, axis=1)[:, None], 0.0)
                    b_P += tl.where(hit, tl.sum(b_k * b_e, axis=1)[:, None], 0.0)
        offs = _tile_offsets(rows, i_s * BC + idx, H, i_h, BT)
        lower = idx[:, None] >= idx[None, :]
        tl.store(A_qk + offs, tl.where(lower, b_A, 0.0).to(A_qk.dtype.element_ty), mask=rmask[:, None])
        tl.store(P + offs, tl.where(idx[:, None] > idx[None, :], b_P, 0.0), mask=rmask[:, None])


@triton.jit
def _half_tiles(q, k, G, t0, eos, half, ref, cols, cmask, scale, H, i_h, K, HB: tl.constexpr):
    """Half ``half`` (rows ``half * HB ..``) of a chunk, key channels ``cols``: scale * q, k (fp32, rows past the
    sequence end 0) and d = G - G_ref (``ref``: that row's G, ``[BK]``; 0 past the end, so that those rows' factors
    are 1 and their zero q, k add nothing)."""
    rows = t0 + half * HB + tl.arange(0, HB)
    rmask = rows < eos
    b_G, b_q, b_k = _load_gqk(G, q, k, rows, rmask, cols, cmask, scale, H, i_h, K)
    return b_q, b_k, tl.where(rmask[:, None], b_G - ref[None, :], 0.0)


@triton.jit
def _store_half_row(X, b_left, b_right, t0, eos, half, H, i_h, BT: tl.constexpr):
    """The rows of half ``half`` of a chunk's ``X [TT, H, BT]``: its two ``[BT / 2, BT / 2]`` tiles, left and right."""
    HB: tl.constexpr = BT // 2
    idx = tl.arange(0, HB)
    rows = t0 + half * HB + idx
    rmask = rows < eos
    _store_rows(X, b_left, rows, rmask, idx, idx < HB, H, i_h, BT)
    _store_rows(X, b_right, rows, rmask, HB + idx, idx < HB, H, i_h, BT)


@triton.jit
def _pair_sums(q, k, G, t0, eos, m0, m1, x, scale, H, i_h, K, BK: tl.constexpr, HB: tl.constexpr,
               IEEE: tl.constexpr, NORMS: tl.constexpr):  # fmt: skip
    """The ``[HB, HB]`` tiles of A_qk and P of :func:`kda_chunk_dots_fwd_kernel` (the first half with itself, the
    second half with itself, the second half's rows against the first half's columns) over all key channels, in
    blocks of ``BK``, and the largest |exponent| of their factors (the span to check). ``m0``, ``m1``: the halves'
    middle rows; ``x``: the second half's first row (global token indices). With ``NORMS`` the sums are those of the
    unnormalised, unscaled q and k, and the squared norms of the halves' q and k rows (``[HB]`` each, zeros
    otherwise) come with them."""
    zero = tl.zeros([HB, HB], dtype=tl.float32)
    A0, P0, A1, P1, AX, PX = zero, zero, zero, zero, zero, zero
    sq0 = tl.zeros([HB], dtype=tl.float32)
    sk0, sq1, sk1 = sq0, sq0, sq0
    q_scale = scale
    if NORMS:
        q_scale = 1.0  # (applied with the norms, after the sums)
    span = 0.0
    for kb in range(0, K, BK):
        cols = kb + tl.arange(0, BK)
        cmask = cols < K
        g_m0 = _load_row(G, m0, eos, cols, H, i_h, K)
        g_m1 = _load_row(G, m1, eos, cols, H, i_h, K)
        g_x = _load_row(G, x, eos, cols, H, i_h, K)
        q0, k0, d0 = _half_tiles(q, k, G, t0, eos, 0, g_m0, cols, cmask, q_scale, H, i_h, K, HB)
        q1, k1, d1 = _half_tiles(q, k, G, t0, eos, 1, g_m1, cols, cmask, q_scale, H, i_h, K, HB)
        if NORMS:
            sq0, sk0 = sq0 + tl.sum(q0 * q0, axis=1), sk0 + tl.sum(k0 * k0, axis=1)
            sq1, sk1 = sq1 + tl.sum(q1 * q1, axis=1), sk1 + tl.sum(k1 * k1, axis=1)
        span = tl.maximum(span, tl.maximum(tl.max(tl.abs(g_x - g_m0)), tl.max(tl.abs(d0))))
        span = tl.maximum(span, tl.max(tl.abs(d1)))
        e0, e1 = tl.exp(d0), tl.exp(d1)
        c0 = k0 * tl.exp(-d0)  # the first half's columns from its middle row
        c1 = tl.trans(k1 * tl.exp(-d1))
        cx = tl.trans(c0 * tl.exp(g_x - g_m0)[None, :])  # ... and from the second half's first row
        c0 = tl.trans(c0)
        qe1, ke1 = q1 * e1, k1 * e1
        sx = tl.exp(g_m1 - g_x)[None, :]  # the second half's rows to its first row
        A0 = tl.dot(q0 * e0, c0, A0, input_precision=IEEE)
        P0 = tl.dot(k0 * e0, c0, P0, input_precision=IEEE)
        A1 = tl.dot(qe1, c1, A1, input_precision=IEEE)
        P1 = tl.dot(ke1, c1, P1, input_precision=IEEE)
        AX = tl.dot(qe1 * sx, cx, AX, input_precision=IEEE)
        PX = tl.dot(ke1 * sx, cx, PX, input_precision=IEEE)
    return A0, P0, A1, P1, AX, PX, span, sq0, sk0, sq1, sk1


@triton.jit
def kda_chunk_dots_fwd_kernel(
    q, k, v, G, beta, A_qk, P, M, W, U, qg, kh, gl, qn, kn, exact, chunk_indices, cu_seqlens, scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, SPAN: tl.constexpr, INVERSE: tl.constexpr, WU: tl.constexpr,
    BK_WU: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, NORMS: tl.constexpr, EPS: tl.constexpr,
    ROW_LIMIT: tl.constexpr, SAVE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): all of A_qk and P (``[TT, H, BT]``; A_qk[i, j] = scale sum_d q_id k_jd exp(G_id - G_jd) for
    j <= i, P[i, j] the same with k_i for j < i, zeros above) as six ``[BT / 2, BK] x [BK, BT / 2]`` tensor-core dots
    per block of ``BK`` key channels, when the chunk's decays allow; ``exact [NC, H]`` (int32) says which chunks
    they did not allow, for :func:`kda_flagged_fwd_kernel` to compute.

    exp(G_i - G_j) is split through a middle row: each half's tile with itself through its own middle row m
    (exp(G_i - G_m) exp(G_m - G_j)), the second half's rows against the first half's columns through the second
    half's first row x (exp(G_i - G_x) exp(G_x - G_j), both factors <= 1), those factors taken from the halves'
    own as exp(G_i - G_m1) exp(G_m1 - G_x) and exp(G_x - G_m0) exp(G_m0 - G_j). Every factor lies within
    e^+-SPAN while each |G_i - G_m| of its half and |G_x - G_m0| do (a chunk whose decays average down to about
    -SPAN / 16 per token), far inside fp32's range, and a product of two is then exact or, when it underflows, below
    e^-87 relative to q k. A chunk past that in any key block stores nothing here and is flagged. (The sub-block
    kernels alone, one program per [16, 16] diagonal tile and one per chunk for the six tiles below it, took 0.506 +
    0.820 ms of the 4.11 ms forward at B8 T4096 H32 on the H200 in session 24.)

    (Each half's q rows stacked above its k rows, three ``[BT, BK] x [BK, BT / 2]`` dots per key block that compile to
    wgmma, took the forward from 4.36 to 5.57 ms at B8 T4096 on an H100 in session 42; bf58bc0, removed.)

    With ``INVERSE`` it also computes M = (I + Diag(beta) P)^-1 of the chunks it computes, from P in registers: the
    halves' diagonal blocks by :func:`_unit_lower_inverse`, the block below them M_10 = -M_11 L_10 M_00; with ``WU``
    (and ``INVERSE``) then what :func:`kda_wu_fwd_kernel` computes (key blocks of ``BK_WU``, value blocks of
    ``BV``), from M's blocks in registers (:func:`_wu_halves`), the chunk's q, k, G and v read again, from the
    caches. P and M are stored only where something reads them: P without ``INVERSE`` (the inverse kernel), M without
    ``WU`` (the W/U kernel), both with ``SAVE`` (the backward). (Until session 44 W/U's work read M back from memory
    after a barrier, as one [BT, BT] tile: forward 3.91 against 4.07 ms at B8 T4096 on an H100, 4.15 against 4.30 at
    B1 T32768.)

    With ``NORMS`` (and ``WU``) it also takes the L2 norms of q and k, which the prep kernel then leaves out: q, k
    are the raw inputs, and their rows' inverse norms scale the sums afterwards (A_qk by q's and k's, P by k's) and
    W/U's rows. The sums are then over unnormalised rows, whose entries times factors up to e^SPAN must stay finite in
    fp32: a chunk with a squared row norm of q or k past ``ROW_LIMIT`` is flagged too. qn and kn are stored for the
    chunks it flags (:func:`kda_flagged_fwd_kernel` reads them) and, with ``SAVE`` (the backward reads them), for every
    chunk.

    The one grid axis runs over (chunk, head), the heads of a chunk next to each other: their rows lie together in
    memory, and the kernel took 2.14 ms at B8 T4096 H32 on an H100 (session 45) against 2.24 with the chunks of one
    head next to each other (session 44)."""
    HB: tl.constexpr = BT // 2
    pid = tl.program_id(0)
    i_c, i_h = pid // H, pid % H
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    last = tl.minimum(eos - t0, BT) - 1  # rows past the sequence end take the last valid row's place as a pivot
    m0, m1, x = t0 + tl.minimum(HB // 2, last), t0 + tl.minimum(HB + HB // 2, last), t0 + tl.minimum(HB, last)
    tl.static_assert(WU or not NORMS, "the chunk dots kernel takes the L2 norms only with W/U's work in it")
    A0, P0, A1, P1, AX, PX, span, sq0, sk0, sq1, sk1 = _pair_sums(
        q, k, G, t0, eos, m0, m1, x, scale, H, i_h, K, BK, HB, IEEE, NORMS
    )
    zero = tl.zeros([HB, HB], dtype=tl.float32)
    fits = span <= SPAN
    rq0, rk0, rq1, rk1 = sq0, sk0, sq1, sk1  # the rows' inverse norms with NORMS (Triton binds names on both sides)
    if NORMS:
        fits = fits & (tl.maximum(tl.max(tl.maximum(sq0, sk0)), tl.max(tl.maximum(sq1, sk1))) <= ROW_LIMIT)
        rq0, rk0 = 1.0 / tl.sqrt(sq0 + EPS), 1.0 / tl.sqrt(sk0 + EPS)
        rq1, rk1 = 1.0 / tl.sqrt(sq1 + EPS), 1.0 / tl.sqrt(sk1 + EPS)
        A0 = A0 * (scale * rq0)[:, None] * rk0[None, :]
        A1 = A1 * (scale * rq1)[:, None] * rk1[None, :]
        AX = AX * (scale * rq1)[:, None] * rk0[None, :]
        P0 = P0 * rk0[:, None] * rk0[None, :]
        P1 = P1 * rk1[:, None] * rk1[None, :]
        PX = PX * rk1[:, None] * rk0[None, :]
    tl.store(exact + i_c * H + i_h, tl.where(fits, 0, 1))
    if fits:
        idx = tl.arange(0, HB)
        # above the diagonal the products overflow (masked here, never summed into a kept entry)
        on, below = idx[:, None] >= idx[None, :], idx[:, None] > idx[None, :]
        P0, P1 = tl.where(below, P0, 0.0), tl.where(below, P1, 0.0)
        _store_half_row(A_qk, tl.where(on, A0, 0.0), zero, t0, eos, 0, H, i_h, BT)
        _store_half_row(A_qk, AX, tl.where(on, A1, 0.0), t0, eos, 1, H, i_h, BT)
        if SAVE or not INVERSE:  # read by the backward, or by the inverse kernel
            _store_half_row(P, P0, zero, t0, eos, 0, H, i_h, BT)
            _store_half_row(P, PX, P1, t0, eos, 1, H, i_h, BT)
        if INVERSE:
            eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
            b0 = _sub_block_beta(beta, idx, t0, eos, 0, H, i_h, HB)
            b1 = _sub_block_beta(beta, idx, t0, eos, 1, H, i_h, HB)
            M0 = _unit_lower_inverse(b0[:, None] * P0, eye, 5, IEEE)
            M1 = _unit_lower_inverse(b1[:, None] * P1, eye, 5, IEEE)
            MX = -tl.dot(M1, tl.dot(b1[:, None] * PX, M0, input_precision=IEEE), input_precision=IEEE)
            if SAVE or not WU:  # read by the backward, or by the W/U kernel
                _store_half_row(M, M0, zero, t0, eos, 0, H, i_h, BT)
                _store_half_row(M, MX, M1, t0, eos, 1, H, i_h, BT)
            if WU:
                dt = W.dtype.element_ty
                _wu_halves(q, k, v, G, W, U, qg, kh, gl, qn, kn, M0.to(dt), MX.to(dt), M1.to(dt), b0, b1, rq0, rk0,
                           rq1, rk1, t0, eos, i_c, i_h, scale, H, K, V, BT, BK_WU, BV, IEEE, NORMS, SAVE)  # fmt: skip
    elif NORMS:  # qn, kn of the flagged chunk, for kda_flagged_fwd_kernel
        for k0 in range(0, K, BK_WU):
            cols = k0 + tl.arange(0, BK_WU)
            _normed_rows(q, k, qn, kn, rq0, rk0, t0, eos, cols, H, i_h, K, HB, NORMS, True)
            _normed_rows(q, k, qn, kn, rq1, rk1, t0 + HB, eos, cols, H, i_h, K, HB, NORMS, True)


@triton.jit
def _wu_halves(q, k, v, G, W, U, qg, kh, gl, qn, kn, M0, MX, M1, b0, b1, rq0, rk0, rq1, rk1, t0, eos, i_c, i_h, scale,
               H, K, V, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, NORMS: tl.constexpr,
               SAVE: tl.constexpr):  # fmt: skip
    """W/U's work (:func:`kda_wu_fwd_kernel`) for a chunk whose M = [[M0, 0], [MX, M1]] the chunk dots kernel holds in
    registers (``[BT / 2, BT / 2]`` blocks in W's dtype), half by half: W's and U's first half M0 X_0, their second
    MX X_0 + M1 X_1. ``b0``, ``b1``: the halves' beta; ``rq0`` .. ``rk1``: with ``NORMS`` their rows' inverse norms
    (:func:`_normed_rows`)."""
    HB: tl.constexpr = BT // 2
    x = t0 + HB  # the second half's first row
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        b_last = _last_decay(G, gl, t0, eos, i_c, cols, H, i_h, K, BT)
        w0 = _wu_rows(q, k, G, qg, kh, qn, kn, b0, rq0, rk0, b_last, t0, eos, cols, scale, H, i_h, K, HB, NORMS, SAVE)
        w1 = _wu_rows(q, k, G, qg, kh, qn, kn, b1, rq1, rk1, b_last, x, eos, cols, scale, H, i_h, K, HB, NORMS, SAVE)
        w0, w1 = w0.to(W.dtype.element_ty), w1.to(W.dtype.element_ty)
        _store_halves(W, tl.dot(M0, w0, input_precision=IEEE),
                      tl.dot(M1, w1, tl.dot(MX, w0, input_precision=IEEE), input_precision=IEEE),
                      t0, eos, cols, H, i_h, K, HB)  # fmt: skip
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        u0 = _beta_rows(v, b0, t0, eos, cols_v, H, i_h, V, HB).to(U.dtype.element_ty)
        u1 = _beta_rows(v, b1, x, eos, cols_v, H, i_h, V, HB).to(U.dtype.element_ty)
        _store_halves(U, tl.dot(M0, u0, input_precision=IEEE),
                      tl.dot(M1, u1, tl.dot(MX, u0, input_precision=IEEE), input_precision=IEEE),
                      t0, eos, cols_v, H, i_h, V, HB)  # fmt: skip


@triton.jit
def _store_halves(X, b_top, b_bottom, t0, eos, cols, H, i_h, D, HB: tl.constexpr):
    """A chunk's rows of ``X [TT, H, D]``, columns ``cols``: the first half's ``b_top``, the second half's ``b_bottom``
    (``[HB, len(cols)]`` each; :func:`_store_half_row` stores one half's rows, by their left and right columns)."""
    idx = tl.arange(0, HB)
    _store_rows(X, b_top, t0 + idx, t0 + idx < eos, cols, cols < D, H, i_h, D)
    _store_rows(X, b_bottom, t0 + HB + idx, t0 + HB + idx < eos, cols, cols < D, H, i_h, D)


@triton.jit
def _state_tile(cu_seqlens, chunk_offsets, s0, i_n, i_h, i_v, H, K, V,
                BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    """Start of a sequential state kernel's program (sequence ``i_n``, head ``i_h``, V tile ``i_v``): the
    sequence's token range and first chunk, the ``[BK, BV]`` tile's offsets/mask within a ``[K, V]`` state,
    and the fp32 tile itself, loaded from ``s0 [N, H, K, V]`` or zero."""
    bos = tl.load(cu_seqlens + i_n).to(tl.int32)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int32)
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    cols = tl.arange(0, BK)
    cmask = cols < K
    cols_v = i_v * BV + tl.arange(0, BV)
    vmask = cols_v < V
    st_offs = cols[:, None] * V + cols_v[None, :]
    st_mask = cmask[:, None] & vmask[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        b_S += tl.load(s0 + (i_n * H + i_h).to(tl.int64) * K * V + st_offs, mask=st_mask, other=0.0)
    return bos, eos, c0, cols, cmask, st_offs, st_mask, b_S, cols_v, vmask


@triton.jit
def kda_prep_fwd_kernel(
    q, k, g, A_log, dt_bias, qn, kn, G, chunk_indices, cu_seqlens, H, K,
    BT: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr, GATE: tl.constexpr, EPS: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): optional L2 norm of q/k (written to qn/kn), optional gate, in-chunk cumsum -> G."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    rows = t0 + tl.arange(0, BT)
    rmask = rows < eos
    cols = tl.arange(0, BK)
    cmask = cols < K
    b_g = _load_rows(g, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    if GATE:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_x = b_g + tl.load(dt_bias + i_h * K + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        b_g = tl.where(rmask[:, None] & cmask[None, :], -b_a * softplus(b_x), 0.0)
    _store_rows(G, tl.cumsum(b_g, axis=0), rows, rmask, cols, cmask, H, i_h, K)
    if L2NORM:
        b_q = _load_rows(q, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q, axis=1) + EPS)[:, None]
        _store_rows(qn, b_q, rows, rmask, cols, cmask, H, i_h, K)
        b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k, axis=1) + EPS)[:, None]
        _store_rows(kn, b_k, rows, rmask, cols, cmask, H, i_h, K)


@triton.jit
def _sub_block_tiles(q, k, G, b_Glast, t0, eos, s, cols, cmask, scale, H, i_h, K, BC: tl.constexpr):
    """Sub-block ``s``'s ``[BC, BK]`` tiles of G, scale * q and k (fp32; rows past the sequence end: G of its last
    row, q = k = 0) and its pivot, G's first row (the last row's G if that row is past the end too)."""
    rows = t0 + s * BC + tl.arange(0, BC)
    rmask = rows < eos
    b_G, b_q, b_k = _load_gqk(G, q, k, rows, rmask, cols, cmask, scale, H, i_h, K)
    b_G = tl.where(rmask[:, None], b_G, b_Glast[None, :])
    first = t0 + s * BC
    return b_G, b_q, b_k, tl.where(first < eos, _load_row(G, first, eos, cols, H, i_h, K), b_Glast)


@triton.jit
def _pair_dots(b_qe, b_ke, b_c, b_A, b_P, IEEE: tl.constexpr):
    """One [BC, BC] tile's sums for a key block: A += qe c and P += ke c (``c``: the columns' ``[BK, BC]``)."""
    return tl.dot(b_qe, b_c, b_A, input_precision=IEEE), tl.dot(b_ke, b_c, b_P, input_precision=IEEE)


@triton.jit
def _store_block(A_qk, P, b_A, b_P, t0, eos, i, j, H, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """The ``[BC, BC]`` tile (sub-block ``i`` of rows, ``j`` of columns) of A_qk and P."""
    rows = t0 + i * BC + tl.arange(0, BC)
    cols = j * BC + tl.arange(0, BC)
    offs = _tile_offsets(rows, cols, H, i_h, BT)
    mask = (rows < eos)[:, None]  # every column is inside the chunk; the store broadcasts the rows' mask
    tl.store(A_qk + offs, b_A.to(A_qk.dtype.element_ty), mask=mask)
    tl.store(P + offs, b_P, mask=mask)


@triton.jit
def _pairs_accumulate(G0, k0, G1, q1, k1, p1, G2, q2, k2, p2, G3, q3, k3, p3,
                      A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32, IEEE: tl.constexpr):  # fmt: skip
    """Adds one block of key channels to the six ``[BC, BC]`` tiles (i, j < i) of A_qk and P between sub-blocks:
    ``[BC, BK] x [BK, BC]`` dots with sub-block i's first row p_i as the pivot, exp(G_r - G_c) = exp(G_r - G_p)
    exp(G_p - G_c), both factors <= 1. Sub-block s's tiles: ``Gs`` (cumulative decays), ``qs`` (scale * q), ``ks``.

    The columns of sub-block j decayed to a later pivot p_i are those decayed to p_{j+1} times exp(p_i - p_{j+1})
    (``[BK]``, <= 1: an underflow of either factor is one of the product too), so six column tiles take three tile
    exps and two vector ones: the kernel is bound by its work, not its bytes (BENCHMARKS.md, KDA, session 38)."""
    # rows of sub-block i decayed to its pivot; the columns (sub-blocks j < i) from it
    e1, e2, e3 = tl.exp(G1 - p1[None, :]), tl.exp(G2 - p2[None, :]), tl.exp(G3 - p3[None, :])
    k0e, k1e, k2e = k0 * tl.exp(p1[None, :] - G0), k1 * tl.exp(p2[None, :] - G1), k2 * tl.exp(p3[None, :] - G2)
    s21, s32 = tl.exp(p2 - p1)[None, :], tl.exp(p3 - p2)[None, :]
    c10, c20, c30 = tl.trans(k0e), tl.trans(k0e * s21), tl.trans(k0e * (s21 * s32))
    c21, c31, c32 = tl.trans(k1e), tl.trans(k1e * s32), tl.trans(k2e)
    qe1, ke1, qe2, ke2, qe3, ke3 = q1 * e1, k1 * e1, q2 * e2, k2 * e2, q3 * e3, k3 * e3
    A10, P10 = _pair_dots(qe1, ke1, c10, A10, P10, IEEE)
    A20, P20 = _pair_dots(qe2, ke2, c20, A20, P20, IEEE)
    A21, P21 = _pair_dots(qe2, ke2, c21, A21, P21, IEEE)
    A30, P30 = _pair_dots(qe3, ke3, c30, A30, P30, IEEE)
    A31, P31 = _pair_dots(qe3, ke3, c31, A31, P31, IEEE)
    A32, P32 = _pair_dots(qe3, ke3, c32, A32, P32, IEEE)
    return A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32


@triton.jit
def _store_pairs(A_qk, P, A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32, t0, eos, H, i_h,
                 BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """A chunk's tiles of A_qk and P outside the diagonal: the six below it, zeros above."""
    _store_block(A_qk, P, A10, P10, t0, eos, 1, 0, H, i_h, BT, BC)
    _store_block(A_qk, P, A20, P20, t0, eos, 2, 0, H, i_h, BT, BC)
    _store_block(A_qk, P, A21, P21, t0, eos, 2, 1, H, i_h, BT, BC)
    _store_block(A_qk, P, A30, P30, t0, eos, 3, 0, H, i_h, BT, BC)
    _store_block(A_qk, P, A31, P31, t0, eos, 3, 1, H, i_h, BT, BC)
    _store_block(A_qk, P, A32, P32, t0, eos, 3, 2, H, i_h, BT, BC)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(0, 3):
        for j in tl.static_range(i + 1, 4):
            _store_block(A_qk, P, zero, zero, t0, eos, i, j, H, i_h, BT, BC)


@triton.jit
def _pairs_chunk(q, k, G, A_qk, P, chunk_indices, cu_seqlens, i_c, i_h, scale, H, K,
                 BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Chunk ``i_c``, head ``i_h``: A_qk and P (``[TT, H, BT]``, exact in-chunk decays) outside the diagonal
    ``[BC, BC]`` tiles (:func:`_diag_dots_sub_block` writes those), for BT = 4 BC, from the normalised q, k and the
    cumulative decays G that :func:`kda_prep_fwd_kernel` wrote. Each sub-block's tiles are loaded once per block of
    ``BK`` key channels (:func:`_pairs_accumulate`). (Until session 15 one program per sub-block reloaded the chunk's
    k and G for each of them, with [BC, BT] dots over the whole chunk: 0.362 against 0.218 ms at B1 T8192 H32 on the
    H200.)"""
    tl.static_assert(BT == 4 * BC)
    _seq, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)  # (``_`` is taken by the loop's unpacking)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    A10, A20, A21, A30, A31, A32 = zero, zero, zero, zero, zero, zero
    P10, P20, P21, P30, P31, P32 = zero, zero, zero, zero, zero, zero
    last = t0 + tl.minimum(eos - t0, BT) - 1
    for kb in range(0, K, BK):
        cols = kb + tl.arange(0, BK)
        cmask = cols < K
        b_Glast = _load_row(G, last, eos, cols, H, i_h, K)
        G0, _, k0, _ = _sub_block_tiles(q, k, G, b_Glast, t0, eos, 0, cols, cmask, scale, H, i_h, K, BC)
        G1, q1, k1, p1 = _sub_block_tiles(q, k, G, b_Glast, t0, eos, 1, cols, cmask, scale, H, i_h, K, BC)
        G2, q2, k2, p2 = _sub_block_tiles(q, k, G, b_Glast, t0, eos, 2, cols, cmask, scale, H, i_h, K, BC)
        G3, q3, k3, p3 = _sub_block_tiles(q, k, G, b_Glast, t0, eos, 3, cols, cmask, scale, H, i_h, K, BC)
        A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32 = _pairs_accumulate(
            G0, k0, G1, q1, k1, p1, G2, q2, k2, p2, G3, q3, k3, p3,
            A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32, IEEE,
        )  # fmt: skip
    _store_pairs(A_qk, P, A10, A20, A21, A30, A31, A32, P10, P20, P21, P30, P31, P32, t0, eos, H, i_h, BT, BC)


@triton.jit
def _sub_block_beta(beta, idx, t0, eos, s, H, i_h, BC: tl.constexpr):
    """beta of sub-block ``s``'s rows (fp32; 0 past the sequence end)."""
    rows = t0 + s * BC + idx
    return tl.load(beta + rows.to(tl.int64) * H + i_h, mask=rows < eos, other=0.0).to(tl.float32)


@triton.jit
def _unit_lower_inverse(b_N, eye, LOG2_ROWS: tl.constexpr, IEEE: tl.constexpr):
    """``(I + N)^-1`` for a strictly lower triangular ``[2^LOG2_ROWS, 2^LOG2_ROWS]`` N, as the product
    (I - N)(I + N^2)(I + N^4) ... = sum_{k < rows} (-N)^k (N^rows = 0): 2 (LOG2_ROWS - 1) dots (six for 16 rows).
    (Until session 18: fifteen substitution steps, each a load of P's next row and a reduction across the tile; the
    H200 forward at B1 T8192 took 1.346 ms with them against 1.285 with the product.)"""
    b_X = eye - b_N
    b_Np = b_N
    for _ in tl.static_range(1, LOG2_ROWS):
        b_Np = tl.dot(b_Np, b_Np, input_precision=IEEE)
        b_X = tl.dot(b_X, b_Np, b_X, input_precision=IEEE)
    return b_X


@triton.jit
def _lower_block(P, beta, idx, t0, eos, s, t, H, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """Block ``(s, t)``, t < s, of ``L = I + Diag(beta) P`` (``[BC, BC]`` fp32; rows past the sequence end 0); for
    t = s its strictly lower part, Diag(beta) P_ss (P is zero on and above the diagonal)."""
    rows = t0 + s * BC + idx
    b_beta = _sub_block_beta(beta, idx, t0, eos, s, H, i_h, BC)
    return b_beta[:, None] * _load_rows(P, rows, rows < eos, t * BC + idx, idx < BC, H, i_h, BT)


@triton.jit
def _store_block_row(M, b0, b1, b2, b3, idx, t0, eos, s, H, i_h, BT: tl.constexpr, BC: tl.constexpr):
    """Rows of sub-block ``s`` of ``M [TT, H, BT]``: its four ``[BC, BC]`` blocks, left to right."""
    rows = t0 + s * BC + idx
    rmask = rows < eos
    cmask = idx < BC
    _store_rows(M, b0, rows, rmask, idx, cmask, H, i_h, BT)
    _store_rows(M, b1, rows, rmask, BC + idx, cmask, H, i_h, BT)
    _store_rows(M, b2, rows, rmask, 2 * BC + idx, cmask, H, i_h, BT)
    _store_rows(M, b3, rows, rmask, 3 * BC + idx, cmask, H, i_h, BT)


@triton.jit
def kda_inverse_fwd_kernel(
    P, beta, M, chunk_indices, cu_seqlens, H, BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): M = (I + Diag(beta) P)^-1 (``[TT, H, BT]``, zeros above the diagonal; computed in fp32,
    stored in the inputs' dtype), blockwise on the four ``[BC, BC]`` sub-blocks (BT = 4 BC): the diagonal blocks'
    inverses as products of powers of their strictly lower parts (:func:`_unit_lower_inverse`), then the blocks
    below them by dots, M_st = -M_ss sum_{t <= u < s} L_su M_ut.

    Small ``[BC, BC]`` tiles keep the serial steps' reductions short and the registers few, so several programs
    share an SM and hide each other's load latency; W and U, which stream the chunk's keys and values, are in
    :func:`kda_wu_fwd_kernel`. (Launched where the chunk dots kernel leaves M out, ``CHUNK_DOTS_FUSE`` 0; else
    :func:`kda_flagged_fwd_kernel` computes M of the chunks it flags.)
    """
    _inverse_chunk(P, beta, M, chunk_indices, cu_seqlens, tl.program_id(0), tl.program_id(1), H, BT, BC, IEEE)


@triton.jit
def _inverse_chunk(P, beta, M, chunk_indices, cu_seqlens, i_c, i_h, H,
                   BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """:func:`kda_inverse_fwd_kernel`'s M for chunk ``i_c``, head ``i_h``."""
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    idx = tl.arange(0, BC)
    m00, m11, m22, m33 = _diagonal_inverses(P, beta, idx, t0, eos, H, i_h, BT, BC, IEEE)
    l10 = _lower_block(P, beta, idx, t0, eos, 1, 0, H, i_h, BT, BC)
    l20 = _lower_block(P, beta, idx, t0, eos, 2, 0, H, i_h, BT, BC)
    l21 = _lower_block(P, beta, idx, t0, eos, 2, 1, H, i_h, BT, BC)
    l30 = _lower_block(P, beta, idx, t0, eos, 3, 0, H, i_h, BT, BC)
    l31 = _lower_block(P, beta, idx, t0, eos, 3, 1, H, i_h, BT, BC)
    l32 = _lower_block(P, beta, idx, t0, eos, 3, 2, H, i_h, BT, BC)
    _store_inverse(M, m00, m11, m22, m33, l10, l20, l21, l30, l31, l32, idx, t0, eos, H, i_h, BT, BC, IEEE)


@triton.jit
def _diagonal_inverses(P, beta, idx, t0, eos, H, i_h, BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):
    """The inverses of a chunk's four diagonal ``[BC, BC]`` blocks of L = I + Diag(beta) P, from P."""
    tl.static_assert(BT == 4 * BC, "the blocked inverse is written out for four sub-blocks")
    tl.static_assert(BC == 16, "the product form is written out for 16 rows")
    eye = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    m00 = _unit_lower_inverse(_lower_block(P, beta, idx, t0, eos, 0, 0, H, i_h, BT, BC), eye, 4, IEEE)
    m11 = _unit_lower_inverse(_lower_block(P, beta, idx, t0, eos, 1, 1, H, i_h, BT, BC), eye, 4, IEEE)
    m22 = _unit_lower_inverse(_lower_block(P, beta, idx, t0, eos, 2, 2, H, i_h, BT, BC), eye, 4, IEEE)
    m33 = _unit_lower_inverse(_lower_block(P, beta, idx, t0, eos, 3, 3, H, i_h, BT, BC), eye, 4, IEEE)
    return m00, m11, m22, m33


@triton.jit
def _store_inverse(M, m00, m11, m22, m33, l10, l20, l21, l30, l31, l32, idx, t0, eos, H, i_h,
                   BT: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """Stores a chunk's M = L^-1 (see :func:`kda_inverse_fwd_kernel`) from the inverses of L's diagonal blocks
    (:func:`_diagonal_inverses`) and its blocks below them, ``l_st = Diag(beta_s) P_st`` (``[BC, BC]`` fp32)."""
    m10 = -tl.dot(m11, tl.dot(l10, m00, input_precision=IEEE), input_precision=IEEE)
    m21 = -tl.dot(m22, tl.dot(l21, m11, input_precision=IEEE), input_precision=IEEE)
    m32 = -tl.dot(m33, tl.dot(l32, m22, input_precision=IEEE), input_precision=IEEE)
    m20 = -tl.dot(m22, tl.dot(l20, m00, input_precision=IEEE) + tl.dot(l21, m10, input_precision=IEEE),
                  input_precision=IEEE)  # fmt: skip
    m31 = -tl.dot(m33, tl.dot(l31, m11, input_precision=IEEE) + tl.dot(l32, m21, input_precision=IEEE),
                  input_precision=IEEE)  # fmt: skip
    b_sum = tl.dot(l30, m00, input_precision=IEEE) + tl.dot(l31, m10, input_precision=IEEE)
    m30 = -tl.dot(m33, b_sum + tl.dot(l32, m20, input_precision=IEEE), input_precision=IEEE)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    _store_block_row(M, m00, zero, zero, zero, idx, t0, eos, 0, H, i_h, BT, BC)
    _store_block_row(M, m10, m11, zero, zero, idx, t0, eos, 1, H, i_h, BT, BC)
    _store_block_row(M, m20, m21, m22, zero, idx, t0, eos, 2, H, i_h, BT, BC)
    _store_block_row(M, m30, m31, m32, m33, idx, t0, eos, 3, H, i_h, BT, BC)


@triton.jit
def kda_wu_fwd_kernel(
    q, k, v, G, beta, M, W, U, qg, kh, gl, chunk_indices, cu_seqlens, scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, head): W = M (beta * k * exp(G)) and U = M (beta * v) from the stored M, taking the key
    channels in blocks of ``BK`` and the value columns in blocks of ``BV``. Also what the sequential kernels would
    otherwise recompute: qg = scale * q * exp(G), kh = k * exp(G_last - G) and gl = exp(G_last) (``[NC, H, K]``).
    (A program per key or value block, each loading M, was slower on the H200 in session 18: forward 1.437 against
    1.346 ms at B1 T8192.) Launched where the chunk dots kernel leaves W/U's work out (``CHUNK_DOTS_FUSE`` below 2;
    else :func:`kda_flagged_fwd_kernel` does it for the chunks it flags)."""
    _wu_chunk(q, k, v, G, beta, M, W, U, qg, kh, gl, chunk_indices, cu_seqlens, tl.program_id(0), tl.program_id(1),
              scale, H, K, V, BT, BK, BV, IEEE)  # fmt: skip


@triton.jit
def _wu_chunk(q, k, v, G, beta, M, W, U, qg, kh, gl, chunk_indices, cu_seqlens, i_c, i_h, scale, H, K, V,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """:func:`kda_wu_fwd_kernel`'s work for chunk ``i_c``, head ``i_h``, from M ``[BT, BT]`` in memory and the
    normalised q, k."""
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    idx = tl.arange(0, BT)
    rows = t0 + idx
    rmask = rows < eos
    b_Md = _load_rows(M, rows, rmask, idx, idx < BT, H, i_h, BT).to(W.dtype.element_ty)
    b_beta = tl.load(beta + rows.to(tl.int64) * H + i_h, mask=rmask, other=0.0).to(tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        b_last = _last_decay(G, gl, t0, eos, i_c, cols, H, i_h, K, BT)
        b_w = _wu_rows(q, k, G, qg, kh, None, None, b_beta, None, None, b_last, t0, eos, cols, scale, H, i_h, K, BT,
                       False, False)  # fmt: skip
        b_w = tl.dot(b_Md, b_w.to(W.dtype.element_ty), input_precision=IEEE)
        _store_rows(W, b_w, rows, rmask, cols, cols < K, H, i_h, K)
    for v0 in range(0, V, BV):
        cols_v = v0 + tl.arange(0, BV)
        b_u = _beta_rows(v, b_beta, t0, eos, cols_v, H, i_h, V, BT).to(U.dtype.element_ty)
        _store_rows(U, tl.dot(b_Md, b_u, input_precision=IEEE), rows, rmask, cols_v, cols_v < V, H, i_h, V)


@triton.jit
def _last_decay(G, gl, t0, eos, i_c, cols, H, i_h, K, BT: tl.constexpr):
    """G's last row of chunk ``i_c`` (starting at token ``t0``), key channels ``cols`` (``[BK]`` fp32), with gl =
    exp(G_last) stored (``[NC, H, K]``)."""
    b_last = _load_row(G, t0 + tl.minimum(eos - t0, BT) - 1, eos, cols, H, i_h, K)
    tl.store(gl + (i_c * H + i_h).to(tl.int64) * K + cols, tl.exp(b_last), mask=cols < K)
    return b_last


@triton.jit
def _normed_rows(q, k, qn, kn, rq, rk, r0, eos, cols, H, i_h, K, NR: tl.constexpr, NORMS: tl.constexpr,
                 SAVE: tl.constexpr):  # fmt: skip
    """Rows ``r0 .. r0 + NR`` (zeros past the sequence end), key channels ``cols`` of q and k, fp32. With ``NORMS``
    q and k are the raw inputs, normalised here by their rows' inverse norms ``rq``, ``rk`` ``[NR]``, and with
    ``SAVE`` then stored to qn, kn."""
    rows = r0 + tl.arange(0, NR)
    rmask, cmask = rows < eos, cols < K
    b_q = _load_rows(q, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_k = _load_rows(k, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    if NORMS:
        b_q, b_k = b_q * rq[:, None], b_k * rk[:, None]
        if SAVE:
            _store_rows(qn, b_q, rows, rmask, cols, cmask, H, i_h, K)
            _store_rows(kn, b_k, rows, rmask, cols, cmask, H, i_h, K)
    return b_q, b_k


@triton.jit
def _wu_rows(q, k, G, qg, kh, qn, kn, b_beta, rq, rk, b_last, r0, eos, cols, scale, H, i_h, K, NR: tl.constexpr,
             NORMS: tl.constexpr, SAVE: tl.constexpr):  # fmt: skip
    """Rows ``r0 .. r0 + NR`` of a chunk whose G ends in ``b_last``, key channels ``cols``: stores qg = scale * q *
    exp(G) and kh = k * exp(G_last - G) (see :func:`kda_wu_fwd_kernel`; q, k as :func:`_normed_rows` gives them) and
    returns W's right-hand side beta * k * exp(G) (``[NR, BK]`` fp32; ``b_beta``: the rows' beta). Rows past the
    sequence end are zero and not stored."""
    rows = r0 + tl.arange(0, NR)
    rmask, cmask = rows < eos, cols < K
    b_G = _load_rows(G, rows, rmask, cols, cmask, H, i_h, K).to(tl.float32)
    b_q, b_k = _normed_rows(q, k, qn, kn, rq, rk, r0, eos, cols, H, i_h, K, NR, NORMS, SAVE)
    b_gexp = tl.exp(b_G)
    _store_rows(qg, b_q * b_gexp * scale, rows, rmask, cols, cmask, H, i_h, K)
    _store_rows(kh, b_k * tl.exp(b_last[None, :] - b_G), rows, rmask, cols, cmask, H, i_h, K)
    return b_k * b_gexp * b_beta[:, None]


@triton.jit
def _beta_rows(v, b_beta, r0, eos, cols_v, H, i_h, V, NR: tl.constexpr):
    """U's right-hand side beta * v on rows ``r0 .. r0 + NR`` (zeros past the sequence end), value columns ``cols_v``
    (fp32; ``b_beta``: the rows' beta)."""
    rows = r0 + tl.arange(0, NR)
    return _load_rows(v, rows, rows < eos, cols_v, cols_v < V, H, i_h, V).to(tl.float32) * b_beta[:, None]


@triton.jit
def kda_state_fwd_kernel(
    kh, gl, W, U, h, v_new, h0, ht, cu_seqlens, chunk_offsets, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (sequence, V tile; head): the sequential state pass. Writes the state at the start of
    every chunk to ``h [NC, H, K, V]`` and V' = U - W S to ``v_new``. The next chunk's tiles are
    loaded before the current chunk's dots, so memory latency overlaps the math."""
    i_v, i_n = _tile_and_item(tl.cdiv(V, BV))
    i_h = tl.program_id(1)
    bos, eos, c0, cols, cmask, st_offs, st_mask, b_S, cols_v, vmask = _state_tile(
        cu_seqlens, chunk_offsets, h0, i_n, i_h, i_v, H, K, V, BK, BV, HAS_H0
    )
    NT = tl.cdiv(eos - bos, BT)
    rows = bos + tl.arange(0, BT)
    rmask = rows < eos
    b_w = _load_rows(W, rows, rmask, cols, cmask, H, i_h, K)
    b_u = _load_rows(U, rows, rmask, cols_v, vmask, H, i_h, V)
    b_kh = _load_rows(kh, rows, rmask, cols, cmask, H, i_h, K)
    b_gl = tl.load(gl + (c0 * H + i_h) * K + cols, mask=cols < K * tl.minimum(NT, 1), other=0.0)
    for i_t in range(0, NT):
        tl.store(h + ((c0 + i_t) * H + i_h) * K * V + st_offs, b_S.to(h.dtype.element_ty), mask=st_mask)
        nrows = rows + BT
        nmask = nrows < eos
        n_w = _load_rows(W, nrows, nmask, cols, cmask, H, i_h, K)
        n_u = _load_rows(U, nrows, nmask, cols_v, vmask, H, i_h, V)
        n_kh = _load_rows(kh, nrows, nmask, cols, cmask, H, i_h, K)
        has_next = tl.minimum(NT - 1 - i_t, 1)
        n_gl = tl.load(gl + ((c0 + i_t + 1) * H + i_h) * K + cols, mask=cols < K * has_next, other=0.0)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_S.to(b_w.dtype), input_precision=IEEE)
        _store_rows(v_new, b_vn, rows, rmask, cols_v, vmask, H, i_h, V)
        b_S = b_S * b_gl[:, None] + tl.dot(tl.trans(b_kh), b_vn.to(b_w.dtype), input_precision=IEEE)
        rows, rmask, b_w, b_u, b_kh, b_gl = nrows, nmask, n_w, n_u, n_kh, n_gl
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + st_offs, b_S, mask=st_mask)


@triton.jit
def kda_output_fwd_kernel(
    qg, A_qk, h, v_new, o, chunk_indices, cu_seqlens, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (chunk, V tile; head): O = qg S + A_qk V' (qg = scale * q * exp(G))."""
    i_v, i_c = _tile_and_item(tl.cdiv(V, BV))
    i_h = tl.program_id(1)
    _, t0, eos = _chunk_bounds(chunk_indices, cu_seqlens, i_c, BT)
    idx = tl.arange(0, BT)
    rows = t0 + idx
    rmask = rows < eos
    cols = tl.arange(0, BK)
    cmask = cols < K
    cols_v = i_v * BV + tl.arange(0, BV)
    vmask = cols_v < V
    b_vn = _load_rows(v_new, rows, rmask, cols_v, vmask, H, i_h, V)
    b_qg = _load_rows(qg, rows, rmask, cols, cmask, H, i_h, K)
    b_S = tl.load(
        h + (i_c * H + i_h).to(tl.int64) * K * V + cols[:, None] * V + cols_v[None, :],
        mask=cmask[:, None] & vmask[None, :], other=0.0,
    )  # fmt: skip
    b_A = _load_rows(A_qk, rows, rmask, idx, idx < BT, H, i_h, BT)
    b_o = tl.dot(b_qg, b_S, input_precision=IEEE) + tl.dot(b_A, b_vn, input_precision=IEEE)
    _store_rows(o, b_o, rows, rmask, cols_v, vmask, H, i_h, V)
