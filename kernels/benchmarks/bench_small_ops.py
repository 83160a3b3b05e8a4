"""Benchmark kimi_hf's small KDA-layer ops against fla 0.6.0 and the memory floor.

Ops: the short causal conv (forward, forward+backward, one-token decode update), the gated RMSNorm
(forward, forward+backward), the KDA decode kernel (one token, eager and CUDA-graph captured) and
AttnRes's depth attention (``--sections attn_res``; its anchor is the standard residual's PreNorm) and its two-phase
inference (``--sections attn_res_prefill``, and at one token ``attn_res_decode``); ``--sections traffic`` times a plain
streaming kernel at the read/write mixes of the prefill's residual kernels, the rate a kernel of that mix can reach;
``--sections ce_lora_pack`` times CE-LoRA's packing pass at the shapes of ``bench_ce_lora.py`` (sweep its tiles with
``--sweep ce_lora.pack.CONFIG=-1,0,1``); ``--sections lora_branch`` times the fp32 LoRA branch's kernels on bf16
activations against PEFT's torch sequence.
Every number is a triton.testing.do_bench median (L2 flushed between calls; the CUDA-graph rows use
do_bench_cudagraph, unflushed). "floor" is the time to move the op's minimum bytes at the device's copy
bandwidth, measured in the run (a 1 GiB copy) unless --bandwidth-tbs gives it; the CPU smoke run, whose timings mean
nothing, uses the H200's 4.27 TB/s (shared/REFERENCE.md).

    python kernels/benchmarks/bench_small_ops.py              # full shapes, needs a CUDA GPU
    TRITON_INTERPRET=1 python kernels/benchmarks/bench_small_ops.py --tiny   # CPU smoke run

For a combined run: ``from bench_small_ops import run_benchmarks, markdown_table``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from _profile import add_bandwidth_option, floor_bandwidth_tbs, kernel_time_us

from kimi_hf.kernels._launch import add_set_option, apply_set_option, get_launch_constant, set_launch_constants
from kimi_hf.kernels.attn_res import (
    add_prenorm,
    append_source,
    append_source_phase1,
    depth_attention,
    depth_attention_phase2_add,
    new_source_bank,
    prenorm,
)
from kimi_hf.kernels.attn_res.fused import block_d, num_warps
from kimi_hf.kernels.conv import causal_conv1d, causal_conv1d_update
from kimi_hf.kernels.gated_norm import gated_rms_norm
from kimi_hf.kernels.kda import fused_recurrent_kda
from kimi_hf.kernels.kda.fused_recurrent import fused_recurrent_kda_fwd


@dataclass
class Row:
    """One benchmark line: our time, the anchor's (fla) time and the memory floor, in microseconds."""

    op: str
    shape: str
    ours_us: float
    anchor: str
    anchor_us: float | None
    floor_us: float | None


@dataclass
class _Setup:
    device: str
    dtype: torch.dtype
    tiny: bool
    bandwidth: float  # bytes per second
    gpu_time: bool = False  # time every op by its kernels' GPU time (profiler), not do_bench

    def floor_us(self, num_bytes: float) -> float:
        return num_bytes / self.bandwidth * 1e6


