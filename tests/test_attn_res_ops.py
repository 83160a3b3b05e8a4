"""Depth-attention ops of Attention Residuals: torch backend and Triton kernels vs the stacking reference.

Triton runs under the interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU): fp32, tiny shapes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel, relative_error

from kimi_hf.kernels.attn_res import (
    add_prenorm,
    append_source,
    append_source_phase1,
    depth_attention,
    depth_attention_phase1,
    depth_attention_phase2,
    depth_attention_phase2_add,
    naive_depth_attention,
    new_source_bank,
    prenorm,
    rms_norm,
)

CPU_BACKENDS = ["torch", "triton"]


def _inputs(n_blocks: int, shape=(2, 3, 48), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    blocks = [torch.randn(shape, generator=g).mul(1 + i).to(device, dtype) for i in range(n_blocks)]
    partial = torch.randn(shape, generator=g).to(device, dtype)
    query = torch.randn(d, generator=g).to(device, dtype)
    gain = (1 + 0.3 * torch.randn(d, generator=g)).to(device, dtype)
    return blocks, partial, query, gain


def _bank(blocks, backend):
    bank = new_source_bank(len(blocks) + 1, blocks[0], backend=backend)
    for b in blocks:
        bank = append_source(bank, b)
    return bank


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_partial", [False, True])
def test_forward_matches_reference(backend, with_partial):
    blocks, partial, query, gain = _inputs(3)
    h = depth_attention(_bank(blocks, backend), query, gain, partial if with_partial else None)
    ref = naive_depth_attention(blocks + ([partial] if with_partial else []), query.double(), gain.double())
    assert_close_rel(h, ref, 1e-5, f"h ({backend})")


def _graph(backend: str, with_norm: bool, d: int = 48):
    """Two readers of the same stored block plus a block stored from (partial, output): exercises the
    accumulation of slot gradients, the StoreSource backward and (optionally) the fused PreNorm."""
    blocks, partial, query, gain = _inputs(2, shape=(2, 3, d))
    norm_w = 1 + 0.2 * torch.randn_like(query)
    leaves = [t.clone().requires_grad_() for t in (*blocks, partial, query, gain, norm_w)]
    b0, b1, p, q, g, wn = leaves
    norm = dict(norm_weight=wn, norm_eps=1e-5) if with_norm else {}
    bank = new_source_bank(3, b0, backend=backend)
    bank = append_source(append_source(bank, b0), b1)
    h1 = depth_attention(bank, q, g, p, **norm)
    bank = append_source(bank, p, h1 * 0.5)
    h2 = depth_attention(bank, q.flip(0), g, **norm)
    w1, w2 = torch.randn_like(h1), torch.randn_like(h2)
    loss = (h1 * w1).sum() + (h2 * w2).sum()
    loss.backward()
    return [h1, h2] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


@pytest.mark.parametrize("d", [48, 64], ids=["masked", "even"])  # (64: the backward's EVEN_D, no column masks)
@pytest.mark.parametrize("with_norm", [False, True])
def test_triton_backward_matches_torch(with_norm, d):
    torch.manual_seed(0)
    expected = _graph("torch", with_norm, d)
    torch.manual_seed(0)
    actual = _graph("triton", with_norm, d)
    names = ["h1", "h2", "d_block0", "d_block1", "d_partial", "d_query", "d_gain", "d_norm_weight"]
    for a, e, name in zip(actual, expected, names):
        if name == "d_norm_weight" and not with_norm:
            assert not a.any() and not e.any()
        else:
            assert_close_rel(a, e, 1e-5, name)


@pytest.mark.parametrize(
    "fwd_tile,bwd_tile,one_tile_sources,n_blocks,fwd_one_tile_sources",
    [(8, 8, 8, 9, 0), (4, 2, 2, 9, 0), (1, 16, 16, 9, 16), (1, 4, 8, 6, 8), (1, 4, 8, 9, 8), (1, 4, 8, 2, 4),
     (1, 4, 8, 4, 4), (1, 4, 8, 1, 4)],
)
def test_triton_many_sources_matches_reference(
    fwd_tile, bwd_tile, one_tile_sources, n_blocks, fwd_one_tile_sources, monkeypatch
):
    """Stored sources and the partial sum, in source tiles of each size: online softmax across tiles (the partial in
    the last one), the backward's two passes over tiles, its one-tile path (bwd tile 16), and its one-tile path on a
    wider tile than ``BWD_SOURCE_TILE`` (6 stored + the partial in a tile of 8; 10 sources stay on two passes), and
    4 stored sources with the partial apart from their tile (``BWD_PARTIAL_APART``), and 1 stored source with the
    partial on a narrow tile (``_narrow_launch``: the query, gain and PreNorm weight re-read per row). The
    forward's one-tile path likewise (``FWD_ONE_TILE_SOURCES``: 10 sources in a tile of 16, 7 in one of 8, 3 in
    one of 4; 10 sources above 8 on the online softmax)."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "FWD_SOURCE_TILE", fwd_tile)
    monkeypatch.setattr(fused, "BWD_SOURCE_TILE", bwd_tile)
    monkeypatch.setattr(fused, "BWD_ONE_TILE_SOURCES", one_tile_sources)
    monkeypatch.setattr(fused, "FWD_ONE_TILE_SOURCES", fwd_one_tile_sources)
    blocks, partial, query, gain = _inputs(n_blocks, shape=(1, 2, 24))
    norm_w = 1 + 0.2 * torch.randn_like(query)
    leaves = [t.double().requires_grad_() for t in (*blocks, partial, query, gain, norm_w)]
    w = torch.randn(1, 2, 24, dtype=torch.float64)
    *srcs, q, g, wn = leaves
    ref = rms_norm(naive_depth_attention(srcs, q, g), wn, 1e-6)
    expected = torch.autograd.grad((ref * w).sum(), leaves)
    fleaves = [t.detach().float().requires_grad_() for t in leaves]
    *fsrcs, fq, fg, fwn = fleaves
    h = depth_attention(_bank(fsrcs[:-1], "triton"), fq, fg, fsrcs[-1], fwn, 1e-6)
    assert_close_rel(h, ref, 1e-5, "h")
    # 3e-5: fp32 kernels; the query/gain gradients sum a softmax cancellation (dh . v_i - dh . h) over rows
    for a, e in zip(torch.autograd.grad((h * w.float()).sum(), fleaves), expected):
        assert_close_rel(a, e, 3e-5, "grad")


