"""Triton kernels of LoRA's fp32 branch on 16-bit activations, reading the 16-bit tensors as they are.

PEFT's default adapters on a bf16 model are fp32 (``autocast_adapter_dtype=True``): its LoRA widens ``x`` to an fp32
copy, widens the bf16 base output to add the fp32 branch, and in backward widens ``dY`` and casts LoRA's input
gradient back to bf16 before adding it. Each of those is a pass over a ``[T, I]`` or ``[T, O]`` tensor in fp32. These
kernels widen in registers instead: per element of the large tensors they read 2 bytes (and write 2 where they
update one in place). Sums are fp32. The in-place update's products are fp32 ones (``input_precision="ieee"``); the
two reductions over a long dimension use ``PRECISION`` (below: split TF32 products), within a few fp32 rounding steps
of PEFT's fp32 GEMMs.

* :func:`lora_down_fwd`: ``y = scale * x @ w^T`` (``x [T, N]`` 16-bit, ``w [R, N]`` fp32, ``y [T, R]`` fp32);
  LoRA's ``x A^T`` and ``dY s B``.
* :func:`lora_up_add_fwd`: ``out += scale * y @ w^T`` in place (``out [T, M]`` 16-bit, ``w [M, R]`` fp32), rounded
  once or, with ``round_first``, the branch rounded to ``out``'s dtype first; LoRA's output and input gradient.
* :func:`lora_weight_grad_fwd`: ``scale * y^T @ x`` (``[R, N]`` fp32, or ``[N, R]``), summed over ``T`` in row
  splits that write fp32 partials, then added in split order (deterministic); the gradients of ``A`` and ``B``.

Rank ``R`` tiles are ``R`` rounded up to a power of two (at least 16, ``tl.dot``'s smallest), masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2, sm_count

# Launch constants (``--set lora_branch.triton_kernels.NAME=INT``). Rows per program of the two row-parallel kernels:
# 32 keeps two programs per SM at 8K tokens on an H100's 132 SMs; columns per step of their loops.
BLOCK_T = 32
BLOCK_N = 64
BLOCK_M = 128  # output columns per program of the in-place update
WARPS = 4
STAGES = 3
# Programs per SM the weight gradient's row splits aim for (its [R, N] output alone gives only N / BLOCK_N programs)
PROGRAMS_PER_SM = 4
MIN_SPLIT_ROWS = 256  # fewer rows per split would make the partials' traffic comparable to x's
# Products of the two reductions over a long dimension: three TF32 tensor-core products per fp32 one, the fp32
# operand split in two (the 16-bit one is exact in TF32), summed in fp32; within the tests' 1e-6 of float64 on an H100.
# As fp32 products on CUDA cores ("ieee"), x A^T took 161 us at 8K x 2048 (7% of its byte floor, 0.63x PEFT's widened
# copy plus cuBLAS) against 30.5 us this way, and PEFT's fp32-adapter step 154.3 ms against 130.5 (session 51, H100).
PRECISION: tl.constexpr = tl.constexpr("tf32x3")


def _rank_block(rank: int) -> int:
    return max(16, next_power_of_2(rank))


@triton.jit
def _lora_down_kernel(
    x_ptr, w_ptr, y_ptr, n_rows, n_cols, rank, stride_x, stride_wr, stride_wn, scale,
    R_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: ``BLOCK_T`` rows of ``y [n_rows, rank]`` (contiguous), walking ``x``'s row block over ``n_cols``.

    x ``[n_rows, n_cols]`` (row stride ``stride_x``, unit column stride), w ``[rank, n_cols]`` at strides
    ``(stride_wr, stride_wn)`` (``B^T`` is a transposed view).
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2**31 elements
    rk = tl.arange(0, R_BLOCK)
    rk_ok = rk < rank
    acc = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + rk[None, :] * stride_wr, mask=col_ok[:, None] & rk_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(x.to(tl.float32), w, acc, input_precision=PRECISION)
    tl.store(y_ptr + rows[:, None] * rank + rk[None, :], acc * scale, mask=row_ok[:, None] & rk_ok[None, :])


@triton.jit
def _lora_up_add_kernel(
    out_ptr, y_ptr, w_ptr, n_rows, n_cols, rank, stride_out, stride_wm, stride_wr, scale,
    ROUND_FIRST: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One program: a ``[BLOCK_T, BLOCK_M]`` tile of ``out [n_rows, n_cols]`` (row stride ``stride_out``) updated by
    ``scale * y @ w^T``, y ``[n_rows, rank]`` contiguous, w ``[n_cols, rank]`` at strides ``(stride_wm, stride_wr)``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    rows = rows.to(tl.int64)
    rk = tl.arange(0, R_BLOCK)
    rk_ok = rk < rank
    y = tl.load(y_ptr + rows[:, None] * rank + rk[None, :], mask=row_ok[:, None] & rk_ok[None, :], other=0.0)
    w = tl.load(w_ptr + rk[:, None] * stride_wr + cols[None, :] * stride_wm, mask=rk_ok[:, None] & col_ok[None, :],
                other=0.0)  # fmt: skip
    branch = tl.dot(y, w, input_precision="ieee") * scale
    out_tile = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    out = tl.load(out_tile, mask=tile_ok, other=0.0)
    if ROUND_FIRST:
        branch = branch.to(out.dtype)
    tl.store(out_tile, (out.to(tl.float32) + branch.to(tl.float32)).to(out.dtype), mask=tile_ok)


@triton.jit
def _lora_weight_grad_kernel(
    y_ptr, x_ptr, part_ptr, n_rows, n_cols, rank, split_rows, stride_x, stride_pr, stride_pn, scale,
    R_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: columns ``BLOCK_N`` of ``scale * y^T @ x`` over one split of ``split_rows`` rows (a multiple of
    ``BLOCK_T``), stored to partial ``program_id(1)`` of ``part`` (``[splits, rank, n_cols]`` elements at strides
    ``(rank * n_cols, stride_pr, stride_pn)``). y ``[n_rows, rank]`` contiguous, x ``[n_rows, n_cols]`` (row stride
    ``stride_x``)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    split = tl.program_id(1)
    rk = tl.arange(0, R_BLOCK)
    rk_ok = rk < rank
    acc = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.float32)
    end = tl.minimum(split * split_rows + split_rows, n_rows)
    for start in range(split * split_rows, end, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        rows = rows.to(tl.int64)
        y_t = tl.load(y_ptr + rows[None, :] * rank + rk[:, None], mask=rk_ok[:, None] & row_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(y_t, x.to(tl.float32), acc, input_precision=PRECISION)
    part = part_ptr + split.to(tl.int64) * rank * n_cols + rk[:, None] * stride_pr + cols[None, :] * stride_pn
    tl.store(part, acc * scale, mask=rk_ok[:, None] & col_ok[None, :])


def lora_down_fwd(x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * x [T, N] @ weight [R, N]^T`` as fp32 ``[T, R]`` (``x`` with a unit column stride)."""
    n_rows, n_cols = x.shape
    rank = weight.shape[0]
    y = torch.empty(n_rows, rank, device=x.device, dtype=torch.float32)
    if n_rows:
        _lora_down_kernel[(cdiv(n_rows, BLOCK_T),)](
            x, weight, y, n_rows, n_cols, rank, x.stride(0), weight.stride(0), weight.stride(1), scale,
            R_BLOCK=_rank_block(rank), BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=WARPS, num_stages=STAGES,
        )  # fmt: skip
    return y


