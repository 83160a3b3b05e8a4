"""Triton kernels of the small-batch routed experts (raw kernels only; the launcher is in ``__init__.py``).

The experts' weights stay where the model keeps them (one tensor per expert and projection, the checkpoint's
layout): ``table [3, E]`` holds their addresses (w1, w3, w2), read in the kernel as typed pointers. A program
owns one expert and first checks whether any token chose it, so the unchosen experts' weights are never read:
at one token with top-4 of 16 experts, a quarter of them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mix_of_expert(expert_ids, weights, e, N, TOPK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr):
    """Token rows ``[BN]``, the mixing weight of expert ``e`` for each token (0 if not chosen, fp32), whether
    each token chose it, and how many tokens did. A token that did not choose ``e`` must get exactly nothing from
    it (``where``, not a zero weight: an overflow or NaN of ``e`` on its row times 0 would still be NaN)."""
    n = tl.arange(0, BN)
    j = tl.arange(0, BJ)
    mask = (n < N)[:, None] & (j < TOPK)[None, :]
    offs = n[:, None] * TOPK + j[None, :]
    b_ids = tl.load(expert_ids + offs, mask=mask, other=-1)
    b_w = tl.load(weights + offs, mask=mask, other=0.0).to(tl.float32)
    hit = b_ids == e
    picked = tl.sum(hit.to(tl.int32), axis=1) > 0
    return n, tl.sum(tl.where(hit, b_w, 0.0), axis=1), picked, tl.sum(hit.to(tl.int32))


@triton.jit
def moe_gate_up_kernel(
    x, expert_ids, weights, table, act, gate, up, N, E, HID, INTER, HID_PER_SPLIT,
    TOPK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr, BH: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per (expert e, block of BI intermediate columns, slice s of the hidden dimension), for every token n:
    with one slice, act[e, n] = mix[n, e] * silu(x_n w1[e]^T) * (x_n w3[e]^T) (``act [E, N, INTER]``, x's
    dtype); with SPLIT slices, the slice's partial sums of x_n w1[e]^T and x_n w3[e]^T into ``gate`` and
    ``up`` (``[SPLIT, E, N, INTER]`` fp32, finished by :func:`moe_act_kernel`). Nothing is written if no
    token chose e. More slices give a one-token step more programs, each streaming a slice of the weights."""
    e, i_i, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, b_mix, picked, chosen = _mix_of_expert(expert_ids, weights, e, N, TOPK, BN, BJ)
    if chosen > 0:
        dt = x.dtype.element_ty
        w1 = tl.load(table + e).to(tl.pointer_type(dt))
        w3 = tl.load(table + E + e).to(tl.pointer_type(dt))
        cols = i_i * BI + tl.arange(0, BI)
        cmask = cols < INTER
        nmask = n < N
        b_g = tl.zeros([BN, BI], dtype=tl.float32)
        b_u = tl.zeros([BN, BI], dtype=tl.float32)
        h_end = tl.minimum(HID, (i_s + 1) * HID_PER_SPLIT)
        for h0 in range(i_s * HID_PER_SPLIT, h_end, BH):
            hs = h0 + tl.arange(0, BH)
            hmask = hs < h_end
            b_x = tl.load(x + n[:, None] * HID + hs[None, :], mask=nmask[:, None] & hmask[None, :], other=0.0)
            w_offs = cols[None, :].to(tl.int64) * HID + hs[:, None]  # [BH, BI]: w[e]^T
            w_mask = hmask[:, None] & cmask[None, :]
            b_g += tl.dot(b_x, tl.load(w1 + w_offs, mask=w_mask, other=0.0), input_precision=IEEE)
            b_u += tl.dot(b_x, tl.load(w3 + w_offs, mask=w_mask, other=0.0), input_precision=IEEE)
        out_mask = nmask[:, None] & cmask[None, :]
        if SPLIT == 1:
            offs = (e * N + n[:, None]).to(tl.int64) * INTER + cols[None, :]
            b_act = tl.where(picked[:, None], b_g * tl.sigmoid(b_g) * b_u * b_mix[:, None], 0.0)
            tl.store(act + offs, b_act.to(dt), mask=out_mask)
        else:
            offs = ((i_s * E + e) * N + n[:, None]).to(tl.int64) * INTER + cols[None, :]
            tl.store(gate + offs, b_g, mask=out_mask)
            tl.store(up + offs, b_u, mask=out_mask)