def _readers_graph(
    backend: str, n_readers: int, shape=(2, 3, 48), dtype=torch.float32, device="cpu", rounded=None, n_blocks=3
):
    """A block's worth of readers of the same ``n_blocks`` stored sources (the first without a partial sum, the others
    with their own, some with the fused PreNorm), then the block stored from the last partial and a reader of all:
    the readers' gradients into the stored sources may be deferred and summed in one pass (``DeferredGrads``).
    Inputs are drawn in float32 (and rounded to ``rounded`` first), the graph runs in ``dtype``. Returns the
    outputs, then the leaves' gradients (sources, partials, queries, gain, PreNorm weight)."""
    blocks, _, query, gain = _inputs(n_blocks, shape)
    g = torch.Generator().manual_seed(5)
    partials = [torch.randn(shape, generator=g) for _ in range(n_readers)]
    queries = [torch.randn(query.shape, generator=g) for _ in range(n_readers + 1)]
    norm_w = 1 + 0.2 * torch.randn(query.shape, generator=g)
    leaves = [t.to(rounded or dtype).to(device, dtype).requires_grad_()
              for t in (*blocks, *partials, *queries, gain, norm_w)]  # fmt: skip
    n = n_blocks
    srcs, parts, qs, (gn, wn) = leaves[:n], leaves[n:n + n_readers], leaves[n + n_readers:-2], leaves[-2:]
    bank = _bank(srcs, backend)
    outs = []
    for j in range(n_readers):
        norm = dict(norm_weight=wn, norm_eps=1e-5) if j % 2 else {}
        outs.append(depth_attention(bank, qs[j], gn, parts[j] if j else None, **norm))
    bank = append_source(bank, parts[-1], outs[-1])
    outs.append(depth_attention(bank, qs[-1], gn))
    loss = sum((h.float() * torch.randn(h.shape, generator=g).to(device)).sum() for h in outs)
    loss.backward()
    return outs + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]  # (parts[0] unused)


@pytest.mark.parametrize(
    "defer_readers,passes,n_blocks,d", [(0, [], 3, 48), (3, [3, 2], 3, 48), (8, [5], 3, 48), (8, [5], 4, 48),
                                        (8, [5], 4, 64)]
)
def test_triton_deferred_source_gradients_match_torch(defer_readers, passes, n_blocks, d, monkeypatch):
    """Five readers of 3 stored sources: gradients added by each reader (0), deferred in passes of 3 readers (the
    buffers fill once, then the rest is added when the stored sources' gradients are handed on) and of all 5; and
    of 4 stored sources, whose readers with a partial sum keep it apart from their tile (``BWD_PARTIAL_APART``), at D
    48 and 64 (a power of two: the backward without column masks, ``EVEN_D``)."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "DEFER_READERS", defer_readers)
    monkeypatch.setattr(fused, "DEFER_MIN_READERS", 1)
    flushed = []
    flush = fused.DeferredGrads.flush
    monkeypatch.setattr(fused.DeferredGrads, "flush", lambda self, s: (flushed.append(self.count), flush(self, s)))
    expected = _readers_graph("torch", 5, (2, 3, d), n_blocks=n_blocks)
    actual = _readers_graph("triton", 5, (2, 3, d), n_blocks=n_blocks)
    assert [k for k in flushed if k] == passes  # readers summed per deferred pass
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close_rel(a, e, 1e-5, f"output or gradient {i}")


def test_triton_backward_unpipelined_where_its_buffers_do_not_fit(monkeypatch):
    """A pipelined backward launch (``BWD_STAGES``) that Triton refuses for its shared memory (``OutOfResources``,
    raised before the kernel runs: wide rows, small GPUs) runs unpipelined with the same gradients, and is not tried
    pipelined again."""
    from triton.runtime.errors import OutOfResources

    from kimi_hf.kernels.attn_res import _triton, fused

    kernel, stages = _triton.depth_attn_bwd_kernel, []

    class SharedMemoryLimited:
        def __getitem__(self, grid):
            def launch(*args, STAGES, **constants):
                stages.append(STAGES)
                if STAGES > 1:
                    raise OutOfResources(STAGES * 2**16, 2**16, "shared memory")
                return kernel[grid](*args, STAGES=STAGES, **constants)

            return launch

    monkeypatch.setattr(_triton, "depth_attn_bwd_kernel", SharedMemoryLimited())
    monkeypatch.setattr(fused, "_UNPIPELINED", set())
    monkeypatch.setattr(fused, "BWD_STAGES", 3)
    expected = _readers_graph("torch", 5)
    for attempt in range(2):  # (5 readers of 3 sources defer; the last reader is every slot's first writer)
        stages.clear()
        actual = _readers_graph("triton", 5)
        assert (fused.BWD_STAGES in stages) == (attempt == 0) and 1 in stages, (attempt, stages)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_rel(a, e, 1e-5, f"output or gradient {i}")
    assert fused._UNPIPELINED


def _poison_gradient_buffer(monkeypatch) -> None:
    """Fill the stored sources' gradient buffer with NaN when it is allocated (it is not zeroed: every read of a slot
    no kernel wrote must then show)."""
    from kimi_hf.kernels.attn_res import fused

    alloc = fused.SourceStorage._grad

    def poisoned(storage):
        new = storage.grad is None
        grad = alloc(storage)
        if new:
            grad.fill_(float("nan"))
        return grad

    monkeypatch.setattr(fused.SourceStorage, "_grad", poisoned)


@pytest.mark.parametrize("defer", [False, True])
def test_triton_source_gradients_whichever_reader_writes_first(defer, monkeypatch):
    """The stored sources' gradient buffer is not zeroed: the first kernel to write a slot stores into it
    (``SourceStorage.grad_buffer``). Here a reader of an older bank (one source) runs its backward first, so the
    readers of three sources after it (each adding its own, or deferred into one pass) find slot 0 written and slots
    1 and 2 not (zeroed first); the fourth stored source, read by none, hands on no gradient."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "DEFER_MIN_READERS", 1 if defer else 99)
    _poison_gradient_buffer(monkeypatch)
    calls = []
    grad_buffer = fused.SourceStorage.grad_buffer

    def spy(storage, n):
        before = sorted(storage.written)
        out = grad_buffer(storage, n)
        calls.append((n, out[1], before))
        return out

    monkeypatch.setattr(fused.SourceStorage, "grad_buffer", spy)

    def run(backend):
        blocks, partial, query, gain = _inputs(4)
        leaves = [t.clone().requires_grad_() for t in (*blocks, partial, query, gain)]
        *srcs, p, q, g = leaves
        banks = [new_source_bank(4, srcs[0], backend=backend)]
        for src in srcs:
            banks.append(append_source(banks[-1], src))  # banks[k] holds k sources
        outs = [depth_attention(banks[3], q * (1 + j), g, p) for j in range(3)]
        outs.append(depth_attention(banks[1], q.flip(0), g, p))
        w = torch.Generator().manual_seed(3)
        sum((h * torch.randn(h.shape, generator=w)).sum() for h in outs).backward()
        return outs + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    expected = run("torch")
    actual = run("triton")
    assert calls[:2] == [(1, True, []), (3, False, [0])]  # fresh, then a mixed range
    assert not actual[4 + 3].any()  # the unread source's gradient
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close_rel(a, e, 1e-5, f"output or gradient {i}")


