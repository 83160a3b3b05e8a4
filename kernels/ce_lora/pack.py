"""Triton kernel building CE-LoRA's packed gradient ``G = [dY B0 | dY[:, S]]`` in one read of ``dY``.

Why a packing pass and not a GEMM that gathers ``dY[:, S]`` by index: the gathered dimension of
``dY[:, S] @ R[S, :]`` is the reduction dimension, along which ``dY``'s kept columns are not contiguous,
so an in-GEMM gather degrades the A-operand loads to scalar loads that cannot be pipelined as async
copies. Packing leaves a single dense GEMM ``G @ [A0 ; R[S, :]]`` whose inner size ``r_pad + k`` is a
multiple of 64 (cuBLAS's fast path).

How the pass aims at its memory floor (read ``dY`` once, write ``G`` once): a program owns ``BLOCK_T`` rows
and walks their channels in tiles of ``BLOCK_O`` with plain contiguous loads (the same loop as a GEMM's, so
Triton pipelines them as async copies). Each tile feeds the tensor-core dot of ``dY B0`` and, from registers,
the kept columns: ``tl.gather`` picks the tile's kept channels (the plan's per-tile map, :func:`~.plan.
channel_tiles`) into the leading slots and one contiguous masked store writes them to their place in ``G``.
(Two earlier designs gathered the kept columns from memory, scattered 2-byte loads after the projection's
loads: 20-36% of the floor on an H200. Storing the tile's kept columns straight through a per-channel slot map,
scattered masked stores, ran at 9-15%; this one at 33-39%.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile shapes tried on a GPU (keyed by channel count, kept count and low-rank width; the row count only sets the
# grid). Kept short: every config is compiled on a fresh machine. Rows per program trade B0's reuse (each row block
# re-reads its [BLOCK_O, R_PAD] tiles from L2: at 16 rows they outweigh dY's) against programs per SM; at 16K tokens
# the autotuner picked 64 rows at 8 warps for every layer shape of the benchmark.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
    for bt, w, s in [(16, 4, 4), (32, 4, 3), (32, 8, 3), (64, 8, 3)]
]
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ``G``'s layout in memory (``--set ce_lora.pack.COLUMN_MAJOR=0|1``). Row-major, a tile's kept columns go to
# ``G[rows, first : first + count]`` at an arbitrary column ``first``: no vector store can be proven aligned, and
# each thread stores its values two bytes at a time (32 scalar stores per tile at 64 rows, 8 warps; sm_90 PTX).
# Column-major (``G^T`` in memory, rows padded to a multiple of 8), each kept channel is a contiguous run of the
# program's rows: 16-byte stores. The GEMM takes ``G`` as its transposed view; cuBLAS reads either layout.
COLUMN_MAJOR = 1


@triton.jit
def _ce_pack_kernel(
    dy_ptr,
    b0_ptr,
    starts_ptr,
    local_ptr,
    g_ptr,
    n_rows,
    n_cols,
    n_keep,
    stride_dy,
    stride_g,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    IEEE: tl.constexpr,
    COL_MAJOR: tl.constexpr,
):
    """One program: ``BLOCK_T`` rows of ``dY``, all channel tiles in order.

    dy ``[n_rows, n_cols]`` (row stride ``stride_dy``), b0 ``[n_cols, R_PAD]`` contiguous, starts
    ``[cdiv(n_cols, BLOCK_O) + 1]`` and local ``[cdiv(n_cols, BLOCK_O), BLOCK_O]`` int32 (the plan's kept-column
    map), g ``[n_rows, R_PAD + n_keep]``: element (t, c) at ``t * stride_g + c``, or with COL_MAJOR at
    ``c * stride_g + t``; ``n_keep`` only keys the autotuner.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2**31 elements
    dy_rows = dy_ptr + rows[:, None] * stride_dy
    if COL_MAJOR:
        g_row, g_col = rows[:, None], stride_g
    else:
        g_row, g_col = rows[:, None] * stride_g, 1
    rk = tl.arange(0, R_PAD)
    slots = tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for tile in range(0, tl.cdiv(n_cols, BLOCK_O)):
        cols = tile * BLOCK_O + slots
        col_ok = cols < n_cols
        values = tl.load(dy_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b0 = tl.load(b0_ptr + cols[:, None] * R_PAD + rk[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(values, b0, acc, input_precision="ieee")
        else:
            acc = tl.dot(values, b0, acc)
        first = tl.load(starts_ptr + tile)
        count = tl.load(starts_ptr + tile + 1) - first
        local = tl.load(local_ptr + tile * BLOCK_O + slots)
        kept = tl.gather(values, tl.broadcast_to(local[None, :], (BLOCK_T, BLOCK_O)), axis=1)
        g_kept = g_ptr + g_row + (R_PAD + first + slots[None, :]).to(tl.int64) * g_col
        tl.store(g_kept, kept, mask=row_ok[:, None] & (slots < count)[None, :])
    tl.store(g_ptr + g_row + rk[None, :] * g_col, acc.to(g_ptr.dtype.element_ty), mask=row_ok[:, None])


_ce_pack_tuned = triton.autotune(configs=_CONFIGS, key=["n_cols", "n_keep", "R_PAD", "BLOCK_O", "COL_MAJOR"])(
    _ce_pack_kernel
)
# The autotuner's pick per layer shape, launched directly afterwards: the autotuner's per-call bookkeeping doubled
# the host cost of a launch on the H200's host (69.7 against 27.5 us), and a LoRA training step is near host-bound.
_PICKED: dict[tuple, triton.Config] = {}


def triton_pack_grad_output(
    grad_output: torch.Tensor,
    b0_pad: torch.Tensor,
    keep: int,
    tile_starts: torch.Tensor,
    tile_local: torch.Tensor,
) -> torch.Tensor:
    """``G [T, r_pad + keep]`` from ``dY [T, O]`` (unit column stride), ``B0 [O, r_pad]`` and the kept-column map
    ``tile_starts``/``tile_local`` of :func:`kimi_hf.kernels.ce_lora.plan.channel_tiles`. With ``COLUMN_MAJOR``
    the result is the transposed view of a ``[r_pad + keep, T rounded up to 8]`` buffer."""
    n_rows, n_cols = grad_output.shape
    r_pad, block_o = b0_pad.shape[1], tile_local.shape[1]
    options = {"device": grad_output.device, "dtype": grad_output.dtype}
    if COLUMN_MAJOR:
        buffer = torch.empty(r_pad + keep, -(-n_rows // 8) * 8, **options)
        packed, stride = buffer[:, :n_rows].T, buffer.stride(0)
    else:
        packed = torch.empty(n_rows, r_pad + keep, **options)
        stride = packed.stride(0)
    args = (grad_output, b0_pad, tile_starts, tile_local, packed, n_rows, n_cols, keep, grad_output.stride(0), stride)
    meta = {"R_PAD": r_pad, "BLOCK_O": block_o, "IEEE": grad_output.dtype == torch.float32, "COL_MAJOR": COLUMN_MAJOR}
    if _INTERPRETED:  # one small tile, so that tiny test shapes still take several row blocks
        _ce_pack_kernel[(triton.cdiv(n_rows, 16),)](*args, BLOCK_T=16, **meta)
        return packed
    key = (n_cols, keep, r_pad, block_o, grad_output.dtype, b0_pad.dtype, COLUMN_MAJOR)
    config = _PICKED.get(key)
    if config is None:
        _ce_pack_tuned[lambda m: (triton.cdiv(n_rows, m["BLOCK_T"]),)](*args, **meta)
        _PICKED[key] = _ce_pack_tuned.best_config
    else:
        _ce_pack_kernel[(triton.cdiv(n_rows, config.kwargs["BLOCK_T"]),)](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return packed
