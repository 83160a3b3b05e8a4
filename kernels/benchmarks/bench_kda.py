"""Benchmark kimi_hf's KDA kernels against fla 0.6.0 (same run, same inputs) and the torch reference.

Chunked KDA (``chunk_kda``): forward and forward+backward at B1 T8192, B1 T32768, B8 T4096 (H32,
D128, bf16 q/k/v/beta, fp32 gate precomputed as fla does, L2 norm of q/k inside the op). The plain
torch reference is timed only at the first shape, forward only (it is slow). Decode
(``fused_recurrent_kda``, one token) at B1 and B64 next to the state-bytes floor
(read + write the fp32 state: 2 * N * H * K * V * 4 bytes at the device's copy bandwidth, measured in the run
unless --bandwidth-tbs gives it).
Every time is a ``triton.testing.do_bench`` median in milliseconds.

    python kernels/benchmarks/bench_kda.py [--json results.json] [--quick]
    python kernels/benchmarks/bench_kda.py --sweep PAIRS_KEY_BLOCK=16,32,64 FLAGGED_WARPS=2,4,8

``--sweep`` times ours alone at one shape (``--sweep-shape``, default the first) for every combination of the
given launch constants of ``kimi_hf.kernels.kda.chunk`` (tile sizes, warps, candidate paths), and checks each
against the first combination.

For a combined run: ``from bench_kda import run_benchmarks, markdown_table``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Callable

import torch
import triton
from triton.testing import do_bench

from _profile import (
    add_bandwidth_option, floor_bandwidth_tbs, gpu_time_table, json_safe, kernel_time_us, kernel_times_us,
)

from kimi_hf.kernels._launch import add_set_option, apply_set_option
from kimi_hf.kernels.kda import chunk, chunk_kda, fused_recurrent_kda

CHUNK_SHAPES = ((1, 8192), (1, 32768), (8, 4096))
DECODE_BATCHES = (1, 64)


def _fla():
    """fla's chunk_kda / fused_recurrent_kda, or (None, None) when fla is not installed."""
    try:
        from fla.ops.kda import chunk_kda as fla_chunk, fused_recurrent_kda as fla_recurrent
    except ImportError:
        return None, None
    return fla_chunk, fla_recurrent


def _chunk_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, grad: bool) -> dict:
    rand = lambda *s, dt=dtype: torch.randn(*s, device="cuda", dtype=dt).requires_grad_(grad)  # noqa: E731
    g = (-torch.rand(B, T, H, D, device="cuda") * 2).requires_grad_(grad)
    beta = torch.rand(B, T, H, device="cuda", dtype=dtype).requires_grad_(grad)
    return dict(q=rand(B, T, H, D), k=rand(B, T, H, D), v=rand(B, T, H, D), g=g, beta=beta)


def _step(fn: Callable, inputs: dict, backward: bool, **kw) -> Callable[[], None]:
    if not backward:
        return lambda: fn(**inputs, **kw)
    do = torch.randn_like(inputs["v"])

    def run():
        o = fn(**inputs, **kw)[0]
        o.backward(do)

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (NaN anywhere gives NaN)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def parity_with_fla(inputs: dict, fla_chunk: Callable) -> dict[str, float]:
    """Relative differences of ours vs fla (same bf16 inputs): the output and every input gradient."""
    do = torch.randn_like(inputs["v"])
    results = []
    for fn in (chunk_kda, fla_chunk):
        leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
        o = fn(**leaves, use_qk_l2norm_in_kernel=True)[0]
        o.backward(do)
        results.append({"o": o.detach(), **{f"d{n}": x.grad for n, x in leaves.items()}})
    ours, anchor = results
    return {name: _rel(ours[name], anchor[name]) for name in anchor}


