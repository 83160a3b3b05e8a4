"""Launchers of the two-phase inference kernels (no autograd: inference only).

Phase 1 runs once per block, at its first sublayer: the block's Q pseudo-queries read the completed sources
once and get (out [Q, M, D], lse [Q, M]). Phase 2 runs per sublayer and merges the intra-block partial sum
into its query's phase-1 result by online softmax (exact), with the sublayer's PreNorm fused: one launch
per sublayer. Traffic per sublayer: N/Q + 3 rows of D instead of N + 2 for the one-query kernel.

The model's inference path also folds the residual bookkeeping into these launches: phase 2 adds the previous
sublayer's output to the partial sum (``add``), and a block boundary stores the finished block and runs the next
block's phase 1 (with its first sublayer's PreNorm) in one kernel (``store_phase1``), so that a block of S
sublayers costs S launches, as many as the standard residual's fused add + PreNorm.
"""

from __future__ import annotations

import torch

from .._grid import cdiv, next_power_of_2
from . import _triton
from .fused import SourceStorage, block_d, num_warps, register_cap

# Launch constant (``--set attn_res.two_phase.PHASE1_TILE_ELEMENTS=INT``): phase 1 holds a row's completed sources in
# one [N_PAD, padded D] register tile while it has at most this many elements (0: never). 16384 is 8 sources at D 2048,
# 64 float32 registers per thread at 8 warps (119 in all for sm_90): the largest tile compiled and measured.
PHASE1_TILE_ELEMENTS = 16384
# Launch constant: the fused block boundary (``store_phase1``) gives each query a program of its own up to this many
# rows (decoding: one row per sequence, where one program per row left the launch a chain of Q queries), and runs
# every query of a group of rows in one program above it (prefill: each row's sources read once; the first source:
# ``store_scores_kernel``, later ones ``store_phase1_rows_kernel``).
STORE_PHASE1_SPLIT_ROWS = 256
# Launch constant: rows per program of the block boundary that stores the first source (``store_scores_kernel``)
# above STORE_PHASE1_SPLIT_ROWS rows. Session 25 (H100, M 8192 D 2048, 8 queries): 64.6 us at 1 row, 61.6 at 4, 62.4
# at 8; one row per program in ``store_phase1_kernel``, 100.7.
ONE_SOURCE_ROWS = 4
# Launch constant: the prefill block boundary over stored sources (``store_phase1_rows_kernel``, above
# STORE_PHASE1_SPLIT_ROWS rows) holds about this many source rows in its [rows, N_PAD, D] tile and the new source's
# row apart from it (``prefill_rows_layout``): rows per program PREFILL_ROW_SOURCES // (N_PAD, plus 1 if apart), at
# least 1. Session 27 (H100, M 8192 D 2048, us): at 4, two rows of 2 sources (8 queries 156.0, 4 queries 102.4) and
# one row of 4 or 8 (8 queries x 4 sources 194.5, the final aggregation's 1 query x 5 sources 111.0); one row per
# program in ``store_phase1_kernel``'s layout before it, 155.0, 104.8, 194.5, 129.4. Larger groups were slower (8: up
# to 21%; 16: up to 5x), and so were 8 warps (9-20% at 4).
PREFILL_ROW_SOURCES = 4
# Launch constant: the prefill block boundary over stored sources in pairs of rows (``store_phase1_rows_kernel`` at
# N_PAD 2, two rows per program) has its registers capped so that this many programs share an SM (0: no cap).
# Session 35 (H100, M 8192 D 2048, kernel GPU time in us): at 4 (sm_90 compile: 146 registers to 128, 12 B of
# spills) 8 queries 152.7 against 157.9 uncapped, 4 queries 100.5 against 108.8, and 5 or 6 slower (208.0, 245.3).
# The other boundaries were no faster capped at 4 (the first over v_0: 61.2 against 61.3) or slower (8 queries x 4
# sources 198.9 against 193.4; the final aggregation, 238 registers uncapped and spilling at the cap, 211.5 against
# 111.9).
PAIR_ROWS_PROGRAMS_PER_SM = 4
# Launch constant: 1 keeps the new source apart from the tile of stored sources where their count is a power of two
# (``prefill_rows_layout``), 0 puts it in the tile (which it then doubles). Session 35 (H100, M 8192 D 2048, us):
# 8 queries x 3 sources 180.0 against 187.7 in the tile, the final aggregation (1 x 5) 99.6 against 112.3: no padding
# rows, and fewer registers (``attn_res_registers.py``: 102 against 128, 137 against 207).
PREFILL_NEW_APART = 1
# Launch constant: 1 scores the prefill boundaries' queries two at a time where the tile of sources has 2 rows
# (``store_phase1_rows_kernel``'s QUERY_PAIRS): one round of reductions over D per pair, where a query's round is a
# chain of shuffles and block barriers; 0 one at a time.
# Session 36 (H100, M 8192 D 2048, kernel GPU time in us, pairs against one at a time): 8 queries x 2 sources 146.0
# against 153.5, 8 x 3 (the new source apart) 175.4 against 179.8, Kimi Linear's 4 x 2 96.1 against 100.8; on a
# tile of 4 no gain (8 x 4 191.9 against 193.2, 4 x 4 132.6 against 129.2), so those stay one at a time.
PREFILL_QUERY_PAIRS = 1
# Launch constant: the prefill boundary with its queries in pairs has its registers capped so that this many
# programs share an SM (0: no cap; in place of PAIR_ROWS_PROGRAMS_PER_SM). sm_90 compile (D 2048): 128 registers
# at 4, no spills. Session 36 (H100, us): uncapped, 8 x 2 154.6 against 146.0, 4 x 2 106.6 against 96.1.
QUERY_PAIRS_PROGRAMS_PER_SM = 4
# Launch constant: 1 scores the queries of the prefill boundary over v_0 alone (``store_scores_kernel``) two at a
# time, as PREFILL_QUERY_PAIRS does over stored sources; 0 one at a time. Session 37 (H200, M 8192 D 2048, kernel
# GPU time in us, pairs against one at a time): 8 queries 34.6 against 37.7, 4 queries 24.7 against 26.6. (The
# models' inference path scores no query there: ``store_phase1(scores=False)``.)
ONE_SOURCE_QUERY_PAIRS = 1


