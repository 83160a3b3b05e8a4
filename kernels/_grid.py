"""Helpers for the host side of kernel launches (grids, tile sizes, the GPU's SM count).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects (Triton >= 3.5): a host call
unwraps its arguments through Triton's machinery, about 2 us each, and a decode step makes hundreds of them.
"""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as Triton's)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (cached: reading the device's properties costs microseconds, on
    launches whose host cost counts)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