def bench_chunk(B: int, T: int, H: int = 32, D: int = 128) -> list[dict]:
    """Rows for one chunked shape: ours and fla, fwd and fwd+bwd; the fwd+bwd row also carries the
    relative difference of ours vs fla (output and input gradients) on those inputs."""
    fla_chunk, _ = _fla()
    rows = []
    for backward in (False, True):
        inputs = _chunk_inputs(B, T, H, D, torch.bfloat16, backward)
        grads = list(inputs.values()) if backward else None
        ours = do_bench(_step(chunk_kda, inputs, backward, use_qk_l2norm_in_kernel=True), grad_to_none=grads)
        anchor = None
        if fla_chunk is not None:
            anchor = do_bench(_step(fla_chunk, inputs, backward, use_qk_l2norm_in_kernel=True), grad_to_none=grads)
        rows.append(dict(op="chunk_kda " + ("fwd+bwd" if backward else "fwd"), shape=f"B{B} T{T} H{H} D{D}",
                         ours_ms=ours, fla_ms=anchor, floor_ms=None))  # fmt: skip
        if backward and fla_chunk is not None:
            rows[-1]["rel_diff_vs_fla"] = parity_with_fla(inputs, fla_chunk)
        del inputs, grads
        torch.cuda.empty_cache()
    return rows


def bench_torch_reference(B: int, T: int, H: int = 32, D: int = 128) -> list[dict]:
    """The plain-torch chunked reference (our CPU path), forward only, on the GPU."""
    inputs = _chunk_inputs(B, T, H, D, torch.bfloat16, False)
    ref = do_bench(_step(chunk_kda, inputs, False, use_qk_l2norm_in_kernel=True, backend="torch"), warmup=1, rep=1)
    return [dict(op="chunk_kda fwd, torch reference", shape=f"B{B} T{T} H{H} D{D}", ours_ms=ref, fla_ms=None,
                 floor_ms=None)]  # fmt: skip


def bench_decode(B: int, bandwidth_tbs: float, H: int = 32, D: int = 128) -> dict:
    """One decode step (T = 1) with an fp32 state updated in place; its floor moves the state at ``bandwidth_tbs``."""
    _, fla_recurrent = _fla()
    inputs = _chunk_inputs(B, 1, H, D, torch.bfloat16, False)
    state = torch.randn(B, H, D, D, device="cuda")
    ours = do_bench(lambda: fused_recurrent_kda(**inputs, initial_state=state, inplace_final_state=True,
                                                use_qk_l2norm_in_kernel=True))  # fmt: skip
    anchor = None
    if fla_recurrent is not None:
        anchor = do_bench(lambda: fla_recurrent(**inputs, initial_state=state, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True))  # fmt: skip
    floor = 2 * B * H * D * D * 4 / (bandwidth_tbs * 1e12) * 1e3
    return dict(op="fused_recurrent_kda decode", shape=f"B{B} T1 H{H} D{D}", ours_ms=ours, fla_ms=anchor,
                floor_ms=floor)  # fmt: skip


def kernel_breakdown(bandwidth_tbs: float, H: int = 32, D: int = 128) -> str:
    """Per-kernel GPU time (ours and fla), from the torch profiler: one fwd+bwd at the first chunked shape, and one
    inference forward (no input needs a gradient) at every chunked shape, with the last one's bytes against its GPU
    time (:func:`traffic_table`)."""
    fla_chunk, _ = _fla()
    tables = []
    for (B, T), backward in ((CHUNK_SHAPES[0], True), *((shape, False) for shape in CHUNK_SHAPES)):
        inputs = _chunk_inputs(B, T, H, D, torch.bfloat16, backward)
        title = f"{'fwd+bwd' if backward else 'fwd'} B{B} T{T} H{H} D{D}"
        tables += [
            gpu_time_table(_step(fn, inputs, backward, use_qk_l2norm_in_kernel=True), f"{name}: {title}")
            for name, fn in (("ours", chunk_kda), ("fla", fla_chunk))
            if fn is not None
        ]
    tables.append(traffic_table(*CHUNK_SHAPES[-1], bandwidth_tbs, H, D))
    return "\n".join(tables)