def _sources_pad(n_sources: int) -> int:
    """Rows of a source tile holding ``n_sources`` sources (a power of two, at least 2)."""
    return max(2, next_power_of_2(n_sources))


def prefill_rows_layout(n_prev: int, d: int, q: int) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``store_phase1_rows_kernel`` over ``n_prev`` stored sources at hidden size
    ``d`` for ``q`` queries: the tile holds the stored sources and the new one (N_PAD the next power of two), or,
    where ``n_prev`` is a power of two (which the new source would double), the stored ones alone and the new one
    apart (NEW_APART); about PREFILL_ROW_SOURCES sources' rows per program; several queries scored in pairs with
    PREFILL_QUERY_PAIRS, capped to QUERY_PAIRS_PROGRAMS_PER_SM; otherwise pairs of rows capped to
    PAIR_ROWS_PROGRAMS_PER_SM."""
    apart = bool(PREFILL_NEW_APART) and n_prev >= 2 and _sources_pad(n_prev) == n_prev
    n_pad = _sources_pad(n_prev if apart else n_prev + 1)
    rows = max(1, PREFILL_ROW_SOURCES // (n_pad + int(apart)))
    pairs = bool(PREFILL_QUERY_PAIRS) and q > 1 and n_pad == 2
    programs = 0  # (no cap)
    if pairs:
        programs = QUERY_PAIRS_PROGRAMS_PER_SM
    elif n_pad == 2 and rows == 2:
        programs = PAIR_ROWS_PROGRAMS_PER_SM
    options = {"num_warps": num_warps(d)}
    if programs:
        options["maxnreg"] = register_cap(options["num_warps"], programs)
    return dict(N_PAD=n_pad, NEW_APART=apart, BR=rows, BLOCK_D=block_d(d), QUERY_PAIRS=pairs), options


def fits_one_tile(n_sources: int, d: int) -> bool:
    """Whether phase 1 over ``n_sources`` sources of hidden size ``d`` holds them in one register tile (the fast
    path, and the only one of the fused block boundary ``store_phase1``)."""
    return _sources_pad(n_sources) * block_d(d) <= PHASE1_TILE_ELEMENTS


def _phase1_out(storage: SourceStorage, n: int, q: int) -> tuple[torch.Tensor, bool]:
    """Phase 1's out [q, M, D] over ``n`` sources (for ``q`` queries) and whether the kernels write it: a new tensor,
    or with one source that source itself, the output of every query (a softmax over one score is 1), as a view of
    its slot that the kernels do not write: a block boundary that stores v_0 then writes no Q copies of it (in the
    dense ~1B model's prefill, 8 of the 62 passes over [M, D] that its block boundaries made)."""
    m, d = storage.store.shape[1:]
    if n == 1:
        return storage.store[0].expand(q, m, d), False
    return torch.empty((q, m, d), dtype=storage.store.dtype, device=storage.store.device), True


def phase1(
    storage: SourceStorage, n: int, queries: torch.Tensor, gains: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``queries``/``gains`` [Q, D] against the first ``n`` stored sources -> (out [Q, M, D], lse [Q, M] float32).
    With one source, out is a read-only view of it (``_phase1_out``)."""
    m, d = storage.store.shape[1:]
    q = queries.shape[0]
    out, write_out = _phase1_out(storage, n, q)
    lse = torch.empty((q, m), dtype=torch.float32, device=storage.store.device)
    q_pad = max(2, next_power_of_2(q))
    one_tile = fits_one_tile(n, d)
    # one tile: the [N_PAD, D] sources in registers; otherwise the [Q_PAD, BLOCK_D] float32 query tile, <= 8K elements
    chunk = block_d(d) if one_tile else min(block_d(d), max(16, 8192 // q_pad))
    _triton.phase1_kernel[(m,)](
        storage.store, storage.rstd, queries.contiguous(), gains.contiguous(), out, lse,
        n, q, m, d,
        Q_PAD=q_pad, N_PAD=_sources_pad(n), BLOCK_D=chunk, ONE_TILE=one_tile, WRITE_OUT=write_out,
        num_warps=num_warps(d),
    )  # fmt: skip
    return out, lse


def store_phase1(
    storage: SourceStorage,
    n_prev: int,
    x: torch.Tensor,
    y: torch.Tensor | None,
    queries: torch.Tensor,
    gains: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
    first_out: bool = True,
    scores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Store ``x (+ y)`` [M, D] as source ``n_prev``, then phase 1 of ``queries``/``gains`` [Q, D] against sources
    0 .. n_prev, in one launch (needs ``fits_one_tile(n_prev + 1, D)``; the first source of a prefill, or any
    first source without ``scores``: ``store_scores_kernel``, rows in groups). Where ``x`` is the new source's slot
    already (an embedding gathered into slot 0), only its rstd is written. ``scores=False`` (``n_prev`` 0) scores
    no query: lse is None, each query's being the score of out, the lone source, which phase 2 computes from it
    (``phase2`` with ``lse=None``).

    Returns out [Q, M, D] (with ``n_prev`` 0, a read-only view of the new source: ``_phase1_out``), lse [Q, M]
    float32 (None without ``scores``) and, with ``norm_weight``, query 0's sublayer input [M, D] (the PreNorm of
    out[0]), else None. ``first_out=False`` (needs ``norm_weight``): out [Q - 1, M, D] holds queries 1 .. Q - 1,
    query 0's output is not written (one pass over [M, D] less; its PreNorm is the third result).
    """
    m, d = storage.store.shape[1:]
    q = queries.shape[0]
    dev = storage.store.device
    in_slot = y is None and x.dtype == storage.store.dtype and x.data_ptr() == storage.store[n_prev].data_ptr()
    if not (scores or n_prev == 0):
        raise ValueError(f"scores=False needs the new source to be the only one, it is source {n_prev}")
    out, write_out = _phase1_out(storage, n_prev + 1, q if first_out else q - 1)
    lse = torch.empty((q, m), dtype=torch.float32, device=dev) if scores else None
    first = torch.empty((m, d), dtype=storage.store.dtype, device=dev) if norm_weight is not None else None
    # the sources' pointers and the parameters, in every kernel's order (unused ones point at any tensor)
    inputs = (x, y if y is not None else x, storage.store, storage.rstd, queries.contiguous(), gains.contiguous(),
              norm_weight.contiguous() if norm_weight is not None else gains)  # fmt: skip
    flags = dict(HAS_Y=y is not None, HAS_NORM=norm_weight is not None)
    if n_prev == 0 and (m > STORE_PHASE1_SPLIT_ROWS or not scores):
        n_scored = q if scores else 0
        _triton.store_scores_kernel[(cdiv(m, ONE_SOURCE_ROWS),)](
            *inputs, lse if scores else storage.rstd, first if first is not None else x, n_scored, m, d, storage.eps,
            norm_eps, **flags, STORE=not in_slot, BR=ONE_SOURCE_ROWS, BLOCK_D=block_d(d),
            QUERY_PAIRS=bool(ONE_SOURCE_QUERY_PAIRS) and n_scored > 1, num_warps=num_warps(d),
        )  # fmt: skip
        return out, lse, first
    n_pad = _sources_pad(n_prev + 1)
    outputs = (out, lse, first if first is not None else out)
    if m > STORE_PHASE1_SPLIT_ROWS:
        constants, options = prefill_rows_layout(n_prev, d, q)
        _triton.store_phase1_rows_kernel[(cdiv(m, constants["BR"]),)](
            *inputs, *outputs, n_prev, q, m, d, storage.eps, norm_eps, **flags, FIRST_OUT=first_out, **constants,
            **options,
        )  # fmt: skip
        return out, lse, first
    _triton.store_phase1_kernel[(m * q,)](
        *inputs, *outputs, n_prev, q, m, d, storage.eps, norm_eps,
        **flags, STORE=not in_slot, N_PAD=n_pad, BLOCK_D=block_d(d), WRITE_OUT=write_out, FIRST_OUT=first_out,
        num_warps=num_warps(d),
    )  # fmt: skip
    return out, lse, first


def phase2(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
    add: torch.Tensor | None = None,
    keep_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge out [M, D] / lse [M] with the partial sum [M, D] (if any), then the optional PreNorm.

    ``lse=None``: out is a lone source, whose lse is its score (computed in the kernel, with key-norm ``eps``).
    With ``add`` [M, D] the partial sum merged is ``partial + add``, formed in the same launch and, with
    ``keep_sum``, written. Returns (h [M, D], the partial sum merged: ``partial`` itself without ``add``, None
    without ``keep_sum``).
    """
    m, d = out.shape
    h = torch.empty_like(out)
    new_partial, sum_out = partial, out  # (sum_out: where the kernel writes partial + add, and in whose dtype)
    if add is not None:
        # not kept, the sum is still rounded to its dtype, which a one-element tensor gives the kernel
        sum_out = torch.empty((m, d) if keep_sum else (1,), dtype=torch.promote_types(partial.dtype, add.dtype),
                              device=out.device)  # fmt: skip
        new_partial = sum_out if keep_sum else None
    _triton.phase2_kernel[(m,)](
        out, lse if lse is not None else out, partial if partial is not None else out, add if add is not None else out,
        sum_out, query.contiguous(), gain.contiguous(), norm_weight.contiguous() if norm_weight is not None else gain,
        h, d, eps, norm_eps,
        HAS_PARTIAL=partial is not None, HAS_ADD=add is not None, STORE_SUM=keep_sum, SCORE_OUT=lse is None,
        HAS_NORM=norm_weight is not None, BLOCK_D=block_d(d), num_warps=num_warps(d),
    )  # fmt: skip
    return h, new_partial
