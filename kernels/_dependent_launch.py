"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel before
it on the stream is still finishing, so the launch gap and the first wave's scheduling overlap that kernel's tail.

A kernel launched this way must call :func:`await_prior_grid` before it touches memory: it then waits until the
kernel before it has finished and its writes are visible. Since every kernel of such a sequence waits so before
anything else, a kernel past its wait knows all earlier ones finished too, and none writes memory that an earlier one
still reads (the caching allocator hands out memory in stream order).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._backend import _triton_interpreter_on


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def dependent_launch(device: torch.device) -> bool:
    """Whether to launch the next kernels on ``device`` with PDL: CUDA devices of compute capability 9 or later, not
    under Triton's interpreter and not while the stream is captured into a CUDA graph (captured, a dependent launch
    becomes a programmatic edge of the graph, which no test here has run)."""
    if device.type != "cuda" or _triton_interpreter_on():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper_or_later(index) and not torch.cuda.is_current_stream_capturing()


@triton.jit
def await_prior_grid(PDL: tl.constexpr):
    """With ``PDL``: wait for the kernel launched before this one to finish (its writes then visible), then let the
    next kernel's programs launch, to wait in turn on the SMs this grid leaves idle. Call it first, before any load or
    store."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
