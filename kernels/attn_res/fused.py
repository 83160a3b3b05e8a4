"""Launchers and autograd Functions of the fused Triton depth attention (training path).

Why not plain autograd over a preallocated buffer: writing block b_n into ``store[n]`` in place would bump
the version counter that every earlier reader saved, and a per-reader gradient of the whole buffer would
cost a [S_max, M, D] tensor per sublayer. Instead:

* ``StoreSourceFunction`` writes a finished source ONCE into its slot of the shared ``SourceStorage``
  (fused with the last partial-sum addition of the block and with the rsqrt statistic, cached for every
  later reader) and returns a handle that only carries the autograd edge.
* ``DepthAttentionFunction`` reads the first ``n`` slots directly (handles are inputs only so that autograd
  runs their backward after every reader's) and ACCUMULATES the slot gradients into ``storage.grad``;
  the slot's ``StoreSourceFunction.backward`` then hands the summed gradient to the producer. The readers of the
  same ``n`` slots (a block's sublayers) may instead leave their share in a ``DeferredGrads``, which adds the
  sum of all of them in one pass when the first of those slots' ``StoreSourceFunction.backward`` runs
  (``SourceStorage.settle``): autograd runs it only after every reader of the slot.

The store is append-only and every slot is written exactly once per forward with deterministic values,
so re-running a decoder layer under (non-reentrant) gradient checkpointing rewrites identical bytes and
is safe. The storage is referenced from ``ctx`` (not saved tensors): it lives until the graph is freed.
Backward may run once per forward: a second one through a stored source (``retain_graph``, or two losses over one
bank backwarded apart) raises, where it would double-count ``storage.grad``. The backward kernels are not themselves
differentiable, so a backward with ``create_graph=True`` (a gradient penalty, any second derivative) raises: it would
treat their gradients as constants and give wrong second derivatives without a word.
"""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

from .._backend import refuse_create_graph
from .._grid import cdiv, next_power_of_2, sm_count
from . import _triton


def block_d(d: int) -> int:
    """Power-of-two register width covering the hidden size ``d`` (one token row per program)."""
    if d > 16384:
        raise ValueError(f"hidden size {d} too large for the fused depth attention (max 16384)")
    return next_power_of_2(d)


# Warps of the one-row-per-program kernels (``--set attn_res.fused.ROW_WARPS=4``): the source stores, the inference
# phases and the standard residual's RMSNorm, the anchor, so that a sweep moves both sides alike. 0: by D. At decode
# each of these launches is one row, and the warps set how many threads share its reductions (sm_90, D 2048: phase 2
# 64 registers at 4 warps, 39 at 8; the block boundary 216 and 115, and it spills at 2). Session 14 at decode (H200,
# D 2048): phase 2 1.7 us at 4 and 8 warps, 1.9 at 16; the boundary 2.1-2.9 us at 4, 2.2-3.1 at 8, 5.3-6.0 at 16; the
# anchor 1.2 us at each. Session 24 at prefill (H200, M 8192, D 2048): the block boundary 80-178 us at 4 warps, 99-229
# at 8, 776-1558 at 16; the anchor 33.8, 33.6 and 36.2 us. Past D 2048 the row pads to 4096 columns, and 4 warps would
# hold 32 of each source's values per thread (untimed), so 8 stay there.
ROW_WARPS = 0


def num_warps(d: int) -> int:
    """Warps of the one-row-per-program kernels: ``ROW_WARPS`` if set, else 4 up to D 2048, 8 up to 4096, 16 above."""
    if ROW_WARPS:
        return ROW_WARPS
    return 4 if d <= 2048 else (8 if d <= 4096 else 16)