def _time_us(fn: Callable[[], object], setup: _Setup, grad_to_none: list[torch.Tensor] | None = None,
             graph: bool = False) -> float:
    """Median microseconds of fn(). Off CUDA (--tiny smoke run) the wall-clock time of one call: under the
    interpreter the time says nothing of the kernels, and each call costs seconds of the CPU test suite. With
    ``setup.gpu_time``, the GPU time of fn()'s kernels per call instead (``grad_to_none`` reset before each call, so
    that no gradient accumulation is timed)."""
    if setup.device == "cuda" and setup.gpu_time:
        def call():
            for t in grad_to_none or ():
                t.grad = None
            return fn()

        return kernel_time_us(call)
    if setup.device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    if graph:
        return triton.testing.do_bench_cudagraph(fn, grad_to_none=grad_to_none, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median") * 1e3


def _kernel_us(fn: Callable[[], object], setup: _Setup) -> float:
    """GPU time of fn()'s kernels per call (``_profile.kernel_time_us``), for ops whose eager call is bound by the
    host (autograd and launches of a sub-100 us op): do_bench would time the host. Off CUDA: as ``_time_us``."""
    if setup.device != "cuda":
        return _time_us(fn, setup)
    return kernel_time_us(fn)


def _anchor_us(fn_factory: Callable[[], Callable[[], object]], setup: _Setup, **kw) -> float | None:
    """Time an fla anchor; None (printed as n/a) where fla is missing or cannot run here (e.g. on CPU)."""
    try:
        fn = fn_factory()
        return _time_us(fn, setup, **kw)
    except Exception as err:  # noqa: BLE001 - an anchor that cannot run must not hide our numbers
        print(f"  anchor unavailable: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
        return None


def bench_conv(setup: _Setup) -> list[Row]:
    """Causal conv (W=4, SiLU, no bias as in Kimi Linear) fwd and fwd+bwd, and the decode update."""
    B, T, D, W = (1, 64, 32, 4) if setup.tiny else (1, 8192, 4096, 4)
    dev, dt = setup.device, setup.dtype
    x = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(D, W, device=dev, dtype=dt) / 2).requires_grad_()
    dy = torch.randn(B, T, D, device=dev, dtype=dt)
    esize = x.element_size()
    shape = f"B{B} T{T} D{D} W{W} {str(dt).removeprefix('torch.')}"

    def fla_conv():
        from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d

        return lambda: fla_causal_conv1d(x, w, activation="silu")[0]

    def fla_conv_fb():
        from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d

        return lambda: fla_causal_conv1d(x, w, activation="silu")[0].backward(dy)

    def ours():
        return causal_conv1d(x, w, activation="silu", backend="triton")[0]

    rows = [
        Row("causal_conv1d fwd", shape, _time_us(ours, setup),
            "fla causal_conv1d", _anchor_us(fla_conv, setup), setup.floor_us(2 * x.numel() * esize)),
        Row("causal_conv1d fwd+bwd", shape,
            _time_us(lambda: ours().backward(dy), setup, grad_to_none=[x, w]),
            "fla causal_conv1d", _anchor_us(fla_conv_fb, setup, grad_to_none=[x, w]),
            setup.floor_us(5 * x.numel() * esize)),
    ]
    for N in (1, 2) if setup.tiny else (1, 64):
        xt = torch.randn(N, D, device=dev, dtype=dt)
        state = torch.randn(N, D, W, device=dev, dtype=dt)
        w_eval = w.detach()

        def fla_update():
            from fla.modules.causal_conv1d import causal_conv1d_update as fla_update_op

            cache = state.clone()
            return lambda: fla_update_op(xt, cache, weight=w_eval, activation="silu")

        rows.append(Row(
            "causal_conv1d_update (decode)", f"N{N} D{D} W{W}",
            _time_us(lambda: causal_conv1d_update(xt, state, weight=w_eval, activation="silu", backend="triton"),
                     setup),
            "fla causal_conv1d_update", _anchor_us(fla_update, setup),
            setup.floor_us((2 * N * D * W + 2 * N * D) * esize),
        ))
    return rows


def bench_gated_norm(setup: _Setup) -> list[Row]:
    """Gated RMSNorm (sigmoid gate, as KDA's o_norm) over [tokens * heads, head_dim] rows."""
    M, D = (64, 16) if setup.tiny else (8192 * 32, 128)
    dev, dt = setup.device, setup.dtype
    x = torch.randn(M, D, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(M, D, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(D, device=dev, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(M, D, device=dev, dtype=dt)
    nbytes = x.numel() * x.element_size()
    shape = f"[{M}, {D}] {str(dt).removeprefix('torch.')}"

    def fla_norm():
        from fla.modules.fused_norm_gate import rms_norm_gated

        return lambda: rms_norm_gated(x, g, w, None, activation="sigmoid", eps=1e-5)

    def fla_norm_fb():
        from fla.modules.fused_norm_gate import rms_norm_gated

        return lambda: rms_norm_gated(x, g, w, None, activation="sigmoid", eps=1e-5).backward(dy)

    return [
        Row("gated_rms_norm fwd", shape, _time_us(lambda: gated_rms_norm(x, g, w, backend="triton"), setup),
            "fla rms_norm_gated", _anchor_us(fla_norm, setup), setup.floor_us(3 * nbytes)),
        Row("gated_rms_norm fwd+bwd", shape,
            _time_us(lambda: gated_rms_norm(x, g, w, backend="triton").backward(dy), setup, grad_to_none=[x, g, w]),
            "fla rms_norm_gated", _anchor_us(fla_norm_fb, setup, grad_to_none=[x, g, w]), setup.floor_us(8 * nbytes)),
    ]


def _kda_decode_inputs(N: int, H: int, D: int, setup: _Setup) -> dict[str, torch.Tensor]:
    """One decode token per sequence, Kimi Linear's way: raw gate + A_log/dt_bias, q/k L2-normed in kernel."""
    dev, dt = setup.device, setup.dtype
    return dict(
        q=torch.randn(N, 1, H, D, device=dev, dtype=dt),
        k=torch.randn(N, 1, H, D, device=dev, dtype=dt),
        v=torch.randn(N, 1, H, D, device=dev, dtype=dt),
        g=torch.randn(N, 1, H, D, device=dev, dtype=torch.float32),
        beta=torch.rand(N, 1, H, device=dev, dtype=dt),
        A_log=torch.rand(H, device=dev, dtype=torch.float32),
        dt_bias=torch.randn(H * D, device=dev, dtype=torch.float32),
        state=torch.randn(N, H, D, D, device=dev, dtype=torch.float32) * 0.1,
    )


def bench_kda_decode(setup: _Setup) -> list[Row]:
    """One KDA decode step: kernel entry (state in place), public op, and both in a CUDA graph."""
    H, D = (2, 16) if setup.tiny else (32, 128)
    rows = []
    for N in (1, 2) if setup.tiny else (1, 64):
        t = _kda_decode_inputs(N, H, D, setup)
        qkvgb = [t[n] for n in ("q", "k", "v", "g", "beta")]
        shape = f"B{N} H{H} K=V={D} {str(setup.dtype).removeprefix('torch.')}"
        floor = setup.floor_us(2 * N * H * D * D * 4)
        gate = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=t["A_log"], dt_bias=t["dt_bias"])

        def ours_fwd():
            return fused_recurrent_kda_fwd(
                *qkvgb, D**-0.5, t["state"], True, True, True, False, t["A_log"], t["dt_bias"], None, True
            )

        def ours_public():
            return fused_recurrent_kda(
                *qkvgb, initial_state=t["state"], inplace_final_state=True, backend="triton", **gate
            )

        def fla_fwd():
            from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_kernel_entry

            state = t["state"].clone()
            return lambda: fla_kernel_entry(*qkvgb, initial_state=state, scale=D**-0.5, output_final_state=True,
                                            inplace_final_state=True, **gate)

        def fla_public():
            from fla.ops.kda import fused_recurrent_kda as fla_op

            return lambda: fla_op(*qkvgb, initial_state=t["state"], output_final_state=True, **gate)

        for graph in (False, True):
            if graph and setup.device != "cuda":
                continue
            tag = " [CUDA graph]" if graph else ""
            rows.append(Row(f"KDA decode: fused_recurrent_kda_fwd, state in place{tag}", shape,
                            _time_us(ours_fwd, setup, graph=graph), "fla fused_recurrent_kda_fwd (inplace_final_state)",
                            _anchor_us(fla_fwd, setup, graph=graph), floor))
            rows.append(Row(f"KDA decode: public fused_recurrent_kda (checks + kernel){tag}", shape,
                            _time_us(ours_public, setup, graph=graph), "fla fused_recurrent_kda (new final state)",
                            _anchor_us(fla_public, setup, graph=graph), floor))
    return rows


def sweep_kda_block_v(setup: _Setup) -> list[Row]:
    """Our decode kernel alone at each state tile width and warp count (in a CUDA graph on the GPU: the launch is
    not what is measured), to check the block_v / num_warps heuristics."""
    H, D = (2, 16) if setup.tiny else (32, 128)
    rows = []
    for N in (1, 2) if setup.tiny else (1, 64):
        t = _kda_decode_inputs(N, H, D, setup)
        args = [t[n] for n in ("q", "k", "v", "g", "beta")]
        for block_v, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
            fn = lambda: fused_recurrent_kda_fwd(  # noqa: E731
                *args, D**-0.5, t["state"], True, True, True, False, t["A_log"], t["dt_bias"], None, True,
                block_v=block_v, num_warps=warps,
            )  # fmt: skip
            rows.append(Row(f"KDA decode kernel, block_v={block_v}, {warps} warps", f"B{N} H{H} K=V={D}",
                            _time_us(fn, setup, graph=setup.device == "cuda"), "-", None,
                            setup.floor_us(2 * N * H * D * D * 4)))  # fmt: skip
    return rows


def _depth_inputs(setup: _Setup) -> tuple[int, int, Callable[..., torch.Tensor], str, int]:
    """Shared by the AttnRes sections: (M, D, a seeded ``rand(*shape)`` in the run's dtype, the shape label, the
    bytes of one [M, D] pass)."""
    M, D = (16, 64) if setup.tiny else (8192, 2048)
    gen = torch.Generator(device=setup.device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=setup.device, dtype=setup.dtype, generator=gen)

    label = f"M{M} D{D} {str(setup.dtype).removeprefix('torch.')}"
    return M, D, rand, label, M * D * torch.finfo(setup.dtype).bits // 8


def _filled_bank(n: int, like: torch.Tensor, rand: Callable[..., torch.Tensor], capacity: int | None = None):
    """A Triton source bank holding ``n`` random sources shaped like ``like`` [M, D] (room for ``capacity``)."""
    bank = new_source_bank(capacity or n, like, backend="triton")
    for _ in range(n):
        bank = append_source(bank, rand(*like.shape))
    return bank


def bench_depth_attention(setup: _Setup) -> list[Row]:
    """AttnRes's training-path read of one sublayer: the depth attention over n stored sources plus the block's
    partial sum, with the sublayer's PreNorm fused (forward, forward+backward), against the standard residual's
    PreNorm (one Triton kernel each way), the op it replaces. Minimum bytes in [M, D] passes: forward n + 2
    (read the sources and the partial, write the output), backward 3n + 3 (dout, the sources, the partial, a
    read-modify-write of each stored source's gradient, the partial's gradient); PreNorm 2 and 3.
    Times are the GPU time of the kernels (``_kernel_us``): eager, these autograd calls are host-bound."""
    M, D, rand, shape, bytes_per_pass = _depth_inputs(setup)
    dev, dt = setup.device, setup.dtype
    dy = rand(M, D)
    w = torch.ones(D, device=dev, dtype=dt, requires_grad=True)
    h = rand(M, D).requires_grad_()
    norm = ("standard residual: prenorm (Triton)", lambda: prenorm(h, w, backend="triton"))
    rows = []
    for n in (1, 2, 4):
        bank = _filled_bank(n, dy, rand)
        q = (rand(D) * 0.1).requires_grad_()
        gain = torch.ones(D, device=dev, dtype=dt, requires_grad=True)
        partial = rand(M, D).requires_grad_()

        def attend(bank=bank, q=q, gain=gain, partial=partial):
            return depth_attention(bank, q, gain, partial, norm_weight=w)

        op = f"depth attention, {n} stored source{'s' if n > 1 else ''} + partial, PreNorm fused"
        leaves = [q, gain, partial, w, h]

        def backward(forward, leaves=leaves):
            for t in leaves:  # a fresh .grad each call: no accumulation kernels in the times
                t.grad = None
            forward().backward(dy)

        rows.append(Row(f"{op}, fwd", shape, _kernel_us(attend, setup), norm[0], _kernel_us(norm[1], setup),
                        setup.floor_us((n + 2) * bytes_per_pass)))  # fmt: skip
        rows.append(Row(f"{op}, fwd+bwd", shape, _kernel_us(lambda: backward(attend), setup), norm[0],
                        _kernel_us(lambda: backward(norm[1]), setup),
                        setup.floor_us((4 * n + 5) * bytes_per_pass)))  # fmt: skip
    return rows


def bench_two_phase(setup: _Setup) -> list[Row]:
    """AttnRes's inference (prefill) path at a block boundary, as the models run it (``append_source_phase1``): the
    finished block (partial sum + last output) is stored, then the next block's Q pseudo-queries read all n sources
    (the new one included) and the first sublayer's PreNorm is applied, at the shapes of the ~1B models (Kimi
    Linear: Q 4; dense: Q 8; the last block's phase 1 scores the final aggregation's query too: Q 5 and 9). The
    models keep query 0's output only as that PreNorm (``first_out=False``); the rows "query 0's output written"
    time the full out for comparison. Minimum bytes in [M, D] passes: n + Q + 2 (read the two summands and the
    n - 1 stored sources, write the new source, Q - 1 outputs and the first sublayer's input; n + Q + 3 with query
    0's output). Over v_0 alone, read in the slot that the embeddings were gathered into (``begin_from_ids``) and
    itself every query's output (``two_phase._phase1_out``): 2 passes (the read and the first sublayer's input);
    the models score no query there (``scores=False``, since session 37: each phase 2 of the first block scores
    v_0 itself), the "queries scored" rows time the launch that does. The final aggregation is a phase 2 of the
    last block that keeps no sum (``keep_sum=False``, 4 passes: the query's phase-1 out, the partial sum and the
    last output read, the input of the final norm written); until session 36 it was a boundary of 1 query over
    n = 5 sources that stored nothing (n + 2 passes; session 37, H200: 84.0 us against this phase 2's 27.1 and the
    9th query's 16.6 at the boundary before). The anchor column is the standard residual's add + PreNorm, one
    sublayer's worth of the op the block's reads replace. Kernel GPU time per call."""
    M, D, rand, shape, bytes_per_pass = _depth_inputs(setup)
    h, out, w = rand(M, D), rand(M, D), torch.ones(D, device=setup.device, dtype=setup.dtype)
    lse = torch.zeros(M, device=setup.device, dtype=torch.float32)
    query, gain = rand(D) * 0.1, 1 + 0.1 * rand(D)
    anchor = "add + prenorm fwd (Triton)"
    with torch.no_grad():
        norm_us = _kernel_us(lambda: add_prenorm(h, out, w, backend="triton"), setup)
        rows = []
        for n_q, n in ((4, 1), (4, 2), (5, 4), (8, 1), (8, 2), (8, 3), (9, 4)):
            bank = _filled_bank(n - 1, h, rand, capacity=n)
            queries, gains = rand(n_q, D) * 0.1, 1 + 0.1 * rand(n_q, D)
            what = f"{n_q} {'queries' if n_q > 1 else 'query'} x {n} {'sources' if n > 1 else 'source'}"
            op = f"block boundary: store + phase 1, {what} + PreNorm"
            x, y = h, out
            if n == 1:  # v_0 alone, already in its slot (``begin_from_ids``): read there, not stored
                x, y = bank.storage.store[0].view_as(h).copy_(h), None
            variants = [(False, True, "")] if n > 1 else [(False, False, ""), (False, True, ", queries scored")]
            if n > 1:
                variants.append((True, True, ", query 0's output written"))
            for first_out, scores, label in variants:
                ours = _kernel_us(lambda: append_source_phase1(bank, x, y, queries, gains, w, first_out=first_out,
                                                               scores=scores), setup)  # fmt: skip
                passes = n + n_q + first_out + 2 if n > 1 else 2
                rows.append(Row(op + label, shape, ours, anchor, norm_us, setup.floor_us(passes * bytes_per_pass)))
        for score_out in (False, True):
            op = "phase 2: partial + last output, merge, PreNorm" + (", scoring its lone source" if score_out else "")
            ours = _kernel_us(lambda: depth_attention_phase2_add(out, None if score_out else lse, h, out, query, gain,
                                                                 backend="triton", norm_weight=w), setup)  # fmt: skip
            rows.append(Row(op, shape, ours, anchor, norm_us, setup.floor_us(5 * bytes_per_pass)))
        ours = _kernel_us(lambda: depth_attention_phase2_add(out, lse, h, out, query, gain, backend="triton",
                                                             norm_weight=w, keep_sum=False), setup)  # fmt: skip
        rows.append(Row("final aggregation: phase 2 of the last block, sum not kept, + norm", shape, ours, anchor,
                        norm_us, setup.floor_us(4 * bytes_per_pass)))  # fmt: skip
    return rows


def bench_decode_reads(setup: _Setup) -> list[Row]:
    """AttnRes's inference reads at one token (B1 decode), as the ~1B models run them: phase 2 with the previous
    sublayer's output added to the partial sum and the PreNorm fused (``depth_attention_phase2_add``, all but a
    block's first sublayer), and the block boundary (``append_source_phase1``: store, phase 1 of Q queries over n
    sources, one program per query, and the first sublayer's PreNorm, query 0's output kept only as that PreNorm),
    against the standard residual's add + PreNorm at one token. A one-row launch is a chain of loads and
    reductions, not bytes: no floor. Kernel GPU time per call."""
    _, D, rand, _, _ = _depth_inputs(setup)  # the other AttnRes sections' hidden size and seeded inputs, one row
    shape = f"M1 D{D} {str(setup.dtype).removeprefix('torch.')}"
    h, out, addend, w = rand(1, D), rand(1, D), rand(1, D), torch.ones(D, device=setup.device, dtype=setup.dtype)
    lse = torch.zeros(1, device=setup.device, dtype=torch.float32)
    query, gain = rand(D) * 0.1, 1 + 0.1 * rand(D)
    anchor = "add + prenorm fwd (Triton)"
    with torch.no_grad():
        norm_us = _kernel_us(lambda: add_prenorm(h, out, w, backend="triton"), setup)
        rows = [Row("decode phase 2: partial + last output, merge, PreNorm", shape,
                    _kernel_us(lambda: depth_attention_phase2_add(out, lse, h, addend, query, gain,
                                                                  backend="triton", norm_weight=w), setup),
                    anchor, norm_us, None)]  # fmt: skip
        for n_q, n in ((4, 2), (4, 5), (8, 2), (8, 5)):
            bank = _filled_bank(n - 1, h, rand, capacity=n)
            queries, gains = rand(n_q, D) * 0.1, 1 + 0.1 * rand(n_q, D)
            op = f"decode block boundary: store + phase 1, {n_q} queries x {n} sources + PreNorm"
            ours = _kernel_us(lambda: append_source_phase1(bank, h, out, queries, gains, w, first_out=False), setup)
            rows.append(Row(op, shape, ours, anchor, norm_us, None))
    return rows


@triton.jit
def _stream_kernel(src_ptr, dst_ptr, M, D, READS: tl.constexpr, WRITES: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row per program: read row ``row`` of READS [M, D] slabs of src, write WRITES slabs of dst (the sum times
    the slab's index + 1, so that no store is a copy the compiler could share); no other work."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(READS):
        acc += tl.load(src_ptr + (i * M + row) * D + cols, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(WRITES):
        tl.store(dst_ptr + (j * M + row) * D + cols, (acc * (j + 1)).to(dst_ptr.dtype.element_ty), mask=mask)


# (reads, writes) of [M, D] per launch, and the kernel of the models' prefill with that mix (dense ~1B unless named)
_TRAFFIC_MIXES = (
    (1, 0, "read only"),
    (0, 1, "write only"),
    (1, 1, "copy; the standard residual's PreNorm of the embeddings"),
    (2, 2, "the standard residual's add + PreNorm"),
    (3, 2, "phase 2 with the add"),
    (1, 2, "the first block boundary (store v_0, its PreNorm)"),
    (3, 9, "the boundary over 2 sources, 8 queries"),
    (4, 9, "the boundary over 3 sources, 8 queries"),
    (5, 9, "the boundary over 4 sources, 8 queries"),
    (6, 2, "the final aggregation over 5 sources"),
    (3, 5, "Kimi Linear's boundary over 2 sources, 4 queries"),
)


def bench_traffic(setup: _Setup) -> list[Row]:
    """The rate a kernel can reach at each read/write mix of the prefill's residual kernels (``_TRAFFIC_MIXES``):
    ``_stream_kernel``, one [M, D] row per program at the inference kernels' warps, does nothing but move those
    bytes. A kernel of that mix whose time is close to this one's is bound by its traffic, not by its work, however
    far it is from the floor (taken at the copy bandwidth). Anchors: torch's ``zero_`` (write only) and ``copy_``.
    Kernel GPU time per call."""
    M, D, rand, shape, bytes_per_pass = _depth_inputs(setup)
    src, dst = rand(6, M, D), rand(9, M, D)
    anchors = {(0, 1): ("torch zero_", lambda: dst[0].zero_()), (1, 1): ("torch copy_", lambda: dst[0].copy_(src[0]))}
    rows = []
    for reads, writes, what in _TRAFFIC_MIXES:
        def stream(reads=reads, writes=writes):
            _stream_kernel[(M,)](src, dst, M, D, READS=reads, WRITES=writes, BLOCK_D=block_d(D),
                                 num_warps=num_warps(D))  # fmt: skip

        anchor, anchor_fn = anchors.get((reads, writes), ("n/a", None))
        rows.append(Row(f"stream {reads} reads + {writes} writes ({what})", shape, _kernel_us(stream, setup), anchor,
                        _kernel_us(anchor_fn, setup) if anchor_fn is not None else None,
                        setup.floor_us((reads + writes) * bytes_per_pass)))  # fmt: skip
    return rows


# CE-LoRA's packing pass at the shapes of bench_ce_lora.py: the ~0.9B Llama step's B4 x T2048 rows at its channel
# counts (k/v; q/o/down; gate/up) and the per-layer part's 16K x 4096
_PACK_SHAPES = ((8192, 1024), (8192, 2048), (8192, 5632), (16384, 4096))
_PACK_RATIO, _PACK_LORA_RANK = 0.5, 16  # LoRA r16's dX rides in the low-rank block beside the SVD's


def bench_ce_lora_pack(setup: _Setup) -> list[Row]:
    """CE-LoRA's packing pass ``G = [dY B0 | dY[:, S]]`` (``kimi_hf.kernels.ce_lora.ce_pack_grad_output``) at
    ``_PACK_SHAPES``, keep ratio 0.5, with LoRA's factors as a training step passes them (``s B`` written into the
    plan, ``A`` copied by the kernel's launch). Anchor: cuBLAS's ``dY @ B0`` alone, which reads all of ``dY`` as the
    pass does; floor: read ``dY``, write ``G``."""
    from kimi_hf.kernels.ce_lora import ce_pack_grad_output, kept_channels, make_plan
    from kimi_hf.peft import CELoraConfig

    svd_rank = CELoraConfig().svd_rank_for(_PACK_LORA_RANK)  # CE-LoRA's default, 7r/8
    shapes = ((64, 256), (48, 200)) if setup.tiny else _PACK_SHAPES
    elem = torch.finfo(setup.dtype).bits // 8
    rows = []
    for n_rows, n_cols in shapes:
        generator = torch.Generator().manual_seed(n_cols)
        keep = kept_channels(n_cols, _PACK_RATIO, svd_rank + _PACK_LORA_RANK)
        index = torch.randperm(n_cols, generator=generator)[:keep].to(setup.device)
        weight = torch.randn(n_cols, 64, device=setup.device, dtype=setup.dtype)  # the pass never reads W's columns
        b0 = torch.randn(n_cols, svd_rank, device=setup.device)
        a0 = torch.randn(svd_rank, 64, device=setup.device)
        dy = torch.randn(n_rows, n_cols, device=setup.device, dtype=setup.dtype)
        plan = make_plan(weight, b0, a0, index, setup.dtype, lora_rank=_PACK_LORA_RANK)
        lora = (torch.randn(_PACK_LORA_RANK, 64, device=setup.device, dtype=setup.dtype),
                torch.randn(n_cols, _PACK_LORA_RANK, device=setup.device, dtype=setup.dtype), 2.0)  # fmt: skip
        width = plan.stack.shape[0]
        rows.append(Row(f"CE-LoRA pack, ratio {_PACK_RATIO}", f"T{n_rows} O{n_cols} r_pad+k={width}",
                        _time_us(lambda: ce_pack_grad_output(dy, plan, "triton", lora=lora), setup),
                        "torch dY @ B0", _time_us(lambda: dy @ plan.b0_pad, setup),
                        setup.floor_us(n_rows * (n_cols + width) * elem)))  # fmt: skip
    return rows


# LoRA's fp32 branch on bf16 activations at the ~0.9B Llama step's rows and widths (2048: q/k/v/o inputs, down's
# output; 5632: gate/up outputs, down's input), LoRA r16
_BRANCH_SHAPES = ((8192, 2048), (8192, 5632))
_BRANCH_RANK = 16


def bench_lora_branch(setup: _Setup) -> list[Row]:
    """``kimi_hf.kernels.lora_branch``'s kernels (fp32 LoRA factors, 16-bit activations read as they are) against the
    torch sequences PEFT LoRA runs (16-bit tensors widened to fp32 copies); floor: the 16-bit tensor read (and, for
    the in-place update, written) once."""
    from kimi_hf.kernels.lora_branch import lora_down, lora_up_add_, lora_weight_grad

    elem = torch.finfo(setup.dtype).bits // 8
    rows = []
    for n_rows, width in ((48, 200), (40, 96)) if setup.tiny else _BRANCH_SHAPES:
        generator = torch.Generator().manual_seed(width)
        big = torch.randn(n_rows, width, generator=generator).to(setup.device, setup.dtype)
        y = torch.randn(n_rows, _BRANCH_RANK, generator=generator).to(setup.device)
        weight = torch.randn(_BRANCH_RANK, width, generator=generator).to(setup.device)
        shape = f"T{n_rows} N{width} r{_BRANCH_RANK}"
        ops = [  # (name, the op for a backend, passes over the 16-bit tensor)
            ("x A^T (lora_down)", lambda b: lambda: lora_down(big, weight, backend=b), 1),
            ("branch added, rounded once (lora_up_add_)",
             lambda b: lambda: lora_up_add_(big, y, weight.T, 2.0, backend=b), 2),
            ("dX branch rounded first (lora_up_add_)",
             lambda b: lambda: lora_up_add_(big, y, weight.T, round_first=True, backend=b), 2),
            ("dA = (dY s B)^T x (lora_weight_grad)", lambda b: lambda: lora_weight_grad(y, big, backend=b), 1),
        ]  # fmt: skip
        for name, op, passes in ops:
            rows.append(Row(f"LoRA fp32 branch: {name}", shape, _time_us(op("triton"), setup),
                            "PEFT's torch sequence", _time_us(op("torch"), setup),
                            setup.floor_us(passes * n_rows * width * elem)))  # fmt: skip
    return rows


_SECTIONS = {
    "conv": bench_conv,
    "norm": bench_gated_norm,
    "kda": bench_kda_decode,
    "kda_sweep": sweep_kda_block_v,
    "attn_res": bench_depth_attention,
    "attn_res_prefill": bench_two_phase,
    "attn_res_decode": bench_decode_reads,
    "traffic": bench_traffic,
    "ce_lora_pack": bench_ce_lora_pack,
    "lora_branch": bench_lora_branch,
}


def run_benchmarks(tiny: bool = False, sections: tuple[str, ...] = ("conv", "norm", "kda"),
                   bandwidth_tbs: float | None = None, gpu_time: bool = False) -> list[Row]:
    """Run the chosen sections (names of ``_SECTIONS``); tiny=True: tiny fp32 shapes, CPU interpreter works. The
    floors are at ``bandwidth_tbs`` (default: :func:`floor_bandwidth_tbs`); ``gpu_time``: every op timed by its
    kernels' GPU time (see ``--gpu-time``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise ValueError("full-size benchmarks need a CUDA GPU; use tiny=True (--tiny) for a CPU smoke run")
    bandwidth_tbs = floor_bandwidth_tbs(bandwidth_tbs)
    setup = _Setup(device, torch.float32 if device == "cpu" else torch.bfloat16, tiny, bandwidth_tbs * 1e12, gpu_time)
    unknown = [s for s in sections if s not in _SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}: expected some of {list(_SECTIONS)}")
    rows = []
    for name in sections:
        print(f"running {name} ...", flush=True)
        rows += _SECTIONS[name](setup)
    return rows


def _environment() -> str:
    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter, timings meaningless)"
    return f"{gpu}; torch {torch.__version__}, triton {triton.__version__}, fla {fla_version}"


def markdown_table(rows: list[Row], bandwidth_tbs: float, gpu_time: bool = False) -> str:
    """The rows as a markdown table (environment line first; ``gpu_time``: the rows are kernels' GPU time)."""

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f}"

    lines = [
        f"Environment: {_environment()}. "
        + ("GPU time of the kernels per call (profiler); " if gpu_time else "Medians of triton.testing.do_bench; ")
        + f"floor = minimum bytes at {bandwidth_tbs:.2f} TB/s.",
        "",
        "| op | shape | kimi_hf (us) | anchor | anchor (us) | speed-up vs anchor | floor (us) | floor / kimi_hf |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = f"{r.anchor_us / r.ours_us:.2f}x" if r.anchor_us is not None else "n/a"
        of_floor = f"{r.floor_us / r.ours_us:.0%}" if r.floor_us is not None else "n/a"
        lines.append(f"| {r.op} | {r.shape} | {num(r.ours_us)} | {r.anchor} | {num(r.anchor_us)} | {speedup} "
                     f"| {num(r.floor_us)} | {of_floor} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 shapes: a smoke run (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--sections", nargs="+", default=["conv", "norm", "kda"], choices=list(_SECTIONS),
                        help="which ops (kda_sweep: the decode kernel at each state tile width; "
                        "attn_res: the depth attention; attn_res_prefill: its two-phase inference at a block boundary; "
                        "attn_res_decode: its reads at one token; traffic: a streaming kernel at the prefill's "
                        "read/write mixes; ce_lora_pack: CE-LoRA's packing pass; lora_branch: the fp32 LoRA branch's "
                        "kernels)")
    add_bandwidth_option(parser)
    parser.add_argument("--sweep", nargs="+", default=[], metavar="MODULE.NAME=V1,V2",
                        help="run the sections once per combination of these launch constants of kimi_hf.kernels "
                        "(e.g. attn_res.fused.BWD_SOURCE_TILE=4,8); each row names its combination")  # fmt: skip
    add_set_option(parser, "attn_res.fused.BWD_SOURCE_TILE=4", "the whole run (before --sweep's)")
    parser.add_argument("--gpu-time", action="store_true",
                        help="time every op by the GPU time of its kernels (profiler; no L2 flush) instead of "
                        "do_bench's wall time: steadier on a machine whose wall times jump, for sweeps")  # fmt: skip
    args = parser.parse_args()
    apply_set_option(parser, args)
    grid, saved = {}, {}  # the values to sweep, and each constant's value to restore afterwards
    for spec in args.sweep:
        name, _, values = spec.partition("=")
        try:
            grid[name] = [int(v) for v in values.split(",")]
            saved[name] = get_launch_constant(name)
        except ValueError as exc:
            parser.error(f"--sweep takes MODULE.NAME=V1,V2 (integers), got {spec!r}: {exc}")
    bandwidth = floor_bandwidth_tbs(args.bandwidth_tbs)
    rows = []
    try:
        for values in itertools.product(*grid.values()):
            combination = [f"{name}={value}" for name, value in zip(grid, values)]
            set_launch_constants(combination)
            tag = f" [{', '.join(combination)}]" if combination else ""
            for row in run_benchmarks(args.tiny, tuple(args.sections), bandwidth, args.gpu_time):
                rows.append(dataclasses.replace(row, op=row.op + tag))
    finally:
        set_launch_constants([f"{name}={value}" for name, value in saved.items()])
    print(markdown_table(rows, bandwidth, args.gpu_time))


if __name__ == "__main__":
    main()
