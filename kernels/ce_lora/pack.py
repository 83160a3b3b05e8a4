"""Triton kernel building CE-LoRA's packed gradient ``G = [dY B0 | dY[:, S]]`` in one read of ``dY``.

Why a packing pass and not a GEMM that gathers ``dY[:, S]`` by index: the gathered dimension of
``dY[:, S] @ R[S, :]`` is the reduction dimension, along which ``dY``'s kept columns are not contiguous,
so an in-GEMM gather degrades the A-operand loads to scalar loads that cannot be pipelined as async
copies. Packing leaves a single dense GEMM ``G @ [A0 ; R[S, :]]`` whose inner size ``r_pad + k`` is a
multiple of 64 (cuBLAS's fast path).

How the pass aims at its memory floor (read ``dY`` once, write ``G`` once):

* The kept columns are written by *gathering* loads and *contiguous* stores: a program takes a tile of
  ``BLOCK_K`` consecutive kept columns, loads ``dY[rows, index[j]]`` (scattered 2-byte loads, but within a
  short span of each row, so whole cache lines are used) and stores ``G[rows, r_pad + j]`` as aligned
  vectors. (A first version did the opposite, contiguous loads and scattered stores through a position
  map, and ran ~10x off the floor on an H200: its time grew with ``k``, the bytes it stored, and not with
  the bytes of ``dY`` it read.)
* The low-rank projection ``dY B0`` runs on the same rows in the same program: before gathering kept
  tile ``t`` it consumes, with contiguous vectorised loads and a tensor-core dot, the channel range that
  ends at tile ``t``'s last kept channel (``bounds``, built with the plan). Every channel is projected
  exactly once, and the gather that follows re-reads channels this program has just loaded, so they
  come from cache rather than HBM.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .plan import BOUND_UNIT, KEPT_TILE

# Tile shapes tried on a GPU (keyed by channel count, kept count and low-rank width; the row count only
# sets the grid). Kept short: every config is compiled on a fresh machine. The interpreter runs one
# small fixed tile, so that tiny test shapes still take several loop iterations, with kept tiles of two
# sub-tiles (the general case of the projection bounds' indexing).
_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_O": bo}, num_warps=w, num_stages=s)
    for bt, bk, bo, w, s in [(64, 128, 128, 4, 3), (32, 128, 128, 4, 3), (32, 256, 128, 4, 3)]
]
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_pack_kernel(
    dy_ptr,
    b0_ptr,
    index_ptr,
    bounds_ptr,
    g_ptr,
    n_rows,
    n_cols,
    n_keep,
    stride_dy,
    stride_g,
    R_PAD: tl.constexpr,
    SUB_K: tl.constexpr,
    UNIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program: ``BLOCK_T`` rows of ``dY``, all kept tiles in order.

    dy ``[n_rows, n_cols]`` (row stride ``stride_dy``), b0 ``[n_cols, R_PAD]`` contiguous, index ``[n_keep]``
    int64 sorted, bounds ``[cdiv(n_keep, SUB_K) + 1]`` int32 channel bounds in units of ``UNIT`` (the
    channels of kept sub-tile ``s`` are projected with it: ``[UNIT * bounds[s], UNIT * bounds[s + 1])``),
    g ``[n_rows, R_PAD + n_keep]`` (row stride ``stride_g``).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2**31 elements
    dy_rows = dy_ptr + rows[:, None] * stride_dy
    g_rows = g_ptr + rows[:, None] * stride_g
    rk = tl.arange(0, R_PAD)
    n_sub = tl.cdiv(n_keep, SUB_K)
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for start in range(0, n_keep, BLOCK_K):
        first = start // SUB_K
        # bounds are stored in units of UNIT channels: multiplying back tells the compiler the channel
        # loop starts aligned, so the masked loads below stay vectorised
        lo = tl.load(bounds_ptr + first) * UNIT
        hi = tl.load(bounds_ptr + tl.minimum(first + BLOCK_K // SUB_K, n_sub)) * UNIT
        for c0 in range(lo, hi, BLOCK_O):
            cols = c0 + tl.arange(0, BLOCK_O)
            col_ok = (cols < hi) & (cols < n_cols)
            tile = tl.load(dy_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b0 = tl.load(b0_ptr + cols[:, None] * R_PAD + rk[None, :], mask=col_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(tile, b0, acc, input_precision="ieee")
            else:
                acc = tl.dot(tile, b0, acc)
        kept = start + tl.arange(0, BLOCK_K)
        kept_ok = kept < n_keep
        channels = tl.load(index_ptr + kept, mask=kept_ok, other=0)
        tile_ok = row_ok[:, None] & kept_ok[None, :]
        values = tl.load(dy_rows + channels[None, :], mask=tile_ok, other=0.0)
        tl.store(g_rows + R_PAD + kept[None, :], values, mask=tile_ok)
    tl.store(g_rows + rk[None, :], acc.to(g_ptr.dtype.element_ty), mask=row_ok[:, None])


_ce_pack_tuned = (
    _ce_pack_kernel
    if _INTERPRETED
    else triton.autotune(configs=_CONFIGS, key=["n_cols", "n_keep", "R_PAD"])(_ce_pack_kernel)
)


def triton_pack_grad_output(
    grad_output: torch.Tensor, b0_pad: torch.Tensor, index: torch.Tensor, bounds: torch.Tensor
) -> torch.Tensor:
    """``G [T, r_pad + k]`` from ``dY [T, O]`` (unit column stride), ``B0 [O, r_pad]``, ``index [k]`` int64
    sorted and ``bounds`` int32 (:func:`kimi_hf.kernels.ce_lora.plan.projection_bounds`)."""
    n_rows, n_cols = grad_output.shape
    r_pad, keep = b0_pad.shape[1], index.numel()
    packed = torch.empty(n_rows, r_pad + keep, device=grad_output.device, dtype=grad_output.dtype)
    tiles = {"BLOCK_T": 16, "BLOCK_K": 2 * KEPT_TILE, "BLOCK_O": 32} if _INTERPRETED else {}
    _ce_pack_tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_T"]),)](
        grad_output,
        b0_pad,
        index,
        bounds,
        packed,
        n_rows,
        n_cols,
        keep,
        grad_output.stride(0),
        packed.stride(0),
        R_PAD=r_pad,
        SUB_K=KEPT_TILE,
        UNIT=BOUND_UNIT,
        IEEE=grad_output.dtype == torch.float32,
        **tiles,
    )
    return packed