@triton.jit
def moe_act_kernel(
    gate, up, expert_ids, weights, act, N, E, INTER,
    TOPK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Per (expert e, block of BI intermediate columns): act[e, n] = mix[n, e] * silu(g) * u, with g and u the
    sums of the SPLIT partial sums of :func:`moe_gate_up_kernel`; nothing is written if no token chose e."""
    e, i_i = tl.program_id(0), tl.program_id(1)
    n, b_mix, picked, chosen = _mix_of_expert(expert_ids, weights, e, N, TOPK, BN, BJ)
    if chosen > 0:
        cols = i_i * BI + tl.arange(0, BI)
        mask = (n < N)[:, None] & (cols < INTER)[None, :]
        b_g = tl.zeros([BN, BI], dtype=tl.float32)
        b_u = tl.zeros([BN, BI], dtype=tl.float32)
        for i_s in tl.static_range(SPLIT):
            offs = ((i_s * E + e) * N + n[:, None]).to(tl.int64) * INTER + cols[None, :]
            b_g += tl.load(gate + offs, mask=mask, other=0.0)
            b_u += tl.load(up + offs, mask=mask, other=0.0)
        offs = (e * N + n[:, None]).to(tl.int64) * INTER + cols[None, :]
        b_act = tl.where(picked[:, None], b_g * tl.sigmoid(b_g) * b_u * b_mix[:, None], 0.0)
        tl.store(act + offs, b_act.to(act.dtype.element_ty), mask=mask)


@triton.jit
def moe_down_kernel(
    act, expert_ids, weights, table, partial, N, E, HID, INTER,
    TOPK: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Per (expert e, block of BD output columns): partial[e, n] = act[e, n] w2[e]^T (``partial [E, N, HID]``
    fp32), written only for the tokens that chose e: :func:`moe_combine_kernel` reads no other."""
    e, i_d = tl.program_id(0), tl.program_id(1)
    n, _, picked, chosen = _mix_of_expert(expert_ids, weights, e, N, TOPK, BN, BJ)
    if chosen > 0:
        nmask = n < N
        cols = i_d * BD + tl.arange(0, BD)
        cmask = cols < HID
        b_o = tl.zeros([BN, BD], dtype=tl.float32)
        w2 = tl.load(table + 2 * E + e).to(tl.pointer_type(act.dtype.element_ty))
        for i0 in range(0, INTER, BI):
            ci = i0 + tl.arange(0, BI)
            imask = ci < INTER
            a_offs = (e * N + n[:, None]).to(tl.int64) * INTER + ci[None, :]
            b_a = tl.load(act + a_offs, mask=nmask[:, None] & imask[None, :], other=0.0)
            w_offs = cols[None, :].to(tl.int64) * INTER + ci[:, None]  # [BI, BD]: w2[e]^T
            b_w = tl.load(w2 + w_offs, mask=imask[:, None] & cmask[None, :], other=0.0)
            b_o += tl.dot(b_a, b_w, input_precision=IEEE)
        offs = (e * N + n[:, None]).to(tl.int64) * HID + cols[None, :]
        tl.store(partial + offs, b_o, mask=(nmask & picked)[:, None] & cmask[None, :])


@triton.jit
def moe_combine_kernel(
    partial, expert_ids, out, N, E, HID, TOPK: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Per (token n, block of BD columns): out[n] = sum of partial[e, n] over the distinct valid experts e that n
    chose (an id repeated in a row is counted once, as its mixing weights were summed into that expert's
    partial; an id outside [0, E) adds nothing), in out's dtype."""
    n, i_d = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BJ)
    b_ids = tl.load(expert_ids + n * TOPK + j, mask=j < TOPK, other=-1)
    cols = i_d * BD + tl.arange(0, BD)
    cmask = cols < HID
    b_o = tl.zeros([BD], dtype=tl.float32)
    for t in tl.static_range(TOPK):
        e = tl.sum(tl.where(j == t, b_ids, 0))
        earlier = tl.sum(((j < t) & (b_ids == e)).to(tl.int32))  # columns before t that chose e too
        if (e >= 0) & (e < E) & (earlier == 0):
            b_o += tl.load(partial + (e * N + n).to(tl.int64) * HID + cols, mask=cmask, other=0.0)
    tl.store(out + n.to(tl.int64) * HID + cols, b_o.to(out.dtype.element_ty), mask=cmask)


@triton.jit
def moe_route_kernel(
    logits, bias, expert_ids, weights, E, scaling, shared_expert,
    TOPK: tl.constexpr, K_OUT: tl.constexpr, BE: tl.constexpr, BJ: tl.constexpr, SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """Per token n: scores of ``logits [N, E]`` (fp32), the TOPK experts of largest score + ``bias`` (ties: the
    lowest id; a NaN first), their unbiased scores as weights (renormalised, times ``scaling``) into ``expert_ids`` and
    ``weights [N, K_OUT]``; with K_OUT = TOPK + 1 the last column is ``shared_expert`` with weight 1."""
    n = tl.program_id(0)
    e = tl.arange(0, BE)
    emask = e < E
    b_l = tl.load(logits + n * E + e, mask=emask, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        b_p = tl.exp(b_l - tl.max(b_l, axis=0))
        b_s = b_p / tl.sum(b_p, axis=0)
    else:
        b_s = tl.sigmoid(b_l)
    b_c = b_s
    if HAS_BIAS:
        b_c += tl.load(bias + e, mask=emask, other=0.0).to(tl.float32)
    b_c = tl.where(emask, b_c, float("-inf"))
    j = tl.arange(0, BJ)
    b_ids = tl.zeros([BJ], dtype=tl.int64)
    b_w = tl.zeros([BJ], dtype=tl.float32)
    for t in tl.static_range(TOPK):
        # As torch.topk: a NaN ranks above every number (a broken router shows in the output, not as a dropped expert)
        is_nan = b_c != b_c
        numbers = tl.where(is_nan, float("-inf"), b_c)
        at_max = tl.where(numbers == tl.max(numbers, axis=0), e, BE)  # the ids holding the largest number
        any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
        pick = tl.min(tl.where(any_nan, tl.where(is_nan, e, BE), at_max), axis=0)
        b_ids = tl.where(j == t, pick, b_ids)
        b_w = tl.where(j == t, tl.sum(tl.where(e == pick, b_s, 0.0), axis=0), b_w)
        b_c = tl.where(e == pick, float("-inf"), b_c)
    if RENORMALIZE:
        b_w = b_w / (tl.sum(b_w, axis=0) + 1e-20)
    b_w *= scaling
    if K_OUT > TOPK:
        b_ids = tl.where(j == TOPK, shared_expert, b_ids)
        b_w = tl.where(j == TOPK, 1.0, b_w)
    tl.store(expert_ids + n * K_OUT + j, b_ids, mask=j < K_OUT)
    tl.store(weights + n * K_OUT + j, b_w, mask=j < K_OUT)