def forward_bytes(K: int, V: int) -> dict[str, int]:
    """Bytes that each kernel of our inference forward reads or writes per (token, head), as ``bench_chunk`` calls it
    (bf16 q/k/v/beta, fp32 g, L2 norm inside): every tensor a kernel touches counted once (a chunk's rows re-read
    from the caches are not counted), fp32 G and P, the chunk-start state h ``[K, V]`` bf16 shared by a chunk's
    tokens. Summed over the B T H (token, head) pairs, it is the least memory traffic of this decomposition."""
    e, f = 2, 4  # bytes of bf16 and fp32
    bt = chunk.CHUNK
    inverse, wu, norms = (int(level) for level in chunk._fuse_levels())
    qkG = (2 * e + f) * K  # q, k, G in
    wu_own = e * V + 3 * e * K + e * V  # what W/U alone moves: v in; W, qg, kh, U out
    state = e * K * V // bt
    return {
        "kda_prep_fwd_kernel": 2 * f * K + (1 - norms) * 4 * e * K,  # g in, G out; without norms q, k in, qn, kn out
        # q, k, G in; A_qk out; P out unless the kernel computes M, M unless it does W/U's work (else only the
        # backward reads them); with the inverse beta in; with W/U its own traffic (q, k, G re-read from the caches)
        "kda_chunk_dots_fwd_kernel": qkG + e * bt + (1 - inverse) * f * bt + inverse * e + (inverse - wu) * e * bt
        + wu * wu_own,
        # the flags only, where the chunk dots kernel took every chunk
        "kda_flagged_fwd_kernel": 0,
        "kda_state_fwd_kernel": 2 * e * K + e * V + e * V + state,  # kh, W, U in; v_new, h out
        "kda_output_fwd_kernel": e * K + e * bt + state + e * V + e * V,  # qg, A_qk, h, v_new in; o out
    } | ({} if inverse else {"kda_inverse_fwd_kernel": f * bt + e + e * bt}) | (  # P, beta in; M out
        {} if wu else {"kda_wu_fwd_kernel": qkG + e * bt + e + wu_own}  # q, k, G, M, beta and its own traffic
    )


