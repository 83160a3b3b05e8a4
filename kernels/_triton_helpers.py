"""Triton helpers shared by the ops' kernels (jit functions only)."""

import triton
import triton.language as tl


@triton.jit
def pick_row(x, idx, r):
    """Row ``r`` of the register tile ``x`` (rows numbered by ``idx``), as a vector: a sum over the rows, which a
    thread holds whole where the tile's rows are within one thread."""
    return tl.sum(tl.where((idx == r)[:, None], x, 0.0), axis=0)
