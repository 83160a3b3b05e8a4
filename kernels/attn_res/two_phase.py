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


# Launch constant (``--set attn_res.two_phase.PHASE1_TILE_ELEMENTS=INT``): phase 1 holds a row's completed sources in
# one [N_PAD, padded D] register tile while it has at most this many elements (0: never). 16384 is 8 sources at D 2048,
# 64 float32 registers per thread at 8 warps (119 in all for sm_90): the largest tile compiled and measured.
PHASE1_TILE_ELEMENTS = 16384


def phase1(
    storage: SourceStorage, n: int, queries: torch.Tensor, gains: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``queries``/``gains`` [Q, D] against the first ``n`` stored sources -> (out [Q, M, D], lse [Q, M] float32)."""
    m, d = storage.store.shape[1:]
    q = queries.shape[0]
    out = torch.empty((q, m, d), dtype=storage.store.dtype, device=storage.store.device)
    lse = torch.empty((q, m), dtype=torch.float32, device=storage.store.device)
    q_pad, n_pad = max(2, triton.next_power_of_2(q)), max(2, triton.next_power_of_2(n))
    one_tile = n_pad * block_d(d) <= PHASE1_TILE_ELEMENTS
    # one tile: the [N_PAD, D] sources in registers; otherwise the [Q_PAD, BLOCK_D] float32 query tile, <= 8K elements
    chunk = block_d(d) if one_tile else min(block_d(d), max(16, 8192 // q_pad))
    _triton.phase1_kernel[(m,)](
        storage.store, storage.rstd, queries.contiguous(), gains.contiguous(), out, lse,
        n, q, m, d,
        Q_PAD=q_pad, N_PAD=n_pad, BLOCK_D=chunk, ONE_TILE=one_tile, num_warps=num_warps(d),
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