def lora_up_add_fwd(
    out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, scale: float, round_first: bool
) -> torch.Tensor:
    """``out [T, M] += scale * y [T, R] @ weight [M, R]^T`` in place (``out`` with a unit column stride, ``y``
    contiguous); returns ``out``."""
    n_rows, n_cols = out.shape
    rank = y.shape[1]
    if n_rows and n_cols:
        _lora_up_add_kernel[(cdiv(n_rows, BLOCK_T), cdiv(n_cols, BLOCK_M))](
            out, y, weight, n_rows, n_cols, rank, out.stride(0), weight.stride(0), weight.stride(1), scale,
            ROUND_FIRST=round_first, R_BLOCK=_rank_block(rank), BLOCK_T=BLOCK_T, BLOCK_M=BLOCK_M, num_warps=WARPS,
        )  # fmt: skip
    return out


def lora_weight_grad_fwd(y: torch.Tensor, x: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """``scale * y [T, R]^T @ x [T, N]`` as fp32 ``[R, N]`` (``[N, R]`` with ``transpose``); ``y`` contiguous, ``x``
    with a unit column stride."""
    n_rows, n_cols = x.shape
    rank = y.shape[1]
    if n_rows == 0 or n_cols == 0:
        return torch.zeros((n_cols, rank) if transpose else (rank, n_cols), device=x.device, dtype=torch.float32)
    col_blocks = cdiv(n_cols, BLOCK_N)
    # under the interpreter two splits where the rows allow, so that the CPU tests cover the partials' sum
    wanted = cdiv(PROGRAMS_PER_SM * sm_count(x.device), col_blocks) if x.is_cuda else 2
    splits = max(1, min(wanted, n_rows // MIN_SPLIT_ROWS))
    split_rows = BLOCK_T * cdiv(cdiv(n_rows, splits), BLOCK_T)
    splits = cdiv(n_rows, split_rows)  # every split non-empty (n_rows > 0 here)
    shape = (splits, n_cols, rank) if transpose else (splits, rank, n_cols)
    partials = torch.empty(shape, device=x.device, dtype=torch.float32)
    stride_pr, stride_pn = (1, rank) if transpose else (n_cols, 1)
    _lora_weight_grad_kernel[(col_blocks, splits)](
        y, x, partials, n_rows, n_cols, rank, split_rows, x.stride(0), stride_pr, stride_pn, scale,
        R_BLOCK=_rank_block(rank), BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    return partials[0] if splits == 1 else partials.sum(0)