# Launch constants of the depth attention (``--set attn_res.fused.NAME=INT`` in the benchmarks). Defaults: the best of
# a session-8 sweep by kernel GPU time on an H200 (bench_small_ops.py --sections attn_res, D 2048 bf16; BENCHMARKS.md).
# Sources (stored + the partial sum) whose loads a forward program issues together. Session 14: tiles of 8 sources
# were 1.4-2.3x slower at 4 warps (the tile spills) and 4.4-7.7x at 16. It now sets only rows of more than
# FWD_ONE_TILE_SOURCES: session 29 (H100, Kimi Linear step, its rows of 5) the forward 1.019 ms at 2 against about
# 1.03 at 1 (one call, within its spread), 1.061 at 4.
FWD_SOURCE_TILE = 1
# Rows of at most this many sources (stored + the partial sum; a power of two) take the forward's one-tile path
# instead: every source loaded at once and scored in one reduction, the partial's rstd with them (what the backward
# does, ``_row_tile``); 0: off. FWD_ONE_TILE_ELEMENTS of the tile per thread: warps = tile x padded D / (32 x this).
# Session 28 (H100, the forward's kernels per training step): dense Block 2.10 ms at 4 against 2.37 off, 2.77 at 8
# (tiles of 8 at 8 warps; 2.65 at 4 warps, 3.78 at 16); Kimi Linear 1.04 against 1.15 off, 1.32 at 8.
FWD_ONE_TILE_SOURCES = 4
FWD_ONE_TILE_ELEMENTS = 64
# Rows of FWD_ONE_TILE_SOURCES stored sources and the partial sum: the partial apart from a one-tile row of the stored
# ones (1), as the backward's BWD_PARTIAL_APART, not the online softmax over tiles of FWD_SOURCE_TILE (0), which
# waits for each source's load in turn. Session 31 (H100, dense training step, same call): the forward's kernels 1.86
# ms per step against 2.03 (its rows of 4 + 1 at 69 us per sublayer against 92, ncu; at the byte floor of the 3.0 TB/s
# copy bandwidth, as are all its one-tile rows now).
FWD_PARTIAL_APART = 1
# Rows of up to this many sources (a power of two) take the backward on one tile of their own width (the next power
# of two: rows of 2 a tile of 2, not of 4; no measurable change in the training step, session 30), kept in registers.
BWD_SOURCE_TILE = 4
# Rows with more sources than BWD_SOURCE_TILE and at most this many (a power of two) also take the one-tile backward,
# on a tile of the next power of two with proportionally more warps, so that each thread holds as many elements as
# at BWD_SOURCE_TILE (D 2048: 8 sources at 8 warps, like 4 at 4; 255 registers, no spills on sm_90). Wider rows take
# two passes over the tiles, reading their sources twice (and spilling 200 B with the partial sum). Session 14, H200,
# M 8192 D 2048 bf16, 4 stored sources and the partial: fwd+bwd 390 us against 438 on two passes (4 = off); rows of
# up to 4 sources unchanged. Session 29 (H100, Kimi Linear step): the backward 3.07 ms against 3.22 at 4.
BWD_ONE_TILE_SOURCES = 8
FWD_ELEMENTS_PER_THREAD = 16  # of each row of D: warps = padded D / (32 * this), at most 16
BWD_ELEMENTS_PER_THREAD = 16
# Rows of 2 or 4 (up to BWD_SOURCE_TILE) stored sources and the partial sum: the partial apart from a tile of the
# stored ones (1), not all of them on a tile of twice that (0). 4 + 1, session 30 (H100, training step; sm_90, D 2048:
# 253 registers deferred, 255 and 20 B of spills direct, so 2 programs of 4 warps per SM, where the tile of 8 at 8
# warps fits 1): the backward 4.38 ms per dense step against 5.51, 2.69 against 3.10 on Kimi Linear (its last block's
# rows). 2 + 1, session 31 (H100, training step, 5 pairs each in one call): a tile of 2 with no padding row, and so a
# narrow launch (below; 44 B of spills deferred, 104 B direct), where the tile of 4 held 2 programs per SM: the
# backward 4.04 ms per dense step against 4.24, 2.55 against 2.61 on Kimi Linear.
BWD_PARTIAL_APART = 1
# The backward at a hidden size that is a power of two compiled without column masks (1; 0: masked as at any other).
# Session 32 (H100, dense training step, same call): 3.72 ms per step against 3.82, in each of 5 repetitions (sm_90,
# D 2048: 1-8% fewer SASS instructions per row loop).
BWD_EVEN_D = 1
# Rows over n stored sources and no partial sum whose first n - 1 fill the tile that rows with a partial sum keep it
# apart from (forward: FWD_ONE_TILE_SOURCES of them, backward: BWD_SOURCE_TILE), while n alone would take a wider path
# (the forward's online softmax over tiles of one source; the backward's tile of 8 at 8 warps, one program per SM):
# the last stored source is read as the partial sum (1; 0: off). A model of 4 blocks ends on such a row, its final
# aggregation over the 4 blocks and the embedding. In the backward, the partial's gradient goes straight to that
# source's slot, where the row is its first writer (else the wider path). Session 32 (H100, dense training step, same
# call): the backward 3.85 ms per step against 3.98 (the final aggregation's launch 168 us against about 290), the
# forward 1.86 against 1.87.
LAST_AS_PARTIAL = 1
# Software-pipelining stages of the backward's row loop (Triton's ``num_stages`` on it; 1: none), for rows that read no
# gradient rows (deferred, or the first writer of their sources). At 3 the next row's loads go out through cp.async into
# shared memory while this row computes (sm_90, D 2048, triton 3.6: rows of 3 + 1 deferred, 255 registers and 49 KB of
# shared memory per program); at 2 its copies wait for this row's last use of the single buffer, at the end of the loop,
# so nothing overlaps (session 14 found 2 no faster: fwd+bwd 182-214 us against 182-203). Session 33 (H100, dense
# training step, same call): the backward 3.35 ms per step at 3 against 3.76 at 1 and 4.19 at 4 (the whole step +2.72%
# against +2.93%). Rows that add into the stored gradients stay at 1: their gradient rows pipelined too take 74-82 KB of
# shared memory and spill 112-364 B (Kimi Linear's blocks of 4 readers, all such rows at 3: 3.25 ms against 2.40).
BWD_STAGES = 3
# Backward programs (and rows of the parameter-gradient partials) per SM. Session 28 (H100, dense ~1B Block training
# step, deferred gradients): 2 took the backward and its parameter reduction from 5.81 ms per step at 4 to 5.57 (the
# reduction 0.36 -> 0.20 ms: half the partial rows); 8 took 6.28. Session 14 (H200, op level): 4 against 8.
BWD_PROGRAMS_PER_SM = 2
# ...except rows on one tile of at most BWD_NARROW_SOURCES sources: BWD_NARROW_PROGRAMS_PER_SM (0: as the others), with
# their registers capped to fit (168 at 4 warps; sm_90, D 2048, with the PreNorm: 1 stored source and the partial sum
# no spills deferred, 36 B direct; 2 and the partial apart 44 B deferred, 104 B direct) and the query, gain and
# PreNorm weight re-read per row. The backward's time follows the rows in flight per SM, not the work per row.
# Session 30 (H100, training step): 3 took the backward from 4.33 to 4.17 ms per dense step (the parameter reduction
# 0.19 -> 0.20), from 2.66 to 2.57 on Kimi Linear.
BWD_NARROW_SOURCES = 2
BWD_NARROW_PROGRAMS_PER_SM = 3
BWD_NARROW_REGISTERS = 168  # the least registers per thread a narrow launch is capped at (the figures above)
_SM_REGISTERS = 65536  # 32-bit registers per SM (sm_80 and sm_90)
PARAM_GRAD_COLUMNS = 8  # columns per program of the parameter-gradient reduction
# Rows of the per-program partials it sums per step (a [ROWS, COLUMNS] tile): the backward's programs' partials (two
# or three per SM) in one step, so that its loads are in flight together. Session 32 (H100, dense training step): 160
# us per step against 210 at 128 (three steps of 128 rows each waiting for its loads).
PARAM_GRAD_ROWS = 512
# Deferred stored-source gradients (``DeferredGrads``): at most this many readers of the same stored sources share
# one ``deferred_grad_kernel`` pass (0, or fewer than DEFER_MIN_READERS: every reader adds into the stored gradients
# itself). 8: a block of the dense ~1B model. Session 28 (H100, training step's kernels, 4 backward programs per SM):
# dense Block 9.01 ms against 9.12 without (the backward 6.24 -> 5.45 ms, the deferred passes 0.69), Kimi Linear 4.72
# against 4.63 (its blocks of 4 readers move about as many bytes either way).
DEFER_READERS = 8
# Fewer readers than this never defer, whatever the bytes: a deferred pass costs about 100 + 17 K us (K readers, M
# 8192, D 2048, H100), more than a reader's bytes say it saves where the reader's backward is bound by its row chain.
# Session 29 (H100, rows not pipelined): Kimi Linear's blocks of 4 readers, the backward 3.09 ms direct against 2.67 +
# 0.49 of deferred passes (the whole step +2.90% against +3.03%), so 6. Session 33 (H100, paired training step, same
# call): with the deferred rows' loop pipelined (``BWD_STAGES``) and the direct ones not, those blocks deferred take
# the backward to 1.56 ms + 0.45 of deferred passes against 2.33 direct, the whole step +1.60% against +2.06%.
DEFER_MIN_READERS = 4
# Of the deferred pass's [N_PAD, padded D] float32 sum per thread: warps = its size / (32 * this). Session 28 (H100,
# dense step): 64 0.69 ms, 32 0.83, 128 1.24.
DEFER_ELEMENTS_PER_THREAD = 64


