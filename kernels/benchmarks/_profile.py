"""Where a benchmark's GPU time goes, shared by the benchmark scripts: the torch profiler's per-kernel table, the
device's copy bandwidth that the byte floors are measured against, and standard JSON for their results."""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Callable

import torch
from triton.testing import do_bench

from kimi_hf.cli import positive_float

H200_COPY_TBS = 4.27  # shared/REFERENCE.md: the floors of a CPU smoke run, whose timings mean nothing


def json_safe(value: object) -> object:
    """``value`` with NaN and infinities (a CPU run's missing timings) as None, so that ``json.dump(...,
    allow_nan=False)`` writes standard JSON (Python's default writes ``NaN``, which JSON readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def copy_bandwidth_tbs(n_bytes: int = 2**30) -> float:
    """The device's copy bandwidth (TB/s, bytes read plus written), a do_bench median of one ``n_bytes`` copy."""
    x = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * n_bytes / (do_bench(lambda: y.copy_(x)) * 1e-3) / 1e12


def add_bandwidth_option(parser: argparse.ArgumentParser) -> None:
    """``--bandwidth-tbs``: the copy bandwidth the byte floors are taken at (see :func:`floor_bandwidth_tbs`)."""
    parser.add_argument("--bandwidth-tbs", type=positive_float, metavar="TBS",
                        help="copy bandwidth for the floors, TB/s (default: a 1 GiB copy measured in this run)")


def floor_bandwidth_tbs(given: float | None = None) -> float:
    """The copy bandwidth (TB/s) the floors are taken at: ``given``, else measured on the GPU, else (CPU) the H200's."""
    if given is not None:
        return given
    return copy_bandwidth_tbs() if torch.cuda.is_available() else H200_COPY_TBS


def _profile_calls(fn: Callable[[], object], calls: int, host: bool = False) -> list:
    """The profiler's per-name averages over ``calls`` calls of ``fn`` (kernels; with ``host`` also CPU operators)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_times_us(fn: Callable[[], object], calls: int = 20) -> dict[str, float]:
    """GPU time per call of each of ``fn()``'s kernels (name -> microseconds), from ``calls`` profiled calls after one
    untimed call."""
    fn()
    torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / calls for e in _profile_calls(fn, calls) if e.self_device_time_total}


def kernel_time_us(fn: Callable[[], object], calls: int = 20) -> float:
    """GPU time of ``fn()``'s kernels per call in microseconds (the sum of their durations over ``calls`` profiled
    calls, after one untimed call): what an op costs the GPU when its eager call is bound by the host."""
    return sum(kernel_times_us(fn, calls).values())


def gpu_time_table(step: Callable[[], None], title: str, iters: int = 5, top: int = 12, host_top: int = 0) -> str:
    """Run ``step`` once untimed, ``iters`` times for the wall time, then ``iters`` times under the profiler; returns
    ``title``, the GPU time and the wall time per step (a wall time well above the GPU time: the host, launches or
    synchronisations, bound the step) and the ``top`` kernels by self GPU time per step (ms), one per line.
    ``host_top`` > 0 also profiles the host and lists that many operators by self CPU time per step (what to cut
    when the step is host-bound; the profiler's own overhead inflates these times, not their order)."""
    from torch.autograd import DeviceType

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iters * 1e3
    averages = _profile_calls(step, iters, host=bool(host_top))
    # Kernels only: with the host profiled too, each operator also reports its kernels' time as its own.
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    events = sorted(kernels, key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / iters / 1e3
    lines = [f"{title}: {total:.3f} ms of GPU time per step, {wall:.3f} ms wall per step (unprofiled)"]
    lines += [f"  {e.self_device_time_total / iters / 1e3:8.3f} ms  {e.key[:90]}" for e in events[:top]]
    if host_top:
        host = sorted((e for e in averages if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
        total_host = sum(e.self_cpu_time_total for e in host) / iters / 1e3
        lines.append(f"host: {total_host:.3f} ms of profiled CPU time per step; top operators by self CPU time:")
        lines += [
            f"  {e.self_cpu_time_total / iters / 1e3:8.3f} ms  {e.count // iters:6d} calls  {e.key[:80]}"
            for e in host[:host_top]
        ]
        # inclusive times name the autograd nodes (``evaluate_function: <node>``) whose backward costs the most host
        lines.append("host: top operators by total CPU time (their callees included):")
        lines += [
            f"  {e.cpu_time_total / iters / 1e3:8.3f} ms  {e.count // iters:6d} calls  {e.key[:80]}"
            for e in sorted(host, key=lambda e: -e.cpu_time_total)[:host_top]
        ]
        lines += python_time_lines(step, host_top)
        lines += sync_lines(step)
    return "\n".join(lines)


def sync_lines(step: Callable[[], None]) -> list[str]:
    """The torch calls in one ``step`` that synchronise the host with the GPU (torch.cuda's sync debug mode), by the
    Python line that made them, with counts: a step with any has a wall time above both its host and GPU times."""
    with warnings.catch_warnings(record=True) as caught, torch.autograd.set_multithreading_enabled(False):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for warning in caught:
        if "synchroniz" in str(warning.message):  # torch: "called a synchronizing CUDA operation"
            where = f"{'/'.join(warning.filename.split('/')[-2:])}:{warning.lineno}"
            counts[where] = counts.get(where, 0) + 1
    lines = [f"sync: {sum(counts.values())} synchronising torch calls in one step"]
    return lines + [f"  {count:6d} x {where}" for where, count in sorted(counts.items(), key=lambda item: -item[1])]


def python_time_lines(step: Callable[[], None], top: int) -> list[str]:
    """One call of ``step`` under cProfile: the ``top`` Python functions by own time (where a host-bound step's time
    goes between the operators: launchers, argument checks, module calls; cProfile's overhead inflates the times)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    # backward on this thread: cProfile sees only the thread that enabled it, and CUDA backward nodes (Python autograd
    # Functions' backward among them) run on the autograd engine's device thread otherwise
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        step()
        torch.cuda.synchronize()
        profiler.disable()
    # {(file, line, name): (primitive calls, calls, own time, cumulative time, callers)}
    stats = pstats.Stats(profiler).stats
    total = sum(value[2] for value in stats.values()) * 1e3
    lines = [f"python: {total:.3f} ms of own time in one step (cProfile)"]
    for order, column in (("own time", 2), ("cumulative time", 3)):
        lines.append(f"python: top functions by {order}:")
        rows = sorted(stats.items(), key=lambda item: -item[1][column])[:top]
        for (path, line, name), (_, calls, own, cumulative, _) in rows:
            where = f"{'/'.join(path.split('/')[-2:])}:{line}({name})"
            lines.append(f"  {own * 1e3:8.3f} ms own {cumulative * 1e3:9.3f} ms cumul. {calls:6d} calls  {where[:88]}")
    return lines