@pytest.mark.parametrize("written_first", [False, True])
@pytest.mark.parametrize("last_as_partial", [1, 0])
def test_triton_last_source_as_partial_matches_torch(last_as_partial, written_first, monkeypatch):
    """A reader of 5 stored sources without a partial sum (a 4-block model's final aggregation) reads the fifth as
    its partial sum (``LAST_AS_PARTIAL``), whose gradient goes straight to that source's slot; not where a reader of
    the same sources with a partial sum, created after it, has already written that slot (``written_first``)."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "LAST_AS_PARTIAL", last_as_partial)
    _poison_gradient_buffer(monkeypatch)
    first_writes = []
    first_write = fused.SourceStorage.first_write
    monkeypatch.setattr(fused.SourceStorage, "first_write", lambda st, slot: (first_writes.append(slot),
                                                                               first_write(st, slot))[1])

    def run(backend):
        blocks, partial, query, gain = _inputs(5)
        norm_w = 1 + 0.2 * torch.randn(query.shape, generator=torch.Generator().manual_seed(1))
        leaves = [t.clone().requires_grad_() for t in (*blocks, partial, query, gain, norm_w)]
        *srcs, p, q, g, wn = leaves
        bank = _bank(srcs, backend)
        outs = [depth_attention(bank, q, g, None, wn, 1e-5)]
        if written_first:
            outs.append(depth_attention(bank, q.flip(0), g, p))
        w = torch.Generator().manual_seed(3)
        sum((h * torch.randn(h.shape, generator=w)).sum() for h in outs).backward()
        return outs + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]

    expected = run("torch")
    actual = run("triton")
    assert first_writes == ([4] if last_as_partial and not written_first else [])
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close_rel(a, e, 1e-5, f"output or gradient {i}")


def test_deferral_needs_enough_readers_and_fewer_bytes(monkeypatch):
    """Readers defer only when their group is at least ``DEFER_MIN_READERS`` (4) and moves fewer [M, D] rows that
    way: 2 n K against 2 K + 3 n."""
    from kimi_hf.kernels.attn_res import fused

    assert fused._defers(2, 8) and fused._defers(4, 6)  # the dense ~1B model's blocks of 8 over 2 to 4 sources
    assert fused._defers(2, 4) and fused._defers(4, 4)  # Kimi Linear's blocks of 4
    assert not fused._defers(4, 3) and not fused._defers(8, 2)  # too few readers, whatever the bytes
    assert not fused._defers(1, 8) and not fused._defers(1, 4)  # one source: 16 (8) rows either way, + 3 for the pass
    monkeypatch.setattr(fused, "DEFER_MIN_READERS", 1)
    assert fused._defers(2, 4) and not fused._defers(2, 3)  # 16 > 14; 12 = 12
    assert fused._defers(4, 3) and not fused._defers(4, 2) and not fused._defers(5, 1)


def test_backward_tiles_fit_their_rows(monkeypatch):
    """A row of up to ``BWD_SOURCE_TILE`` (4) sources takes one tile of its own width (no padding rows for 1 or 2);
    2 or 4 stored sources and the partial sum, a tile of theirs with the partial apart (``BWD_PARTIAL_APART``; else
    a tile of 4 or 8); up to ``BWD_ONE_TILE_SOURCES`` (8) a wider tile with more warps, beyond that two passes over
    tiles of 4."""
    from kimi_hf.kernels.attn_res import fused

    width = 2048
    tiles = [fused.backward_tile(n, False, width) for n in (1, 2, 3, 4)]
    assert tiles == [(1, True, 4, False), (2, True, 4, False), (4, True, 4, False), (4, True, 4, False)]
    assert fused.backward_tile(1, True, width) == (2, True, 4, False)
    assert fused.backward_tile(2, True, width) == (2, True, 4, True)
    assert fused.backward_tile(3, True, width) == (4, True, 4, False)
    assert fused.backward_tile(4, True, width) == (4, True, 4, True)
    assert fused.backward_tile(5, False, width) == (8, True, 8, False) == fused.backward_tile(7, True, width)
    assert fused.backward_tile(8, True, width) == (4, False, 4, False)
    monkeypatch.setattr(fused, "BWD_PARTIAL_APART", 0)
    assert fused.backward_tile(4, True, width) == (8, True, 8, False)
    assert fused.backward_tile(2, True, width) == (4, True, 4, False)


def test_forward_tiles_fit_their_rows(monkeypatch):
    """A row of up to ``FWD_ONE_TILE_SOURCES`` (4) sources takes one tile of the next power of two, at
    ``FWD_ONE_TILE_ELEMENTS`` (64) of it per thread; 4 stored sources and the partial sum, a tile of 4 with the partial
    apart (``FWD_PARTIAL_APART``; else the online softmax over tiles of ``FWD_SOURCE_TILE``, 1), as do wider rows and
    rows whose tile would need more than 16 warps (D 16384)."""
    from kimi_hf.kernels.attn_res import fused

    width = 2048
    tiles = [fused.forward_tile(n, False, width) for n in (1, 2, 3, 4)]
    assert tiles == [(1, True, 1, False), (2, True, 2, False), (4, True, 4, False), (4, True, 4, False)]
    assert fused.forward_tile(3, True, width) == (4, True, 4, False)
    assert fused.forward_tile(4, True, width) == (4, True, 4, True)
    assert fused.forward_tile(5, False, width) == (1, False, 4, False) == fused.forward_tile(8, True, width)
    assert fused.forward_tile(4, True, 16384) == (1, False, 16, False)
    monkeypatch.setattr(fused, "FWD_PARTIAL_APART", 0)
    assert fused.forward_tile(4, True, width) == (1, False, 4, False)


def test_narrow_tiles_launch_more_programs_with_capped_registers(monkeypatch):
    """Rows on tiles of at most ``BWD_NARROW_SOURCES`` (2) sources run ``BWD_NARROW_PROGRAMS_PER_SM`` (3) programs per
    SM, their registers capped so that the SM's 65536 hold them all (168 at 4 warps), the parameters re-read per row;
    wider tiles, the two-pass path, and warps too many for a cap of at least ``BWD_NARROW_REGISTERS`` (168) run
    ``BWD_PROGRAMS_PER_SM`` (2) uncapped."""
    from kimi_hf.kernels.attn_res import fused

    assert fused._narrow_launch(2, True, 4) == (3, {"ROW_PARAMS": True, "maxnreg": 168})
    assert fused._narrow_launch(1, True, 2) == (3, {"ROW_PARAMS": True, "maxnreg": 255})
    default = (2, {"ROW_PARAMS": False})
    assert fused._narrow_launch(4, True, 4) == fused._narrow_launch(2, False, 4) == default
    assert fused._narrow_launch(2, True, 8) == default  # 3 programs would leave 80 registers, 1 is fewer than 2
    monkeypatch.setattr(fused, "BWD_NARROW_PROGRAMS_PER_SM", 0)
    assert fused._narrow_launch(2, True, 4) == (2, {"ROW_PARAMS": False})


def test_triton_parameter_gradient_kernel_sums_many_tiles():
    """The backward's finishing kernel over 300 per-program partial rows (three 128-row tiles) and 40 columns
    (two 32-column programs): dq = sum(du) * gain, dg = sum(du) * query, dnorm = sum(dwn)."""
    import triton

    from kimi_hf.kernels.attn_res import _triton

    g = torch.Generator().manual_seed(3)
    du, dwn = torch.randn(300, 40, generator=g), torch.randn(300, 40, generator=g)
    query, gain = torch.randn(40, generator=g), torch.randn(40, generator=g)
    dq, dg, dnorm = torch.empty(40), torch.empty(40), torch.empty(40)
    _triton.param_grad_kernel[(triton.cdiv(40, 32),)](
        du, dwn, query, gain, dq, dg, dnorm, 300, 40, HAS_NORM=True, BLOCK=32, ROWS=128
    )
    du_sum = du.double().sum(0)
    assert_close_rel(dq, du_sum * gain.double(), 1e-6, "d_query")
    assert_close_rel(dg, du_sum * query.double(), 1e-6, "d_gain")
    assert_close_rel(dnorm, dwn.double().sum(0), 1e-6, "d_norm_weight")


def test_torch_backward_matches_reference():
    """The torch backend's gradients (cached rstd, no stacking) equal autograd through the reference formula."""
    blocks, partial, query, gain = _inputs(3)
    leaves = [t.double().requires_grad_() for t in (*blocks, partial, query, gain)]
    *srcs, q, g = leaves
    bank = _bank(srcs[:-1], "torch")
    w = torch.randn_like(srcs[0])
    (depth_attention(bank, q, g, srcs[-1]) * w).sum().backward()
    actual = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (naive_depth_attention(srcs, q, g) * w).sum().backward()
    for a, t in zip(actual, leaves):
        assert_close_rel(a, t.grad, 1e-10, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "shape,n_q",
    [((2, 3, 48), 4), ((2, 19, 300), 8), ((1, 40, 48), 3), ((1, 17, 20), 1)],
    ids=["M6-D48-Q4", "M38-D300-Q8", "M40-D48-Q3", "M17-D20-Q1"],
)
@pytest.mark.parametrize("tile_elements", [16384, 0], ids=["sources-in-registers", "sources-one-at-a-time"])
def test_two_phase_matches_naive(backend, shape, n_q, tile_elements, monkeypatch):
    """Phase 1 and phase 2 against the naive formula; Triton's phase 1 through both of its paths (a row's sources
    in one register tile, or read one at a time)."""
    from kimi_hf.kernels.attn_res import two_phase

    monkeypatch.setattr(two_phase, "PHASE1_TILE_ELEMENTS", tile_elements)
    blocks, partial, _, _ = _inputs(3, shape=shape, seed=1)
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(n_q, shape[-1], generator=g)
    gains = 1 + 0.3 * torch.randn(n_q, shape[-1], generator=g)
    with torch.no_grad():
        out, lse = depth_attention_phase1(_bank(blocks, backend), queries, gains)
        for j in range(n_q):
            assert_close_rel(out[j], naive_depth_attention(blocks, queries[j], gains[j]), 1e-5, f"phase1[{j}]")
            h = depth_attention_phase2(out[j], lse[j], partial, queries[j], gains[j], backend=backend)
            assert_close_rel(h, naive_depth_attention(blocks + [partial], queries[j], gains[j]), 1e-5, f"phase2[{j}]")