def traffic_table(B: int, T: int, bandwidth_tbs: float, H: int = 32, D: int = 128) -> str:
    """Our inference forward's kernels against their byte floor (:func:`forward_bytes`) at the device's copy
    bandwidth ``bandwidth_tbs``: GPU time, bytes, achieved bandwidth; and what the 1.2x target against fla's GPU
    time at this shape asks of the whole forward."""
    fla_chunk, _ = _fla()
    inputs = _chunk_inputs(B, T, H, D, torch.bfloat16, grad=False)
    times = kernel_times_us(_step(chunk_kda, inputs, False, use_qk_l2norm_in_kernel=True))
    pairs = B * T * H
    lines = [f"ours, fwd B{B} T{T} H{H} D{D}: bytes against GPU time (device copy bandwidth {bandwidth_tbs:.2f} TB/s)",
             "| kernel | ms | GB | TB/s | floor ms | time / floor |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    total_ms = total_gb = 0.0
    for name, per_pair in forward_bytes(D, D).items():
        ms = sum(us for key, us in times.items() if key.startswith(name)) / 1e3
        if ms == 0:
            raise RuntimeError(f"{name} is not among the profiled kernels {sorted(times)}: forward_bytes is stale")
        gb = per_pair * pairs / 1e9
        floor = gb / bandwidth_tbs
        total_ms, total_gb = total_ms + ms, total_gb + gb
        ratio = f"{ms / floor:.2f}" if floor else "-"  # (the flagged kernel's flag reads count as no bytes)
        lines.append(f"| {name} | {ms:.3f} | {gb:.2f} | {gb / ms:.2f} | {floor:.3f} | {ratio} |")
    floor = total_gb / bandwidth_tbs
    lines.append(f"| all of the above | {total_ms:.3f} | {total_gb:.2f} | {total_gb / total_ms:.2f} | {floor:.3f} "
                 f"| {total_ms / floor:.2f} |")
    other = sum(times.values()) / 1e3 - total_ms
    lines.append(f"other kernels (copies, indices): {other:.3f} ms")
    if fla_chunk is not None:
        target = kernel_time_us(_step(fla_chunk, inputs, False, use_qk_l2norm_in_kernel=True)) / 1e3 / 1.2
        needed = total_gb / (target - other)
        lines.append(f"1.2x fla's GPU time: {target:.3f} ms for all of ours, i.e. {needed:.2f} TB/s over the kernels "
                     f"above ({needed / bandwidth_tbs:.0%} of the copy bandwidth)")
    return "\n".join(lines)


def run_benchmarks(
    bandwidth_tbs: float, quick: bool = False, report: Callable[[dict], None] | None = None
) -> list[dict]:
    """All rows (``quick``: only the first chunked shape and B1 decode); ``report`` sees each row as
    it is measured. Order: first chunked shape, decode, the other shapes, the torch reference last."""
    rows: list[dict] = []

    def add(new: list[dict]) -> None:
        rows.extend(new)
        for row in new:
            if report is not None:
                report(row)

    shapes = CHUNK_SHAPES[:1] if quick else CHUNK_SHAPES
    add(bench_chunk(*shapes[0]))
    for B in DECODE_BATCHES[:1] if quick else DECODE_BATCHES:
        add([bench_decode(B, bandwidth_tbs)])
    for B, T in shapes[1:]:
        add(bench_chunk(B, T))
    add(bench_torch_reference(*shapes[0]))
    return rows


# A sweep's combinations must reproduce the first one's output and input gradients to this relative difference
# (bf16; the candidates change summation orders and take some products in tf32) to be picked as the fastest.
SWEEP_MAX_DIFF = 5e-3


def _parse_sweep(specs: list[str]) -> dict[str, list[int]]:
    """``["NAME=1,2", ...]`` -> ``{"NAME": [1, 2]}`` for integer launch constants of ``chunk``."""
    grid = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        if not isinstance(getattr(chunk, name, None), int) or not values:
            raise ValueError(f"--sweep takes NAME=v1,v2 with NAME an integer constant of kda.chunk, got {spec!r}")
        grid[name] = [int(v) for v in values.split(",")]
    return grid


def sweep_launch_constants(
    grid: dict[str, list[int]],
    B: int = 1,
    T: int = 8192,
    H: int = 32,
    D: int = 128,
    best_by: str = "fwd+bwd",
    best_to: str | None = None,
) -> list[str]:
    """Print fwd and fwd+bwd times of ours for every combination in ``grid`` (constants restored after),
    with the largest relative difference of the output and input gradients against the first combination. The fwd
    time is an inference forward (no input needs a gradient), as in :func:`bench_chunk`'s fwd rows.

    Returns the fastest combination by ``best_by`` ("fwd" or "fwd+bwd") among those within ``SWEEP_MAX_DIFF`` of
    the first, as ``--set`` specs (``kda.chunk.NAME=V``), also written to ``best_to`` each time it changes (so that
    a sweep cut short by its time limit leaves the best it found)."""
    saved = {name: getattr(chunk, name) for name in grid}
    inputs = _chunk_inputs(B, T, H, D, torch.bfloat16, True)
    grads = list(inputs.values())
    fwd_inputs = {name: x.detach() for name, x in inputs.items()}
    do = torch.randn_like(inputs["v"])
    first = best = None
    print(f"ours at B{B} T{T} H{H} D{D} bf16, {torch.cuda.get_device_name()}, triton {triton.__version__}\n")
    print("| " + " | ".join(grid) + " | fwd (ms) | fwd+bwd (ms) | diff vs first |")
    print("| --- " * (len(grid) + 3) + "|")
    try:
        for values in itertools.product(*grid.values()):
            for name, value in zip(grid, values):
                setattr(chunk, name, value)
            for t in grads:
                t.grad = None
            o = chunk_kda(**inputs, use_qk_l2norm_in_kernel=True)[0]
            o.backward(do)
            # Copies: .float() of an fp32 tensor is the tensor itself, and do_bench's first call below
            # accumulates into the existing .grad in place.
            result = [o.detach().float().clone()] + [t.grad.float().clone() for t in grads]
            first = first or result
            diff = max(_rel(a, b) for a, b in zip(result, first))
            fwd = do_bench(_step(chunk_kda, fwd_inputs, False, use_qk_l2norm_in_kernel=True))
            both = do_bench(_step(chunk_kda, inputs, True, use_qk_l2norm_in_kernel=True), grad_to_none=grads)
            cells = " | ".join(str(v) for v in values)
            print(f"| {cells} | {fwd:.3f} | {both:.3f} | {diff:.1e} |", flush=True)
            key = fwd if best_by == "fwd" else both
            if diff <= SWEEP_MAX_DIFF and (best is None or key < best[0]):  # NaN never compares true
                best = (key, [f"kda.chunk.{name}={value}" for name, value in zip(grid, values)])
                if best_to:
                    with open(best_to, "w") as f:
                        f.write(" ".join(best[1]) + "\n")
    finally:
        for name, value in saved.items():
            setattr(chunk, name, value)
    if best is None:
        raise RuntimeError("no combination of the sweep matched the first one's results")
    print(f"\nfastest by {best_by} within {SWEEP_MAX_DIFF:.0e} of the first: {' '.join(best[1])}")
    return best[1]


def environment() -> dict:
    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, fla=fla_version)


