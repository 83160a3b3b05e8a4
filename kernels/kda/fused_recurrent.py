"""Triton kernel for KDA token by token (decoding and short prompts), forward only.

One program owns a ``[K, BV]`` column tile of one head's fp32 state and walks that sequence's tokens:

    S <- exp(g_t)[:, None] * S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T (q_t * scale)

Decoding is bound by streaming the state (N*H*K*V*4 bytes read and written per step), so the grid
tiles V finely enough for hundreds of programs even at batch 1, and the host side is one allocation
and one launch: no host synchronisation, safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2
from .chunk_fwd import softplus
from .utils import L2NORM_EPS, gate_params


@triton.jit
def _fused_recurrent_kda_fwd_kernel(
    q, k, v, g, beta, o, h0, ht, A_log, dt_bias, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    L2_EPS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr, USE_GATE: tl.constexpr, BETA_SIGMOID: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # One grid axis, a head's column tiles next to each other in launch order: they read the parts of the same state
    # rows, which the DRAM serves better together (B64 H32: 69.4 us against 71.7 with a second grid axis over tiles).
    pid = tl.program_id(0).to(tl.int64)
    i_nh, i_v = pid // tl.cdiv(V, BV), pid % tl.cdiv(V, BV)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n * T
        length = T
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    p_state = (i_nh * K + offs_k[:, None]) * V + offs_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        # The state is streamed past the caches (evict-first loads, ".cs" stores): each program reads and writes
        # its tile once, and in L2 it would only displace the per-token inputs. B64 H32: 71.6 us against 73.2.
        b_h += tl.load(h0 + p_state, mask=mask_h, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if USE_GATE:
        decay_rate = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_dt = tl.load(dt_bias + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)

    p_qkg = (bos * H + i_h) * K + offs_k
    p_vo = (bos * H + i_h) * V + offs_v
    p_beta = bos * H + i_h
    for _ in range(length):
        b_q = tl.load(q + p_qkg, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qkg, mask=mask_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_qkg, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_vo, mask=mask_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + p_beta).to(tl.float32)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + L2_EPS)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + L2_EPS)
        if USE_GATE:
            b_g = -decay_rate * softplus(b_g + b_dt)
        b_h *= tl.exp(b_g)[:, None]
        b_u = (b_v - tl.sum(b_h * b_k[:, None], axis=0)) * b_beta
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[:, None], axis=0)
        tl.store(o + p_vo, b_o.to(o.dtype.element_ty), mask=mask_v)
        p_qkg += H * K
        p_vo += H * V
        p_beta += H
    if STORE_FINAL_STATE:
        tl.store(ht + p_state, b_h, mask=mask_h, cache_modifier=".cs")


def _tiling(num_heads_total: int, K: int, V: int, block_v: int | None = None) -> tuple[int, int]:
    """State columns per program (``block_v``, unless given) and warps, for N * H head states of [K, V].

    Few heads: narrow tiles at 16 state elements per thread (56-80 registers on sm_90 at K = 128), so that
    even batch 1 spreads the state over the SMs. From 1024 head states (B32 at H32) the grid has waves to
    spare, and wider tiles at 64 elements per thread keep more of the state in flight per program: 64
    columns at 4 warps took 77.2 us per step at B64 H32 K=V=128 against 84.7 us for 32 columns at 8 warps
    (BENCHMARKS.md, session 7 sweep).
    """
    wide = num_heads_total >= 1024
    if block_v is None:
        block_v = 64 if wide else 32 if num_heads_total >= 512 else 16 if num_heads_total >= 128 else 8
        block_v = min(block_v, next_power_of_2(V))
    per_thread = 64 if wide else 16
    return block_v, max(1, min(8, next_power_of_2(K) * block_v // (32 * per_thread)))


def fused_recurrent_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    inplace_final_state: bool,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA recurrence in one launch (inputs already validated by the public op).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``.
        g: ``[B, T, H, K]`` log-decay, or with ``use_gate_in_kernel`` the raw gate turned into
            ``-exp(A_log[h]) * softplus(g + dt_bias)`` (A_log ``[H]`` or ``[1, 1, H, 1]``, dt_bias
            ``[H*K]`` or ``[H, K]``).
        scale: query scale.
        initial_state: ``[N, H, K, V]`` (read as fp32) or None; N = B or ``len(cu_seqlens) - 1``.
        output_final_state: return the final ``[N, H, K, V]`` fp32 state.
        use_qk_l2norm_in_kernel: L2-normalise q and k (fp32, fla's epsilon) before use.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits, turned into sigmoid(beta) in fp32.
        cu_seqlens: ``[N + 1]`` offsets of sequences packed along T (B == 1), or None.
        inplace_final_state: write the final state into ``initial_state`` (contiguous fp32) and return it.
        block_v: state columns per program (a power of two; default from the number of heads), for tuning.
        num_warps: warps per program (default: :func:`_tiling`), for tuning.

    Returns:
        ``(o [B, T, H, V] in q's dtype, final state or None)``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if cu_seqlens is not None:  # the kernel reads the offsets at unit stride, on q's device (as the chunked op)
        cu_seqlens = cu_seqlens.to(q.device).contiguous()
    if initial_state is not None and not inplace_final_state:
        initial_state = initial_state.contiguous()
    if use_gate_in_kernel:
        A_log, dt_bias = (t.contiguous() for t in gate_params(A_log, dt_bias, H, K))
    if inplace_final_state:
        final_state = initial_state
    elif output_final_state:
        final_state = q.new_empty(N, H, K, V, dtype=torch.float32)
    else:
        final_state = None
    o = q.new_empty(B, T, H, V)
    block_k = next_power_of_2(K)
    block_v, default_warps = _tiling(N * H, K, V, block_v)
    # one grid axis (the others stop at 65535 programs)
    _fused_recurrent_kda_fwd_kernel[(N * H * cdiv(V, block_v),)](
        q, k, v, g, beta, o, initial_state, final_state, A_log, dt_bias, cu_seqlens, scale, T,
        H=H, K=K, V=V, BK=block_k, BV=block_v, L2_EPS=L2NORM_EPS,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=final_state is not None,
        USE_QK_L2NORM=use_qk_l2norm_in_kernel, USE_GATE=use_gate_in_kernel,
        BETA_SIGMOID=use_beta_sigmoid_in_kernel, IS_VARLEN=cu_seqlens is not None,
        num_warps=default_warps if num_warps is None else num_warps,
    )
    return o, final_state