@pytest.mark.parametrize("backend,query_pairs", [("torch", 0), ("triton", 0), ("triton", 1)])
@pytest.mark.parametrize(
    "n_prev,with_y,with_norm", [(0, False, True), (1, True, True), (2, True, True), (3, True, False), (4, False, True)]
)
@pytest.mark.parametrize(
    "tile_elements,split_rows,row_sources",
    [(16384, 256, 8), (16384, 0, 8), (16384, 0, 4), (16384, 0, 1), (0, 256, 8)],
    ids=["one-kernel-program-per-query", "one-kernel-rows-per-program", "one-kernel-default-rows",
         "one-kernel-program-per-row", "store-phase1-phase2"],
)  # fmt: skip
def test_block_boundary_matches_its_parts(
    backend, query_pairs, n_prev, with_y, with_norm, tile_elements, split_rows, row_sources, monkeypatch
):
    """append_source_phase1 (Triton: one kernel with a program per query, per row or per group of rows, or its
    three parts when the sources do not fit the tile) against the naive formula over the sources with x (+ y)
    appended, and query 0's PreNorm; the stored source and its rstd against a plain append_source. With the
    PreNorm, first_out=False gives queries 1 .. Q - 1 only (the kernels skip query 0's output), the same lse and
    PreNorm. Over 10 rows, 2 .. 8 sources make row groups of 4 (the last one partial), 2 and 1; at the default
    PREFILL_ROW_SOURCES (4), pairs of rows over 2 sources (their launch capped in registers), and 3 or 5 sources
    with the new one apart from the tile of stored ones (``two_phase.prefill_rows_layout``). With query_pairs the
    row groups (of 2-row tiles) and the boundary over v_0 alone score the 3 queries in pairs, the second pair's
    partner absent."""
    from kimi_hf.kernels.attn_res import two_phase

    monkeypatch.setattr(two_phase, "PHASE1_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(two_phase, "STORE_PHASE1_SPLIT_ROWS", split_rows)
    monkeypatch.setattr(two_phase, "PREFILL_ROW_SOURCES", row_sources)
    monkeypatch.setattr(two_phase, "PREFILL_QUERY_PAIRS", query_pairs)
    monkeypatch.setattr(two_phase, "ONE_SOURCE_QUERY_PAIRS", query_pairs)
    blocks, partial, _, _ = _inputs(n_prev + 2, shape=(2, 5, 300), seed=3)
    blocks, x, y = blocks[:n_prev], blocks[n_prev], (blocks[n_prev + 1] if with_y else None)
    g = torch.Generator().manual_seed(4)
    queries, gains = torch.randn(3, 300, generator=g), 1 + 0.3 * torch.randn(3, 300, generator=g)
    norm_w = 1 + 0.2 * torch.randn(300, generator=g) if with_norm else None
    bank = new_source_bank(n_prev + 1, x, backend=backend)
    for b in blocks:
        bank = append_source(bank, b)
    with torch.no_grad():
        new_bank, out, lse, first = append_source_phase1(bank, x, y, queries, gains, norm_w, 1e-5)
        plain = append_source(bank, x, y)
    new_source = x + y if with_y else x
    sources = blocks + [new_source]
    assert new_bank.num_sources == n_prev + 1 and out.shape == (3, 2, 5, 300) and lse.shape == (3, 2, 5)
    for j in range(3):
        assert_close_rel(out[j], naive_depth_attention(sources, queries[j], gains[j]), 1e-5, f"out[{j}]")
    if with_norm:
        assert_close_rel(first, rms_norm(out[0], norm_w, 1e-5), 1e-5, "query 0's PreNorm")
        with torch.no_grad():
            _, rest, rest_lse, rest_first = append_source_phase1(bank, x, y, queries, gains, norm_w, 1e-5, False)
        assert rest.shape == (2, 2, 5, 300)
        assert torch.equal(rest, out[1:]) and torch.equal(rest_lse, lse) and torch.equal(rest_first, first)
    else:
        assert first is None
        with pytest.raises(ValueError, match="first_out=False needs norm_weight"):
            append_source_phase1(bank, x, y, queries, gains, None, 1e-5, False)
    if backend == "triton":  # the fused store wrote the same bytes and statistic as the plain one
        assert torch.equal(new_bank.storage.store[n_prev], plain.storage.store[n_prev])
        assert_close_rel(new_bank.storage.rstd[n_prev], plain.storage.rstd[n_prev], 1e-6, "rstd")
    with torch.no_grad():  # the new bank serves later reads like any other
        h = depth_attention(new_bank, queries[1], gains[1], partial)
    assert_close_rel(h, naive_depth_attention(sources + [partial], queries[1], gains[1]), 1e-5, "later read")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("split_rows", [256, 0], ids=["decode-size", "prefill-size"])
def test_boundary_over_one_source_without_scores(backend, split_rows, monkeypatch):
    """``scores=False`` into an empty bank: v_0 is stored with its rstd, query 0's PreNorm is right, lse is None, and
    phase 2 given lse=None (the lone source scored from out itself, with and without an addend, the sum kept or
    not) equals the naive formula and phase 2 given the scored lse. Into a bank that holds a source it is refused."""
    from kimi_hf.kernels.attn_res import two_phase

    monkeypatch.setattr(two_phase, "STORE_PHASE1_SPLIT_ROWS", split_rows)
    (v0, b1), partial, _, _ = _inputs(2, shape=(2, 5, 300), seed=12)
    addend = torch.randn_like(partial)
    g = torch.Generator().manual_seed(13)
    queries, gains = torch.randn(3, 300, generator=g), 1 + 0.3 * torch.randn(3, 300, generator=g)
    norm_w = 1 + 0.2 * torch.randn(300, generator=g)
    with torch.no_grad():
        bank, out, lse, first = append_source_phase1(new_source_bank(2, v0, backend=backend), v0, None, queries, gains,
                                                     norm_w, 1e-5, first_out=False, scores=False)  # fmt: skip
        _, _, scored_lse, _ = append_source_phase1(new_source_bank(2, v0, backend=backend), v0, None, queries, gains)
        plain = append_source(new_source_bank(2, v0, backend=backend), v0)
    assert lse is None and out.shape == (2, 2, 5, 300) and torch.equal(out[1], v0)
    assert_close_rel(first, rms_norm(v0, norm_w, 1e-5), 1e-6, "query 0's PreNorm")
    if backend == "triton":
        assert torch.equal(bank.storage.store[0], plain.storage.store[0])
        assert_close_rel(bank.storage.rstd[0], plain.storage.rstd[0], 1e-6, "rstd")
    for j in (1, 2):
        o = out[j - 1]
        with torch.no_grad():
            h = depth_attention_phase2(o, None, partial, queries[j], gains[j], backend=backend)
            h_scored = depth_attention_phase2(o, scored_lse[j], partial, queries[j], gains[j], backend=backend)
            x, merged = depth_attention_phase2_add(o, None, partial, addend, queries[j], gains[j], backend=backend,
                                                   norm_weight=norm_w, norm_eps=1e-5)  # fmt: skip
            x_unkept, unkept = depth_attention_phase2_add(o, None, partial, addend, queries[j], gains[j],
                                                          backend=backend, norm_weight=norm_w, norm_eps=1e-5,
                                                          keep_sum=False)  # fmt: skip
        assert_close_rel(h, naive_depth_attention([v0, partial], queries[j], gains[j]), 1e-5, f"phase2[{j}]")
        assert_close_rel(h, h_scored, 1e-6, f"phase2[{j}] against the scored lse")
        expected = rms_norm(naive_depth_attention([v0, partial + addend], queries[j], gains[j]), norm_w, 1e-5)
        assert_close_rel(x, expected, 1e-5, f"phase2 + add[{j}]")
        assert torch.equal(merged, partial + addend) and unkept is None and torch.equal(x_unkept, x)
    with pytest.raises(ValueError, match="scores=False needs an empty bank"), torch.no_grad():
        append_source_phase1(bank, b1, None, queries, gains, scores=False)


@pytest.mark.parametrize("tile_elements", [16384, 0], ids=["sources-in-registers", "sources-one-at-a-time"])
@pytest.mark.parametrize("split_rows", [256, 0], ids=["program-per-query", "program-per-row"])
def test_phase1_over_one_source_returns_that_source(tile_elements, split_rows, monkeypatch):
    """Phase 1 over v_0 alone (the dense model's first block boundary): every query's output is v_0 itself, so the
    Triton kernels write none (out is a view of v_0's slot), and their lse still gives phase 2 the exact merge."""
    from kimi_hf.kernels.attn_res import two_phase

    monkeypatch.setattr(two_phase, "PHASE1_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(two_phase, "STORE_PHASE1_SPLIT_ROWS", split_rows)
    (v0,), partial, _, _ = _inputs(1, shape=(2, 5, 300), seed=8)
    g = torch.Generator().manual_seed(9)
    queries, gains = torch.randn(3, 300, generator=g), 1 + 0.3 * torch.randn(3, 300, generator=g)
    with torch.no_grad():
        bank, fused_out, fused_lse, _ = append_source_phase1(new_source_bank(1, v0, backend="triton"), v0, None,
                                                             queries, gains)  # fmt: skip
        out, lse = depth_attention_phase1(bank, queries, gains)
        slot = bank.storage.store[0].view(v0.shape)
        for o, lse_ in ((fused_out, fused_lse), (out, lse)):
            assert o.data_ptr() == slot.data_ptr() and o.stride(0) == 0 and torch.equal(o[2], v0)
            for j in range(3):
                h = depth_attention_phase2(o[j], lse_[j], partial, queries[j], gains[j], backend="triton")
                assert_close_rel(h, naive_depth_attention([v0, partial], queries[j], gains[j]), 1e-5, f"phase2[{j}]")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_norm", [False, True])
def test_phase2_add_matches_add_then_phase2(backend, with_norm):
    blocks, partial, _, _ = _inputs(3, shape=(2, 7, 48), seed=5)
    addend = torch.randn_like(partial)
    g = torch.Generator().manual_seed(6)
    queries, gains = torch.randn(2, 48, generator=g), 1 + 0.3 * torch.randn(2, 48, generator=g)
    norm_w = 1 + 0.2 * torch.randn(48, generator=g) if with_norm else None
    with torch.no_grad():
        out, lse = depth_attention_phase1(_bank(blocks, backend), queries, gains)
        x, new_partial = depth_attention_phase2_add(
            out[1], lse[1], partial, addend, queries[1], gains[1], backend=backend, norm_weight=norm_w, norm_eps=1e-5
        )
    assert torch.equal(new_partial, partial + addend)  # rounded once, as the eager addition
    h = naive_depth_attention(blocks + [partial + addend], queries[1], gains[1])
    assert_close_rel(x, rms_norm(h, norm_w, 1e-5) if with_norm else h, 1e-5, "phase 2 after the addition")
    with torch.no_grad():  # the sum not kept (the final aggregation): the same output, no sum returned
        unkept = depth_attention_phase2_add(out[1], lse[1], partial, addend, queries[1], gains[1], backend=backend,
                                            norm_weight=norm_w, norm_eps=1e-5, keep_sum=False)  # fmt: skip
    assert torch.equal(unkept[0], x) and unkept[1] is None
    with pytest.raises(ValueError, match="addend has shape"):
        depth_attention_phase2_add(out[1], lse[1], partial, addend[:, :1], queries[1], gains[1], backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_prenorm_matches_add_then_norm(backend):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(3, 5, 300, generator=g), torch.randn(3, 5, 300, generator=g)
    weight = 1 + 0.2 * torch.randn(300, generator=g)
    with torch.no_grad():
        total, normed = add_prenorm(x, y, weight, 1e-5, backend)
    assert torch.equal(total, x + y)
    assert_close_rel(normed, rms_norm(x + y, weight, 1e-5), 1e-6, "PreNorm of the sum")
    with pytest.raises(ValueError, match="inference-only"):
        add_prenorm(x, y.requires_grad_(), weight, 1e-5, backend)
    with pytest.raises(ValueError, match=r"weight \[D\], got \(3, 5, 300\) / \(3, 5, 300\) / \(4,\)"):
        add_prenorm(x, x, weight[:4], 1e-5, backend)


def test_two_phase_refuses_gradients():
    blocks, _, query, gain = _inputs(2)
    with pytest.raises(ValueError, match="inference-only"):
        depth_attention_phase1(_bank(blocks, "torch"), query[None].requires_grad_(), gain[None])


def test_bad_inputs_raise():
    blocks, partial, query, gain = _inputs(1)
    bank = append_source(_bank(blocks, "torch"), partial)
    with pytest.raises(ValueError, match="full"):
        append_source(bank, partial)
    with pytest.raises(ValueError, match=r"query must be \[D\] = \[48\] \(the hidden size\), got shape \(10,\)"):
        depth_attention(bank, query[:10], gain)
    with pytest.raises(ValueError, match=r"partial has shape \(2, 3, 8\)"):
        depth_attention(_bank(blocks, "torch"), query, gain, partial[..., :8])
    with pytest.raises(ValueError, match=r"source has shape \(3, 48\)"):
        append_source(_bank(blocks, "torch"), partial[0])
    with pytest.raises(ValueError, match="at least one source"):
        depth_attention(new_source_bank(2, partial, backend="torch"), query, gain)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        new_source_bank(2, partial, backend="cuda")
    with pytest.raises(ValueError, match="num_slots"):
        new_source_bank(0, partial)
    with pytest.raises(ValueError, match=r"shapes disagree: out \(2, 3, 48\), lse None, partial \(2, 3, 8\)"):
        with torch.no_grad():
            depth_attention_phase2(blocks[0], None, partial[..., :8], query, gain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batched_per_channel_parameters_are_refused(backend):
    """A query, gain or PreNorm weight with a batch dimension would broadcast on the torch path and be read as its
    first row by the kernels: refused by name on both paths."""
    blocks, partial, query, gain = _inputs(2)
    bank = _bank(blocks, backend)
    batched = query.expand(2, -1)
    for kwargs, name in ((dict(query=batched), "query"), (dict(gain=batched), "gain"),
                         (dict(norm_weight=batched), "norm_weight"), (dict(query=query[0]), "query")):  # fmt: skip
        args = dict(query=query, gain=gain, partial=partial) | kwargs
        with pytest.raises(ValueError, match=f"{name} must be \\[D\\] = \\[48\\]"):
            depth_attention(bank, **args)
    out, lse = depth_attention_phase1(bank, query[None], gain[None])
    with pytest.raises(ValueError, match="gain must be"), torch.no_grad():
        depth_attention_phase2(out[0], lse[0], partial, query, batched, backend=backend)


def test_triton_refuses_a_second_backward_through_a_bank():
    """Two losses over one bank backwarded apart: the Triton bank sums its readers' gradients once per forward, so
    the second backward is refused (as the torch path's autograd refuses it) instead of counting them twice."""
    blocks, partial, query, gain = _inputs(1)
    source = blocks[0].clone().requires_grad_()
    bank = append_source(new_source_bank(2, source, backend="triton"), source)
    first, second = depth_attention(bank, query, gain, partial), depth_attention(bank, query, gain, 2 * partial)
    first.sum().backward()
    with pytest.raises(RuntimeError, match="a second time"):
        second.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["depth_attention", "prenorm"])
def test_triton_backward_refuses_create_graph(backend, op):
    """A second derivative (create_graph=True, e.g. a gradient penalty) through the ops: the Triton backward kernels
    are not differentiable, and the first gradients' graph missed their dependence on the forward tensors (the second
    derivative came out wrong without a word), so that backward refuses; the torch path's autograd gives it. The loss's
    grad output is constant (``.sum()``), which ``once_differentiable`` would not have caught."""
    blocks, partial, query, gain = _inputs(1, shape=(2, 8))
    lin = torch.nn.Linear(8, 8)
    source = blocks[0].requires_grad_()
    if op == "depth_attention":
        bank = append_source(new_source_bank(2, source, backend=backend), lin(source))
        out = depth_attention(bank, query, gain, partial)
    else:
        out = prenorm(lin(source), gain, 1e-6, backend=backend)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(out.sum(), lin.weight, create_graph=True)
    else:
        (grad,) = torch.autograd.grad(out.sum(), lin.weight, create_graph=True)
        assert torch.autograd.grad(grad.square().sum(), lin.weight)[0].abs().max() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prenorm_weight_of_another_dtype_promotes_on_both_paths(backend):
    """fp16 sources with an fp32 PreNorm weight: the output follows :func:`prenorm`'s promotion (fp32) on the
    kernels' path too (they fuse the PreNorm only for a weight of the sources' dtype), with the reference's values."""
    blocks, partial, query, gain = _inputs(2, dtype=torch.float16)
    weight = 1 + 0.3 * torch.randn(48, generator=torch.Generator().manual_seed(5))
    bank = _bank(blocks, backend)
    expected = rms_norm(naive_depth_attention([b.float() for b in blocks] + [partial.float()], query.float(),
                                              gain.float()), weight, 1e-6)  # fmt: skip
    got = depth_attention(bank, query, gain, partial, norm_weight=weight)
    assert got.dtype == torch.float32
    assert_close_rel(got, expected, 5e-3, "depth attention + PreNorm")
    with torch.no_grad():
        out, lse = depth_attention_phase1(bank, query[None], gain[None])
        h = depth_attention_phase2(out[0], lse[0], partial, query, gain, backend=backend, norm_weight=weight)
        _, _, _, first = append_source_phase1(_bank(blocks[:1], backend), blocks[1], None, query[None], gain[None],
                                              norm_weight=weight)  # fmt: skip
    assert h.dtype == first.dtype == torch.float32
    assert_close_rel(h, expected, 5e-3, "phase 2 + PreNorm")
    block_first = rms_norm(naive_depth_attention([b.float() for b in blocks], query.float(), gain.float()), weight,
                           1e-6)  # fmt: skip
    assert_close_rel(first, block_first, 5e-3, "block boundary + PreNorm")


def _prenorm_check(shape, dtype, weight_dtype, device, rtol):
    """Triton prenorm vs autograd through the float64 formula: output, dh and dweight."""
    g = torch.Generator().manual_seed(3)
    h = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device, weight_dtype).requires_grad_()
    w = torch.randn(shape, generator=g).to(device)
    y = prenorm(h, weight, 1e-5, backend="triton")
    assert y.dtype == torch.promote_types(dtype, weight_dtype)
    (y.float() * w).sum().backward()
    ref_h, ref_w = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = rms_norm(ref_h, ref_w, 1e-5)
    (ref * w.double()).sum().backward()
    assert_close_rel(y, ref, rtol, "prenorm")
    assert_close_rel(h.grad, ref_h.grad, rtol, "d_h")
    assert_close_rel(weight.grad, ref_w.grad, rtol, "d_weight")


def test_triton_prenorm_matches_reference():
    """The standard residual's PreNorm kernel, rows not a multiple of the row block, D not a power of two."""
    _prenorm_check((3, 7, 48), torch.float32, torch.float32, "cpu", 1e-5)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        prenorm(torch.randn(2, 8), torch.ones(7))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_of_empty_rows_gives_zero_parameter_gradients(backend):
    """No rows (an empty batch): the backward launches nothing and the per-channel parameters get zero gradients
    (the Triton backward divided the rows by zero programs)."""
    blocks, partial, query, gain = _inputs(1, shape=(0, 3, 48))
    weight = torch.randn(48, requires_grad=True)
    h = partial.clone().requires_grad_()
    prenorm(h, weight, backend=backend).sum().backward()
    assert h.grad.shape == (0, 3, 48) and torch.equal(weight.grad, torch.zeros(48))
    for norm_weight in (None, torch.randn(48, requires_grad=True)):
        q, g, p = (t.clone().requires_grad_() for t in (query, gain, partial))
        bank = append_source(new_source_bank(2, blocks[0], backend=backend), blocks[0])
        depth_attention(bank, q, g, p, norm_weight=norm_weight).sum().backward()
        for grad in (q.grad, g.grad) + ((norm_weight.grad,) if norm_weight is not None else ()):
            assert torch.equal(grad, torch.zeros(48))
        assert p.grad.shape == (0, 3, 48)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,weight_dtype,d", [(torch.bfloat16, torch.bfloat16, 2048), (torch.bfloat16, torch.float32, 1000)]
)
def test_gpu_prenorm_matches_reference(dtype, weight_dtype, d):
    _prenorm_check((4, 513, d), dtype, weight_dtype, "cuda", 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n_blocks,d", [(1, 2048), (2, 2048), (4, 2048), (9, 1000)])
@pytest.mark.parametrize("one_tile_sources,apart", [(4, 0), (8, 0), (8, 1)])
def test_gpu_bf16_matches_reference(n_blocks, d, one_tile_sources, apart, monkeypatch):
    """bf16 against float32; the rows of 4 stored sources and the partial on the backward's two passes
    (``fused.BWD_ONE_TILE_SOURCES`` 4), on one tile of 8 (8) and on a tile of 4 with the partial apart
    (``BWD_PARTIAL_APART``), 2 stored sources and the partial on a tile of 4 or on a tile of 2 with the partial apart;
    in the forward (``FWD_ONE_TILE_SOURCES``) 4 stored sources and the partial on a tile of 4 with the partial apart
    (4) or on a tile of 8 (8); with 1 stored source, one tile of 2 every way."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "BWD_PARTIAL_APART", apart)
    monkeypatch.setattr(fused, "BWD_ONE_TILE_SOURCES", one_tile_sources)
    monkeypatch.setattr(fused, "FWD_ONE_TILE_SOURCES", one_tile_sources)
    blocks, partial, query, gain = _inputs(n_blocks, shape=(2, 257, d), dtype=torch.bfloat16, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (*blocks, partial, query, gain)]
    *srcs, q, g = leaves
    w = torch.randn_like(srcs[0])
    h = depth_attention(_bank(srcs[:-1], "triton"), q, g, srcs[-1])
    (h.float() * w).sum().backward()
    grads = [t.grad.clone() for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = naive_depth_attention(ref_leaves[:-2], ref_leaves[-2], ref_leaves[-1])
    (ref * w).sum().backward()
    assert_close_rel(h, ref, 1e-2, "h")
    for a, t in zip(grads, ref_leaves):
        assert_close_rel(a, t.grad, 2e-2, "grad")
    with torch.no_grad():
        queries, gains = torch.stack([q, q.flip(0)]), torch.stack([g, g.flip(0)])
        out, lse = depth_attention_phase1(_bank(srcs[:-1], "triton"), queries, gains)
        h2 = depth_attention_phase2(out[1], lse[1], srcs[-1], queries[1], gains[1])
        ref2 = naive_depth_attention([t.float() for t in srcs], queries[1].float(), gains[1].float())
        assert_close_rel(h2, ref2, 1e-2, "two-phase")


@pytest.mark.gpu
@pytest.mark.parametrize("last_as_partial", [1, 0])
def test_gpu_final_aggregation_bf16(last_as_partial, monkeypatch):
    """5 stored sources and no partial sum (a 4-block model's final aggregation), D 2048, bf16 against float32: the
    fifth read as the partial sum (``LAST_AS_PARTIAL``), or all five on the forward's online softmax and the
    backward's tile of 8."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "LAST_AS_PARTIAL", last_as_partial)
    blocks, _, query, gain = _inputs(5, shape=(2, 257, 2048), dtype=torch.bfloat16, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (*blocks, query, gain)]
    *srcs, q, g = leaves
    w = torch.randn_like(srcs[0])
    h = depth_attention(_bank(srcs, "triton"), q, g)
    (h.float() * w).sum().backward()
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = naive_depth_attention(ref_leaves[:-2], ref_leaves[-2], ref_leaves[-1])
    (ref * w).sum().backward()
    assert_close_rel(h, ref, 1e-2, "h")
    for a, t in zip(leaves, ref_leaves):
        assert_close_rel(a.grad, t.grad, 2e-2, "grad")


@pytest.mark.gpu
def test_gpu_deferred_source_gradients_bf16(monkeypatch):
    """Eight readers of 3 stored sources (514 rows, D 2048) in bf16 against the torch backend in float64: deferring
    their gradients into the sources (one float32 sum of the eight) is at least as accurate as each reader adding
    into them (eight bf16 roundings of the running sum). Both stay within 1e-1: at D 2048 these O(1) queries give
    scores of tens, whose softmax gradients cancel (session 28, H100: the last partial's gradient at 5.1e-2 on either
    path)."""
    from kimi_hf.kernels.attn_res import fused

    shape = (2, 257, 2048)
    expected = _readers_graph("torch", 8, shape, torch.float64, "cuda", rounded=torch.bfloat16)
    errors = {}
    for readers in (0, 8):
        monkeypatch.setattr(fused, "DEFER_READERS", readers)
        actual = _readers_graph("triton", 8, shape, torch.bfloat16, "cuda")
        pairs = [(a, e) for a, e in zip(actual, expected) if e.any()]  # (the first reader's partial is unused)
        errors[readers] = [relative_error(a, e, f"tensor {i}") for i, (a, e) in enumerate(pairs)]
    for i, (direct, deferred) in enumerate(zip(errors[0], errors[8])):
        assert deferred <= max(1.25 * direct, 5e-3) and max(direct, deferred) < 1e-1, (i, direct, deferred)


@pytest.mark.gpu
@pytest.mark.parametrize("query_pairs", [0, 1])
@pytest.mark.parametrize("n_prev", [0, 1, 2, 4])
def test_gpu_block_boundary_bf16(n_prev, query_pairs, monkeypatch):
    """The fused prefill block boundary (2053 rows: several waves of programs, the last group partial) in bf16
    against float32, 8 queries at D 2048 over 2, 3 and 5 sources (``store_phase1_rows_kernel``: rows in pairs, at a
    register cap; one row with the new source apart from the tile, 3 and 5; the queries one at a time and in pairs);
    over v_0 alone, four rows per program (``store_scores_kernel``). Outputs and log-sum-exps."""
    from kimi_hf.kernels.attn_res import two_phase

    monkeypatch.setattr(two_phase, "PREFILL_QUERY_PAIRS", query_pairs)
    monkeypatch.setattr(two_phase, "ONE_SOURCE_QUERY_PAIRS", query_pairs)
    blocks, _, _, _ = _inputs(n_prev + 1, shape=(1, 2053, 2048), dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    queries = torch.randn(8, 2048, generator=g, device="cuda", dtype=torch.bfloat16)
    gains = (1 + 0.3 * torch.randn(8, 2048, generator=g, device="cuda")).to(torch.bfloat16)
    norm_w = (1 + 0.2 * torch.randn(2048, generator=g, device="cuda")).to(torch.bfloat16)
    bank = new_source_bank(n_prev + 1, blocks[0], backend="triton")
    for b in blocks[:-1]:
        bank = append_source(bank, b)
    with torch.no_grad():
        _, out, lse, first = append_source_phase1(bank, blocks[-1], None, queries, gains, norm_w, 1e-5)
    sources = [b.float() for b in blocks]
    keys = torch.stack([v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + bank.eps) for v in sources])
    for j in range(8):
        ref = naive_depth_attention(sources, queries[j].float(), gains[j].float())
        assert_close_rel(out[j], ref, 1e-2, f"out[{j}]")
        scores = keys @ (queries[j].float() * gains[j].float())
        assert_close_rel(lse[j], torch.logsumexp(scores, dim=0), 1e-2, f"lse[{j}]")
    assert_close_rel(first, rms_norm(out[0].float(), norm_w.float(), 1e-5), 1e-2, "query 0's PreNorm")


@pytest.mark.gpu
def test_gpu_phase2_scores_a_lone_source_bf16():
    """Phase 2 of the first block in bf16 (2053 rows, D 2048): after the boundary over v_0 that scores no query
    (``scores=False``), lse=None (v_0 scored in the kernel) against the scored lse and against float32, with the
    addend and the sum kept or not."""
    (v0,), partial, _, _ = _inputs(1, shape=(1, 2053, 2048), dtype=torch.bfloat16, device="cuda", seed=14)
    addend = torch.randn_like(partial)
    g = torch.Generator(device="cuda").manual_seed(15)
    queries = torch.randn(8, 2048, generator=g, device="cuda", dtype=torch.bfloat16)
    gains = (1 + 0.3 * torch.randn(8, 2048, generator=g, device="cuda")).to(torch.bfloat16)
    norm_w = (1 + 0.2 * torch.randn(2048, generator=g, device="cuda")).to(torch.bfloat16)
    with torch.no_grad():
        _, out, lse, _ = append_source_phase1(new_source_bank(1, v0, backend="triton"), v0, None, queries, gains,
                                              norm_w, 1e-5, first_out=False, scores=False)  # fmt: skip
        _, _, scored, _ = append_source_phase1(new_source_bank(1, v0, backend="triton"), v0, None, queries, gains)
        assert lse is None
        for j in (1, 7):
            x, merged = depth_attention_phase2_add(out[j - 1], None, partial, addend, queries[j], gains[j],
                                                   norm_weight=norm_w, norm_eps=1e-5)  # fmt: skip
            x_scored, _ = depth_attention_phase2_add(out[j - 1], scored[j], partial, addend, queries[j], gains[j],
                                                     norm_weight=norm_w, norm_eps=1e-5)  # fmt: skip
            x_unkept, unkept = depth_attention_phase2_add(out[j - 1], None, partial, addend, queries[j], gains[j],
                                                          norm_weight=norm_w, norm_eps=1e-5, keep_sum=False)
            ref = naive_depth_attention([v0.float(), merged.float()], queries[j].float(), gains[j].float())
            assert_close_rel(x, rms_norm(ref, norm_w.float(), 1e-5), 1e-2, f"phase 2 [{j}]")
            assert_close_rel(x, x_scored, 1e-2, f"phase 2 [{j}] against the scored lse")
            assert torch.equal(x_unkept, x) and unkept is None


def test_kernels_compile_for_hopper():
    """Every kernel, in each variant its launchers use at D 2048 (and the odd D 1000), compiles for sm_90 with the
    installed triton: the interpreter never generates code, so it misses what only code generation refuses (a
    session-11 phase-1 edit passed here and failed to compile on the H200). Runs the compile-only register report
    in a process without TRITON_INTERPRET."""
    from kimi_hf.kernels.attn_res import _triton

    script = Path(__file__).resolve().parents[1] / "kernels" / "benchmarks" / "attn_res_registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for hidden in ("2048", "1000"):
        run = subprocess.run(
            [sys.executable, str(script), "--hidden-size", hidden], env=env, capture_output=True, text=True, timeout=900
        )
        if run.returncode != 0 and "no ptxas" in run.stderr:
            pytest.skip("this triton has no bundled ptxas")
        assert run.returncode == 0, run.stderr[-3000:]
        kernels = {name for name in dir(_triton) if name.endswith("_kernel")}
        reported = {line.split("|")[1].strip() for line in run.stdout.splitlines() if line.endswith(" |")}
        assert kernels <= reported, run.stdout
