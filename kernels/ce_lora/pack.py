"""Triton kernel building CE-LoRA's packed gradient ``G = [dY B0 | dY[:, S]]`` in one read of ``dY``.

Why a packing pass and not a GEMM that gathers ``dY[:, S]`` by index: the gathered dimension of
``dY[:, S] @ R[S, :]`` is the reduction dimension, along which ``dY``'s kept columns are not contiguous,
so an in-GEMM gather degrades the A-operand loads to scalar loads that cannot be pipelined as async
copies. Packing leaves a single dense GEMM ``G @ [A0 ; R[S, :]]`` whose inner size ``r_pad + k`` is a
multiple of 64 (cuBLAS's fast path).

How the pass aims at its memory floor (read ``dY`` once, write ``G`` once): a program owns ``BLOCK_T`` rows
and a share of their channel tiles of ``BLOCK_O``, walked with plain contiguous loads (the same loop as a GEMM's, so
Triton pipelines them as async copies). Each tile feeds the tensor-core dot of ``dY B0`` and is stored whole through
the plan's per-channel slots (:func:`~.plan.channel_slots`: a kept channel's column of ``G``, -1 elsewhere), masked
per channel. ``G`` is column-major in memory (``G^T``, rows padded to a multiple of 8), so each kept channel is a
contiguous run of the program's rows: Triton transposes the tile through shared memory and stores 16 bytes at a time.
The GEMM takes ``G`` as its transposed view (cuBLAS reads either layout). When there are too few row blocks to fill
the GPU, their channel tiles are shared between programs and the last program of a row block sums the partial
``dY B0`` products.
(Earlier designs on an H200: gathering the kept columns from memory, scattered 2-byte loads after the projection's
loads, 20-36% of the floor; storing through the slots into a row-major ``G``, two bytes at a time, 9-15%; picking a
tile's kept columns into leading slots with ``tl.gather`` (warp shuffles: 129 SHFL per tile at 64 rows and 8 warps,
110 registers against this kernel's 64 on sm_90) and storing them column-major, 4.55 ms of GPU time per ~0.9B Llama
training step against this kernel's 3.70 (session 48); a tensor-core product with a one-hot matrix in place of
``tl.gather``, 2-7% slower still (session 14).)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._grid import cdiv, next_power_of_2, sm_count

# Tile shapes tried on a GPU (keyed by channel count, kept count, low-rank width and the row count's power-of-two
# bucket). Kept short: every config is compiled on a fresh machine. Rows per program trade B0's reuse (each row block
# re-reads its [BLOCK_O, R_PAD] tiles from L2) against programs per SM. Session 48 (H200) timed 16 to 128 rows at 4 to
# 16 warps: the autotuner picked 32 rows at 4 or 8 warps at the ~0.9B Llama step's 8K tokens and at 16K x 4096, 64
# rows at 8 warps at the GPU tests' 2K tokens; 16 and 128 rows never won and are not tried. Channel tiles of 64 beat
# 128 at the step's 1024-5632 channels by 5-10% (32 rows, 4 warps) and lost by 10% at 16K x 4096: both are tried.
_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_O": bo}, num_warps=w, num_stages=3)
    for bt, bo, w in [(32, 128, 4), (32, 128, 8), (64, 128, 4), (64, 128, 8), (32, 64, 4)]
]
# Index into _CONFIGS of the tile launched at every shape in place of the autotuner's pick (-1), for sweeps
# (``--set ce_lora.pack.CONFIG=N``; ``bench_small_ops.py --sections ce_lora_pack``) and tests.
CONFIG = -1
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under Triton's interpreter (CPU tests) unless CONFIG says otherwise: small tiles, so that tiny test shapes still take
# several row blocks and channel tiles
_INTERPRETED_CONFIG = triton.Config({"BLOCK_T": 16, "BLOCK_O": 32})
# Channel shares per row block (``--set ce_lora.pack.SHARES=N``; 0: enough for about PROGRAMS_PER_SM programs on
# every SM). At 8K tokens one program per 64-row block launched 128 programs, fewer than the H200's SMs, each walking
# every channel tile in turn; shares split the channel tiles between programs. PROGRAMS_PER_SM 1-16 were within the
# run-to-run spread of a training step (session 11); 4 is what the per-layer comparison (shared or not) ran with.
SHARES = 0
PROGRAMS_PER_SM = 4
# Elements of LoRA's A each program copies per step of its loop (the launch's few hundred programs share r x I)
_COPY_BLOCK = 512


@triton.jit
def _ce_pack_kernel(
    dy_ptr,
    b0_ptr,
    slots_ptr,
    g_ptr,
    part_ptr,
    count_ptr,
    lora_a_ptr,
    lora_rows_ptr,
    n_rows,
    n_cols,
    n_keep,
    rows_bucket,
    n_lora_a,
    stride_dy,
    stride_g,
    R_PAD: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    COPY_BLOCK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program: ``BLOCK_T`` rows of ``dY`` and one share of their channel tiles, walked in order.

    dy ``[n_rows, n_cols]`` (row stride ``stride_dy``), b0 ``[n_cols, R_PAD]`` contiguous, slots ``[n_cols]`` int32
    (each channel's kept column of ``G``, -1 if not kept), g ``[n_rows, R_PAD + n_keep]`` column-major (element
    (t, c) at ``c * stride_g + t``); ``n_keep`` and ``rows_bucket`` (``n_rows`` rounded up to a power of two) only key
    the autotuner. ``R_PAD`` is a multiple of 16 but not always a power of two (48 for LoRA rank 24, 240 for 128),
    which ``tl.arange`` requires: the low-rank tiles are ``R_BLOCK`` (``R_PAD`` rounded up to one) wide, masked.

    The programs also copy ``n_lora_a`` elements (0: none) of LoRA's ``A`` (contiguous) into ``lora_rows`` (the
    stacked operand's first rows, which the GEMM after this launch reads), a contiguous slice each. In this launch
    rather than a copy of its own: that was a ``Memcpy DtoD`` of about 11 us of GPU time per layer backward on the
    H200 (session 48), and one more launch on a step whose wall time follows the host.

    The grid holds ``shares`` programs per row block (adjacent in launch order), each with a contiguous share of
    the channel tiles. With one share the program writes its ``dY B0`` rows itself. With several, each writes its
    partial product (float32) to part ``[shares, n_rows, R_PAD]`` and counts itself done in count ``[row blocks]``
    (int32, zeros on entry); the last of a row block to finish sums the partials in share order (the result does
    not depend on which program is last), writes them and zeroes the count again.
    """
    n_tiles = tl.cdiv(n_cols, BLOCK_O)
    shares = tl.num_programs(0) // tl.cdiv(n_rows, BLOCK_T)
    block, share = tl.program_id(0) // shares, tl.program_id(0) % shares
    per_share = tl.cdiv(n_tiles, shares)
    rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2**31 elements
    dy_rows = dy_ptr + rows[:, None] * stride_dy
    rk = tl.arange(0, R_BLOCK)
    rk_ok = rk < R_PAD
    per_program = tl.cdiv(n_lora_a, tl.num_programs(0))  # LoRA's A into the stacked operand
    copy_start = tl.program_id(0) * per_program
    copy_end = tl.minimum(copy_start + per_program, n_lora_a)
    for offset in range(copy_start, copy_end, COPY_BLOCK):
        elements = offset + tl.arange(0, COPY_BLOCK)
        copy_ok = elements < copy_end
        tl.store(lora_rows_ptr + elements, tl.load(lora_a_ptr + elements, mask=copy_ok), mask=copy_ok)
    acc = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    for tile in range(share * per_share, tl.minimum(share * per_share + per_share, n_tiles)):
        cols = tile * BLOCK_O + tl.arange(0, BLOCK_O)
        col_ok = cols < n_cols
        slot = tl.load(slots_ptr + cols, mask=col_ok, other=-1)
        values = tl.load(dy_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b0 = tl.load(b0_ptr + cols[:, None] * R_PAD + rk[None, :], mask=col_ok[:, None] & rk_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(values, b0, acc, input_precision="ieee")
        else:
            acc = tl.dot(values, b0, acc)
        g_kept = g_ptr + rows[:, None] + (R_PAD + slot[None, :]).to(tl.int64) * stride_g
        tl.store(g_kept, values, mask=row_ok[:, None] & (slot >= 0)[None, :])
    g_low = g_ptr + rows[:, None] + rk[None, :] * stride_g
    low_ok = row_ok[:, None] & rk_ok[None, :]
    if shares == 1:
        tl.store(g_low, acc.to(g_ptr.dtype.element_ty), mask=low_ok)
    else:
        part = part_ptr + rows[:, None] * R_PAD + rk[None, :]
        tl.store(part + share * n_rows * R_PAD, acc, mask=low_ok)
        tl.debug_barrier()  # every thread's partial stored before the count says so (release, GPU scope)
        if tl.atomic_add(count_ptr + block, 1, sem="acq_rel") == shares - 1:
            total = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
            for other in range(shares):  # .cg: from L2, where the other programs' stores are visible
                total += tl.load(part + other * n_rows * R_PAD, mask=low_ok, other=0.0, cache_modifier=".cg")
            tl.store(g_low, total.to(g_ptr.dtype.element_ty), mask=low_ok)
            tl.atomic_xchg(count_ptr + block, 0)  # zeros again: later launches reuse the buffer (_zeroed_counters)


# The row count is in the key, bucketed, because the best tile depends on it and Triton reuses a key's pick at every
# other row count (in the process and, with TRITON_CACHE_AUTOTUNING, on disk). On an H100 (session 50), 4096
# channels with about 1060 kept: at a GPU test's 2065 rows, 64 rows at 8 warps took 29 us and 32 rows on tiles of 64
# took 73; at 16K rows the latter won, 73 against 124 us. Powers of two bound the tuning runs of a job whose sequence
# lengths vary.
_ce_pack_tuned = triton.autotune(configs=_CONFIGS, key=["n_cols", "n_keep", "R_PAD", "rows_bucket"])(
    _ce_pack_kernel
)
# Completion counters of the shared row blocks, per (device, stream). The kernel sets each counter back to zero when
# its row block is done, so one zeroed buffer serves every later launch on that stream (and every replay of a CUDA
# graph that captured it); a fresh ``torch.zeros`` per call cost a fill launch per CE-LoRA layer backward, on a
# training step whose wall time follows the host. Keyed by stream: launches on two streams may run at once.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _zeroed_counters(size: int, device: torch.device) -> torch.Tensor:
    """An int32 buffer of at least ``size`` zeros for launches on the current stream of ``device``."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < size:
        counters = _COUNTERS[(device, stream)] = torch.zeros(size, device=device, dtype=torch.int32)
    return counters


# The autotuner's pick per layer shape, launched directly afterwards: the autotuner's per-call bookkeeping doubled
# the host cost of a launch on the H200's host (69.7 against 27.5 us), and a LoRA training step is near host-bound.
_PICKED: dict[tuple, triton.Config] = {}


def _shares(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Channel shares per row block: ``SHARES`` if set, else enough programs for ``PROGRAMS_PER_SM`` per SM."""
    if SHARES:
        return max(1, min(SHARES, n_tiles))
    if _INTERPRETED:
        return 1
    return max(1, min(n_tiles, -(-PROGRAMS_PER_SM * sm_count(device) // n_blocks)))


def forced_config() -> triton.Config | None:
    """The config that ``CONFIG`` forces at every shape, or None (the autotuner's pick)."""
    if CONFIG == -1:
        return None
    if not 0 <= CONFIG < len(_CONFIGS):
        raise ValueError(f"ce_lora.pack.CONFIG must be -1 (autotuned) or an index below {len(_CONFIGS)}, got {CONFIG}")
    return _CONFIGS[CONFIG]


def triton_pack_grad_output(
    grad_output: torch.Tensor,
    b0_pad: torch.Tensor,
    keep: int,
    slots: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``G [T, r_pad + keep]`` from ``dY [T, O]`` (unit column stride), ``B0 [O, r_pad]`` and the kept channels' columns
    ``slots [O]`` of :func:`kimi_hf.kernels.ce_lora.plan.channel_slots`, column-major (strides ``(1, T rounded up to
    8)``). With ``lora_a``, the same launch copies it into ``lora_rows`` (both contiguous, of one shape and dtype)."""
    n_rows, n_cols = grad_output.shape
    r_pad = b0_pad.shape[1]
    device = grad_output.device
    stride_g = -(-n_rows // 8) * 8  # column-major, columns 16-byte aligned
    packed = torch.empty_strided((n_rows, r_pad + keep), (1, stride_g), device=device, dtype=grad_output.dtype)
    if n_rows == 0:  # no row block to launch (and none to share the channels between); A is copied all the same
        if lora_a is not None:
            lora_rows.copy_(lora_a)
        return packed
    rows_bucket = next_power_of_2(n_rows)
    key = (n_cols, keep, r_pad, rows_bucket, grad_output.dtype, b0_pad.dtype)
    config = forced_config() or (_INTERPRETED_CONFIG if _INTERPRETED else _PICKED.get(key))

    def shares(meta: dict) -> int:
        return _shares(cdiv(n_rows, meta["BLOCK_T"]), cdiv(n_cols, meta["BLOCK_O"]), device)

    if config is None:  # the autotuner may launch any config: buffers for the largest grid
        max_shares = max(shares(c.kwargs) for c in _CONFIGS)
        n_blocks = cdiv(n_rows, min(c.kwargs["BLOCK_T"] for c in _CONFIGS))
    else:
        max_shares, n_blocks = shares(config.kwargs), cdiv(n_rows, config.kwargs["BLOCK_T"])
    split = max_shares > 1
    partials = torch.empty(max_shares if split else 0, n_rows, r_pad, device=device, dtype=torch.float32)
    counts = _zeroed_counters(n_blocks if split else 0, device)
    n_lora_a = 0 if lora_a is None else lora_a.numel()
    if lora_a is None:  # B0 stands in for A's pointers (no element is copied)
        lora_a = lora_rows = b0_pad
    args = (grad_output, b0_pad, slots, packed, partials, counts, lora_a, lora_rows, n_rows, n_cols, keep, rows_bucket,
            n_lora_a, grad_output.stride(0), stride_g)  # fmt: skip
    meta = {"R_PAD": r_pad, "R_BLOCK": next_power_of_2(r_pad), "COPY_BLOCK": _COPY_BLOCK,
            "IEEE": grad_output.dtype == torch.float32}  # fmt: skip
    if config is None:
        _ce_pack_tuned[lambda meta: (cdiv(n_rows, meta["BLOCK_T"]) * shares(meta),)](*args, **meta)
        _PICKED[key] = _ce_pack_tuned.best_config
    else:
        _ce_pack_kernel[(n_blocks * max_shares,)](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return packed