def _warps(width: int, elements_per_thread: int) -> int:
    """Warps for a row of ``width`` (padded D) at ``elements_per_thread`` of it per thread, 1 to 16."""
    return max(1, min(16, width // (32 * elements_per_thread)))


def _defers(n: int, readers: int) -> bool:
    """Whether ``readers`` backward passes over the same ``n`` stored sources should defer their gradients into them
    (``DeferredGrads``): a pass sums K = min(readers, DEFER_READERS) of them, at least DEFER_MIN_READERS, and moves
    fewer [M, D] rows: K readers adding into the stored gradients themselves read and write 2 n K rows; deferred,
    each writes its dh and one pass reads them back, with the sources and their gradients once: 2 K + 3 n."""
    k = min(readers, DEFER_READERS)
    return k >= DEFER_MIN_READERS and 2 * n * k > 2 * k + 3 * n


class DeferredGrads:
    """Backward state of the readers of the first ``n`` stored sources (a block's sublayers) whose gradients into
    those sources one ``deferred_grad_kernel`` pass adds into ``storage.grad``, instead of each reader reading and
    writing every stored gradient row (``depth_attn_bwd_kernel``'s DEFER).

    Attributes:
        dh: [capacity, M, D] each reader's gradient of its h, in the store's dtype.
        coef: [capacity, M, 3, pad] float32 each reader's (alpha_i, c_i, e_i) per stored source i (pad >= n).
        u: [capacity, D] float32 each reader's pseudo-query times gain.
        count: readers taken since the last pass.
    """

    def __init__(self, storage: SourceStorage, n: int, capacity: int) -> None:
        m, d = storage.store.shape[1:]
        dev = storage.store.device
        # (the storage is passed to take/flush, not kept: it holds this object, and a cycle would keep its
        # [num_slots, M, D] buffers alive until the garbage collector ran)
        self.n, self.pad, self.count = n, next_power_of_2(n), 0
        self.dh = torch.empty((capacity, m, d), dtype=storage.store.dtype, device=dev)
        self.coef = torch.empty((capacity, m, 3, self.pad), dtype=torch.float32, device=dev)
        self.u = torch.empty((capacity, d), dtype=torch.float32, device=dev)

    def take(self, storage: SourceStorage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A reader's (dh [M, D], coef [M, 3, pad], u [D]) buffers; a full set of buffers is first summed."""
        if self.count == len(self.dh):
            self.flush(storage)
        k = self.count
        self.count += 1
        return self.dh[k], self.coef[k], self.u[k]

    def flush(self, storage: SourceStorage) -> None:
        """Add the readers taken so far into ``storage``'s stored sources' gradients (one launch)."""
        if self.count == 0:
            return
        m, d = storage.store.shape[1:]
        width = block_d(d)
        gstore, fresh = storage.grad_buffer(self.n)
        _triton.deferred_grad_kernel[(m,)](
            storage.store, gstore, self.dh, self.coef, self.u, self.n, m, d,
            K=self.count, N_PAD=self.pad, BLOCK_D=width, ACCUMULATE=not fresh,
            num_warps=_warps(width * self.pad, DEFER_ELEMENTS_PER_THREAD),
        )  # fmt: skip
        self.count = 0


class SourceStorage:
    """Shared, append-only buffers of one forward pass.

    Attributes:
        store: [num_slots, M, D] completed sources (embedding, then one per finished block).
        rstd: [num_slots, M] float32 cached rsqrt(mean(v^2) + eps) of each stored source.
        grad: [num_slots, M, D] gradient accumulators, allocated (not zeroed) by the first backward that needs them.
        written: the slots of ``grad`` that a kernel has written (``grad_buffer``); the others hold no values.
        readers: per number of stored sources n, the pseudo-queries (by address) that read exactly those n in a
            forward: how many readers a backward over them can defer (a set, so that the forward a gradient
            checkpoint runs again counts no reader twice).
        deferred: per n, the ``DeferredGrads`` of the readers of those n sources not yet added into ``grad``.
    """

    def __init__(self, num_slots: int, like: torch.Tensor, eps: float) -> None:
        d = like.shape[-1]
        m = like.numel() // d
        self.shape = like.shape
        self.eps = eps
        self.store = torch.empty((num_slots, m, d), dtype=like.dtype, device=like.device)
        self.rstd = torch.empty((num_slots, m), dtype=torch.float32, device=like.device)
        self.grad: torch.Tensor | None = None
        self.written: set[int] = set()
        self.readers: dict[int, set[int]] = {}
        self.deferred: dict[int, DeferredGrads] = {}

    def grad_buffer(self, n: int) -> tuple[torch.Tensor, bool]:
        """(``grad``, whether a kernel writing the first ``n`` slots' gradients stores them instead of adding into
        them). The buffer is not zeroed: a slot holds values only once a kernel has written it (``written``), and
        the first to do so stores. The first backward reader is usually the last forward's, over every slot (the
        final aggregation), so this spares a zero fill of the whole buffer and that reader a read of it (the dense
        ~1B model: 2 x 168 MB per step). Slots of a mixed range are zeroed first."""
        grad = self._grad()
        fresh = [s for s in range(n) if s not in self.written]
        if len(fresh) == n:
            self.written.update(fresh)
            return grad, True
        for s in fresh:
            grad[s].zero_()
            self.written.add(s)
        return grad, False

    def first_write(self, slot: int) -> torch.Tensor:
        """The gradient row block [M, D] of stored source ``slot``, which no kernel has written yet and the caller's
        will (it stores, not adds)."""
        if slot in self.written:
            raise RuntimeError(f"stored source {slot}'s gradient is already written")
        self.written.add(slot)
        return self._grad()[slot]

    def _grad(self) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.empty_like(self.store)
        return self.grad

    def slot_grad(self, slot: int) -> torch.Tensor | None:
        """The gradient summed into stored source ``slot`` [M, D], or None where no reader wrote one."""
        return self.grad[slot] if slot in self.written else None

    def deferral(self, n: int) -> DeferredGrads | None:
        """The ``DeferredGrads`` a backward over the first ``n`` stored sources adds into, or None when its readers
        are too few for deferring to pay (``_defers``)."""
        if n in self.deferred:
            return self.deferred[n]
        readers = len(self.readers.get(n, ()))
        if not _defers(n, readers):  # (also with DEFER_READERS 0)
            return None
        self.deferred[n] = DeferredGrads(self, n, min(readers, DEFER_READERS))
        return self.deferred[n]

    def settle(self, slot: int) -> None:
        """Add every deferred gradient into stored source ``slot`` (from the readers of more than ``slot`` sources)
        and free those readers' buffers: called before the slot's gradient is handed on."""
        for n in [n for n in self.deferred if n > slot]:
            self.deferred.pop(n).flush(self)


def store_source_fwd(storage: SourceStorage, slot: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Write ``x (+ y)`` into ``storage.store[slot]`` and its rstd into ``storage.rstd[slot]``."""
    m, d = storage.store.shape[1:]
    x2 = x.reshape(m, d).contiguous()
    y2 = y.reshape(m, d).contiguous() if y is not None else x2
    _triton.store_source_kernel[(m,)](
        x2, y2, storage.store[slot], storage.rstd[slot], d, storage.eps,
        HAS_Y=y is not None, BLOCK_D=block_d(d), num_warps=num_warps(d),
    )  # fmt: skip


def depth_attn_fwd(
    storage: SourceStorage,
    n: int,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward over the first ``n`` stored sources (+ ``partial`` [M, D]) for ``query``/``gain`` [D].

    Returns out [M, D] (h, or the PreNorm of h with ``norm_weight``), lse [M] float32 and, with the norm,
    h's rsqrt statistic [M] float32.
    """
    m, d = storage.store.shape[1:]
    dev = storage.store.device
    out = torch.empty((m, d), dtype=storage.store.dtype, device=dev)
    lse = torch.empty((m,), dtype=torch.float32, device=dev)
    h_rstd = torch.empty((m,), dtype=torch.float32, device=dev) if norm_weight is not None else None
    width = block_d(d)
    if _last_as_partial(n, partial is not None, width, backward=False):
        n, partial = n - 1, storage.store[n - 1]
    src_tile, one_tile, warps, apart = forward_tile(n, partial is not None, width)
    _triton.depth_attn_fwd_kernel[(m,)](
        storage.store, storage.rstd, partial if partial is not None else out, query, gain,
        norm_weight if norm_weight is not None else gain, out, lse, h_rstd if h_rstd is not None else lse,
        n, m, d, storage.eps, norm_eps,
        HAS_PARTIAL=partial is not None, HAS_NORM=norm_weight is not None,
        BLOCK_D=width, SRC_TILE=src_tile, ONE_TILE=one_tile, APART=apart, num_warps=warps,
    )  # fmt: skip
    return out, lse, h_rstd


def forward_tile(
    n: int, partial: bool, width: int, one_tile_sources: int | None = None
) -> tuple[int, bool, int, bool]:
    """(source tile, one tile, warps, partial apart) of the forward over ``n`` stored sources and the partial sum
    (``partial``) of padded width ``width``, with rows of up to ``one_tile_sources`` (default
    ``FWD_ONE_TILE_SOURCES``) sources on one tile."""
    limit = FWD_ONE_TILE_SOURCES if one_tile_sources is None else one_tile_sources
    def fits(tile: int) -> bool:
        # (only while 16 warps hold the tile at FWD_ONE_TILE_ELEMENTS per thread: past that, at D 16384 say, each
        # thread would hold more of it, untimed, where the online softmax's per-source rows were measured)
        return width * tile <= 16 * 32 * FWD_ONE_TILE_ELEMENTS

    if FWD_PARTIAL_APART and partial and n == limit >= 2 and fits(n):  # (the partial's sums ride in 2 tile rows)
        return n, True, _warps(width * n, FWD_ONE_TILE_ELEMENTS), True
    wide = next_power_of_2(n + partial)
    if wide <= limit and fits(wide):
        return wide, True, _warps(width * wide, FWD_ONE_TILE_ELEMENTS), False
    return FWD_SOURCE_TILE, False, _warps(width, FWD_ELEMENTS_PER_THREAD), False


def backward_tile(n: int, partial: bool, width: int) -> tuple[int, bool, int, bool]:
    """(source tile, one tile, warps, partial apart) of the backward over ``n`` stored sources and the partial sum
    (``partial``), of padded width ``width``."""
    # (the stored sources fill their tile, of at least 2 rows: the partial's sums ride in 2 of them)
    if BWD_PARTIAL_APART and partial and 2 <= n <= BWD_SOURCE_TILE and n == next_power_of_2(n):
        return n, True, _warps(width, BWD_ELEMENTS_PER_THREAD), True
    wide = next_power_of_2(n + partial)
    if wide <= BWD_SOURCE_TILE:
        return wide, True, _warps(width, BWD_ELEMENTS_PER_THREAD), False
    if wide <= BWD_ONE_TILE_SOURCES:
        return wide, True, _warps(width, max(1, BWD_ELEMENTS_PER_THREAD * BWD_SOURCE_TILE // wide)), False
    return BWD_SOURCE_TILE, False, _warps(width, BWD_ELEMENTS_PER_THREAD), False


def _last_as_partial(n: int, partial: bool, width: int, backward: bool) -> bool:
    """Whether a row over ``n`` stored sources (and a partial sum, ``partial``) of padded width ``width`` reads the
    last of them as its partial sum (``LAST_AS_PARTIAL``) in the forward or the ``backward``."""
    if not LAST_AS_PARTIAL or partial or n < 3:
        return False
    if backward:
        return next_power_of_2(n) > BWD_SOURCE_TILE and backward_tile(n - 1, True, width)[3]
    return next_power_of_2(n) > FWD_ONE_TILE_SOURCES and forward_tile(n - 1, True, width)[3]


def _backward_grid(m: int, device: torch.device, programs_per_sm: int) -> int:
    """Programs of the backward kernel: enough to fill the GPU, few enough that the du partials stay small."""
    if device.type == "cuda":
        return min(m, sm_count(device) * programs_per_sm)
    return min(m, 4)


def register_cap(warps: int, programs: int) -> int:
    """Registers per thread (``maxnreg``) that let ``programs`` programs of ``warps`` warps share an SM."""
    return min(255, _SM_REGISTERS // (32 * warps * programs) // 8 * 8)


def _narrow_launch(src_tile: int, one_tile: bool, warps: int) -> tuple[int, dict]:
    """(programs per SM, extra launch options) of the backward: rows on one tile of at most BWD_NARROW_SOURCES
    sources run BWD_NARROW_PROGRAMS_PER_SM programs per SM, their registers capped so that they all fit (the SM's
    65536 over the programs' threads) and the query, gain and PreNorm weight re-read for each row instead of held;
    only where the cap leaves them BWD_NARROW_REGISTERS (at 8 warps, D 4096, three programs would leave 80)."""
    programs = min(BWD_NARROW_PROGRAMS_PER_SM, _SM_REGISTERS // (32 * warps * BWD_NARROW_REGISTERS))
    if not (one_tile and src_tile <= BWD_NARROW_SOURCES and programs > BWD_PROGRAMS_PER_SM):
        return BWD_PROGRAMS_PER_SM, {"ROW_PARAMS": False}
    return programs, {"ROW_PARAMS": True, "maxnreg": register_cap(warps, programs)}


def backward_stages(deferred: bool, accumulate: bool) -> int:
    """Pipelining stages of a backward launch: ``BWD_STAGES`` where its rows read no gradient rows (deferred, or the
    first writer of their sources), else 1."""
    return BWD_STAGES if deferred or not accumulate else 1


# (device, launch constants) of backward launches whose pipelined buffers exceeded the device's shared memory
_UNPIPELINED: set[tuple] = set()


def _launch_backward(grid: int, args: tuple, constants: dict) -> None:
    """``depth_attn_bwd_kernel`` over ``grid`` programs at its ``backward_stages``, or unpipelined where that many
    stages' buffers do not fit the device's shared memory (they grow with the row: 49-57 KB per program at D 2048
    and 3 stages on sm_90, against the H100's 227 KB per block; less on smaller GPUs): Triton refuses such a launch
    before it runs, and the launch is then remembered, so that its compile is not tried again."""
    stages = backward_stages(constants["DEFER"], constants["ACCUMULATE"])
    key = (args[0].device, *constants.items())  # (one call site: the constants always come in the same order)
    if stages > 1 and key not in _UNPIPELINED:
        try:
            _triton.depth_attn_bwd_kernel[(grid,)](*args, STAGES=stages, **constants)
            return
        except OutOfResources:
            _UNPIPELINED.add(key)
    _triton.depth_attn_bwd_kernel[(grid,)](*args, STAGES=1, **constants)


def depth_attn_bwd(
    storage: SourceStorage,
    n: int,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    norm_weight: torch.Tensor | None,
    dout: torch.Tensor,
    lse: torch.Tensor,
    h_rstd: torch.Tensor | None,
    defer: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Accumulate the stored sources' gradients into ``storage.grad``, or with ``defer`` hand them to the readers'
    ``storage.deferral(n)`` where there is one (a row on one tile only; the caller then has ``storage.settle`` run
    before those gradients are read); two launches in all (three when that fills the deferral's buffers). A row over
    n stored sources and no partial sum may read the last of them as its partial (``LAST_AS_PARTIAL``).

    Returns (dpartial [M, D] or None, dquery [D], dgain [D], dnorm_weight [D] or None), each in its input's dtype.
    """
    m, d = storage.store.shape[1:]
    if m == 0:  # no rows (an empty batch): no program to launch, and the rows' partials would divide by 0 programs
        dnorm = torch.zeros_like(norm_weight) if norm_weight is not None else None
        dpart = torch.empty_like(partial) if partial is not None else None
        return dpart, torch.zeros_like(query), torch.zeros_like(gain), dnorm
    width = block_d(d)
    last = _last_as_partial(n, partial is not None, width, backward=True) and n - 1 not in storage.written
    if last:  # (its readers are not those of the first n - 1 sources: it never defers)
        n, partial = n - 1, storage.store[n - 1]
    src_tile, one_tile, warps, apart = backward_tile(n, partial is not None, width)
    programs_per_sm, narrow = _narrow_launch(src_tile, one_tile, warps)
    grid = _backward_grid(m, dout.device, programs_per_sm)
    rows = cdiv(m, grid)
    du_part = torch.empty((grid, d), dtype=torch.float32, device=dout.device)
    dwn_part = torch.empty((grid, d), dtype=torch.float32, device=dout.device) if norm_weight is not None else None
    dpart = torch.empty_like(partial) if partial is not None and not last else None
    # where the kernel writes the partial's gradient: with ``last``, the last source's slot (returned as None)
    part_grad = storage.first_write(n) if last else dpart
    deferral = storage.deferral(n) if defer and one_tile and not last else None  # (none over 0 stored sources)
    if deferral is not None:
        dh, coef, u = deferral.take(storage)
        gstore, fresh = storage.store, False  # not written
    else:
        gstore, fresh = storage.grad_buffer(n)
        dh, coef, u = dout, du_part, du_part  # not written
    _launch_backward(
        grid,
        (storage.store, storage.rstd, partial if partial is not None else dout, query, gain,
         norm_weight if norm_weight is not None else gain, dout, lse, h_rstd if h_rstd is not None else lse, gstore,
         part_grad if part_grad is not None else dout, du_part, dwn_part if dwn_part is not None else du_part,
         dh, coef, u, n, m, d, storage.eps, rows),
        dict(HAS_PARTIAL=partial is not None, HAS_NORM=norm_weight is not None, BLOCK_D=width,
             SRC_TILE=src_tile, ONE_TILE=one_tile, DEFER=deferral is not None,
             COEF_PAD=deferral.pad if deferral is not None else 1, APART=apart, ACCUMULATE=not fresh,
             EVEN_D=bool(BWD_EVEN_D) and d == width, num_warps=warps, **narrow),
    )  # fmt: skip
    dquery, dgain = torch.empty_like(query), torch.empty_like(gain)
    dnorm = torch.empty_like(norm_weight) if norm_weight is not None else None
    # [PARAM_GRAD_ROWS, PARAM_GRAD_COLUMNS] tiles of the partials, one column block per program
    _triton.param_grad_kernel[(cdiv(d, PARAM_GRAD_COLUMNS),)](
        du_part, dwn_part if dwn_part is not None else du_part, query, gain, dquery, dgain,
        dnorm if dnorm is not None else dquery, grid, d, HAS_NORM=norm_weight is not None, BLOCK=PARAM_GRAD_COLUMNS,
        ROWS=PARAM_GRAD_ROWS, num_warps=4,
    )  # fmt: skip
    return dpart, dquery, dgain, dnorm


class StoreSourceFunction(torch.autograd.Function):
    """handle = store_source(x (+ y)): the stored value is read through ``storage``; see the module docstring."""

    @staticmethod
    def forward(ctx, storage: SourceStorage, slot: int, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        store_source_fwd(storage, slot, x, y)
        ctx.storage, ctx.slot, ctx.has_y, ctx.used = storage, slot, y is not None, False
        # `.data` gives the handle its own version counter: later writes to other slots never invalidate it.
        return storage.store.data[slot].view(storage.shape)

    @staticmethod
    def backward(ctx, grad_handle: torch.Tensor | None):
        # (also: the stored sources' gradients reach their producers through storage.grad, outside autograd)
        refuse_create_graph("AttnRes")
        # storage.grad sums every reader's slot gradient once: a second backward through this node (two losses
        # over one bank backwarded apart, or retain_graph) would hand it on again. Nothing is saved here, so
        # autograd itself would not notice; refuse as it does.
        if ctx.used:
            raise RuntimeError(
                "Trying to backward through an AttnRes source bank a second time (backend='triton' sums the "
                "readers' gradients once per forward): backward one loss over all its readers, or use backend='torch'"
            )
        ctx.used = True
        ctx.storage.settle(ctx.slot)
        g = ctx.storage.slot_grad(ctx.slot)
        if g is not None:
            g = g.view(ctx.storage.shape)
        if grad_handle is not None:
            g = grad_handle if g is None else g + grad_handle
        return None, None, g, (g if ctx.has_y else None)


class DepthAttentionFunction(torch.autograd.Function):
    """h = depth attention over the first ``n`` stored sources (+ the partial sum) for one pseudo-query,
    optionally followed by the fused PreNorm ``norm_weight * rmsnorm(h)`` (then h is recomputed in backward
    instead of being kept: the sublayer input costs no activation memory beyond the partial sum)."""

    @staticmethod
    def forward(
        ctx,
        storage: SourceStorage,
        n: int,
        query: torch.Tensor,
        gain: torch.Tensor,
        partial: torch.Tensor | None,
        norm_weight: torch.Tensor | None,
        norm_eps: float,
        *handles: torch.Tensor,
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        m, d = storage.store.shape[1:]
        if n > 0:
            storage.readers.setdefault(n, set()).add(query.data_ptr())
        query, gain = query.contiguous(), gain.contiguous()
        part2 = partial.reshape(m, d).contiguous() if partial is not None else None
        wn = norm_weight.contiguous() if norm_weight is not None else None
        out, lse, h_rstd = depth_attn_fwd(storage, n, part2, query, gain, wn, norm_eps)
        ctx.save_for_backward(query, gain, part2, wn, lse, h_rstd)
        ctx.storage, ctx.n = storage, n
        return out.view(storage.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None):
        refuse_create_graph("AttnRes")
        if dout is None:
            return (None,) * (7 + ctx.n)
        query, gain, part2, wn, lse, h_rstd = ctx.saved_tensors
        storage = ctx.storage
        m, d = storage.store.shape[1:]
        dout2 = dout.reshape(m, d).to(storage.store.dtype).contiguous()
        # the stored sources' gradients may wait for the other readers of the same sources (``DeferredGrads``)
        # unless no source needs one
        defer = any(ctx.needs_input_grad[7:])
        dpart, dquery, dgain, dnorm = depth_attn_bwd(
            storage, ctx.n, part2, query, gain, wn, dout2, lse, h_rstd, defer
        )
        dpartial = dpart.view(storage.shape) if dpart is not None else None
        return (None, None, dquery, dgain, dpartial, dnorm, None) + (None,) * ctx.n
