"""Triton kernel building CE-LoRA's packed gradient ``G = [dY B0 | dY[:, S]]`` in one read of ``dY``.

Why a packing pass and not a GEMM that gathers ``dY[:, S]`` by index: the gathered dimension of
``dY[:, S] @ R[S, :]`` is the reduction dimension, along which ``dY``'s kept columns are not contiguous,
so an in-GEMM gather degrades the A-operand loads to scalar 2-byte loads that cannot be pipelined as
async copies. Packing reads ``dY`` once (coalesced, full rows), writes the kept columns contiguously and
computes the low-rank projection ``dY B0`` on the same tiles, so that the cost that remains is a single
dense GEMM ``G @ [A0 ; R[S, :]]`` whose inner size ``r_pad + k`` is a multiple of 64 (cuBLAS's fast path).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile shapes tried on a GPU (keyed by the channel count and low-rank width; the row count only sets the
# grid). The interpreter runs one fixed tile: autotuning there would only multiply a slow run.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_O": bo}, num_warps=w, num_stages=s)
    for bt, bo, w, s in [
        (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (32, 256, 8, 3), (128, 64, 8, 3), (16, 256, 4, 3)
    ]  # fmt: skip
]
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_pack_kernel(
    dy_ptr,
    b0_ptr,
    pos_ptr,
    g_ptr,
    n_rows,
    n_cols,
    stride_dy,
    stride_g,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program: ``BLOCK_T`` rows of ``dY``, streamed over all ``n_cols`` output channels.

    dy ``[n_rows, n_cols]`` (row stride ``stride_dy``), b0 ``[n_cols, R_PAD]`` contiguous, pos ``[n_cols]``
    int32 (destination column in ``G`` or -1), g ``[n_rows, R_PAD + k]`` (row stride ``stride_g``).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2**31 elements
    rk = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_O):
        cols = start + tl.arange(0, BLOCK_O)
        col_ok = cols < n_cols
        tile_ok = row_ok[:, None] & col_ok[None, :]
        tile = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=tile_ok, other=0.0)
        b0 = tl.load(b0_ptr + cols[:, None] * R_PAD + rk[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(tile, b0, acc, input_precision="ieee")
        else:
            acc = tl.dot(tile, b0, acc)
        pos = tl.load(pos_ptr + cols, mask=col_ok, other=-1)
        # kept channels are sorted, so each row's stores land on consecutive addresses of G
        tl.store(g_ptr + rows[:, None] * stride_g + pos[None, :], tile, mask=row_ok[:, None] & (pos >= 0)[None, :])
    tl.store(g_ptr + rows[:, None] * stride_g + rk[None, :], acc.to(g_ptr.dtype.element_ty), mask=row_ok[:, None])


_ce_pack_tuned = (
    _ce_pack_kernel if _INTERPRETED else triton.autotune(configs=_CONFIGS, key=["n_cols", "R_PAD"])(_ce_pack_kernel)
)


def triton_pack_grad_output(
    grad_output: torch.Tensor, b0_pad: torch.Tensor, pos: torch.Tensor, keep: int
) -> torch.Tensor:
    """``G [T, r_pad + keep]`` from ``dY [T, O]`` (unit column stride), ``B0 [O, r_pad]``, ``pos [O]`` int32."""
    n_rows, n_cols = grad_output.shape
    r_pad = b0_pad.shape[1]
    packed = torch.empty(n_rows, r_pad + keep, device=grad_output.device, dtype=grad_output.dtype)
    tiles = {"BLOCK_T": 32, "BLOCK_O": 64} if _INTERPRETED else {}
    _ce_pack_tuned[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_T"]),)](
        grad_output,
        b0_pad,
        pos,
        packed,
        n_rows,
        n_cols,
        grad_output.stride(0),
        packed.stride(0),
        R_PAD=r_pad,
        IEEE=grad_output.dtype == torch.float32,
        **tiles,
    )
    return packed
