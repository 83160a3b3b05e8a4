"""Where a benchmark's GPU time goes: the torch profiler's per-kernel table, shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable

import torch


def gpu_time_table(step: Callable[[], None], title: str, iters: int = 5, top: int = 12) -> str:
    """Run ``step`` once untimed, ``iters`` times for the wall time, then ``iters`` times under the profiler; returns
    ``title``, the GPU time and the wall time per step (a wall time well above the GPU time: the host, launches or
    synchronisations, bound the step) and the ``top`` kernels by self GPU time per step (ms), one per line."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iters * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / iters / 1e3
    lines = [f"{title}: {total:.3f} ms of GPU time per step, {wall:.3f} ms wall per step (unprofiled)"]
    lines += [f"  {e.self_device_time_total / iters / 1e3:8.3f} ms  {e.key[:90]}" for e in events[:top]]
    return "\n".join(lines)