def markdown_table(rows: list[dict], env: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [
        f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, fla {env['fla']}; "
        f"bf16, do_bench median ms; floors at {env['copy_bandwidth_tbs']:.2f} TB/s; "
        "ratio = fla / ours (> 1: ours faster); diff vs fla = largest relative difference over o and the input grads",
        "",
        *([f"Launch constants set: {env['launch_constants']}", ""] if env.get("launch_constants") else []),
        "| op | shape | ours (ms) | fla 0.6.0 (ms) | ratio vs fla | floor (ms) | diff vs fla |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "-" if r["fla_ms"] is None else f"{r['fla_ms'] / r['ours_ms']:.2f}x"
        diff = max(r["rel_diff_vs_fla"].values()) if "rel_diff_vs_fla" in r else None
        lines.append(f"| {r['op']} | {r['shape']} | {fmt(r['ours_ms'])} | {fmt(r['fla_ms'])} | {ratio} | "
                     f"{fmt(r['floor_ms'])} | {'-' if diff is None else f'{diff:.1e}'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the rows and environment as JSON")
    p.add_argument("--quick", action="store_true", help="first chunked shape and B1 decode only")
    add_bandwidth_option(p)
    p.add_argument("--profile", action="store_true", help="first print the per-kernel GPU time of ours and fla")
    p.add_argument("--sweep", nargs="+", metavar="NAME=V1,V2",
                   help="only time ours over combinations of kda.chunk's launch constants (e.g. NUM_WARPS=4,8)")
    p.add_argument("--sweep-shape", default="1x8192", metavar="BxT",
                   help="with --sweep: batch and sequence length to time at (default 1x8192)")
    p.add_argument("--best-by", choices=("fwd", "fwd+bwd"), default="fwd+bwd",
                   help="with --sweep: the time that picks the fastest combination (default fwd+bwd)")
    p.add_argument("--best-to", metavar="PATH",
                   help="with --sweep: write the fastest combination as --set specs, for a later --set-file")
    add_set_option(p, "kda.chunk.FLAGGED_WARPS=2")
    args = p.parse_args(argv)
    grid = _parse_sweep(args.sweep) if args.sweep else None
    overrides = apply_set_option(p, args)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if grid:
        B, _, T = args.sweep_shape.partition("x")
        if not (B.isdigit() and T.isdigit()):
            p.error(f"--sweep-shape takes BxT, e.g. 8x4096, got {args.sweep_shape!r}")
        sweep_launch_constants(grid, B=int(B), T=int(T), best_by=args.best_by, best_to=args.best_to)
        return []
    bandwidth = floor_bandwidth_tbs(args.bandwidth_tbs)
    env = dict(environment(), launch_constants=overrides, copy_bandwidth_tbs=bandwidth)
    if args.profile:
        print(kernel_breakdown(bandwidth), flush=True)
    rows = run_benchmarks(bandwidth, quick=args.quick, report=lambda r: print(r, flush=True))
    print(markdown_table(rows, env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe(dict(environment=env, rows=rows)), f, indent=2, allow_nan=False)
    return rows


if __name__ == "__main__":
    main()
