"""Launchers of the two-phase inference kernels (no autograd: inference only).

Phase 1 runs once per block, at its first sublayer: the block's Q pseudo-queries read the completed sources
once and get (out [Q, M, D], lse [Q, M]). Phase 2 runs per sublayer and merges the intra-block partial sum
into its query's phase-1 result by online softmax (exact), with the sublayer's PreNorm fused: one launch
per sublayer. Traffic per sublayer: N/Q + 3 rows of D instead of N + 2 for the one-query kernel.
"""

from __future__ import annotations

import torch
import triton

from . import _triton
from .fused import SourceStorage, block_d, num_warps


# Launch constants of phase 1 (``--set attn_res.two_phase.NAME=INT`` in the benchmarks): rows per program and hidden
# chunk of its scores pass (dots of [rows, chunk] x [chunk, queries]; rows >= 16), warps (the outputs pass takes one
# row per warp at a time) and hidden chunk of the outputs pass.
PHASE1_ROWS = 32
PHASE1_SCORE_CHUNK = 128
PHASE1_WARPS = 4
PHASE1_OUT_CHUNK = 256


def phase1(
    storage: SourceStorage, n: int, queries: torch.Tensor, gains: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``queries``/``gains`` [Q, D] against the first ``n`` stored sources -> (out [Q, M, D], lse [Q, M] float32)."""
    m, d = storage.store.shape[1:]
    q = queries.shape[0]
    dev = storage.store.device
    out = torch.empty((q, m, d), dtype=storage.store.dtype, device=dev)
    lse = torch.empty((q, m), dtype=torch.float32, device=dev)
    scores = torch.empty((n, q, m), dtype=torch.float32, device=dev)
    q_pad = triton.next_power_of_2(q)
    width = triton.next_power_of_2(d)
    _triton.phase1_kernel[(triton.cdiv(m, PHASE1_ROWS),)](
        storage.store, storage.rstd, queries.contiguous(), gains.contiguous(), out, lse, scores, n, q, m, d,
        BM=PHASE1_ROWS, Q_PAD=q_pad, Q_DOT=max(16, q_pad), BLOCK_D=max(16, min(width, PHASE1_SCORE_CHUNK)),
        SPLIT_BF16=storage.store.dtype == torch.bfloat16, OUT_ROWS=PHASE1_WARPS, OUT_D=min(width, PHASE1_OUT_CHUNK),
        num_warps=PHASE1_WARPS,
    )  # fmt: skip
    return out, lse


def phase2(
    out: torch.Tensor,
    lse: torch.Tensor,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
) -> torch.Tensor:
    """Merge out [M, D] / lse [M] with the partial sum [M, D] (if any), then the optional PreNorm: h [M, D]."""
    m, d = out.shape
    h = torch.empty_like(out)
    _triton.phase2_kernel[(m,)](
        out, lse, partial if partial is not None else out, query.contiguous(), gain.contiguous(),
        norm_weight.contiguous() if norm_weight is not None else gain, h, d, eps, norm_eps,
        HAS_PARTIAL=partial is not None, HAS_NORM=norm_weight is not None, BLOCK_D=block_d(d), num_warps=num_warps(d),
    )  # fmt: skip
    return h
