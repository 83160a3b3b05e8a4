"""Chunked KDA on Triton: launchers and the autograd Function (the kernels are in chunk_fwd/chunk_bwd.py).

Forward: prep (gate, in-chunk cumsum; the L2 norm below CHUNK_DOTS_FUSE 3) -> chunk dots (per chunk where its decays
allow: A_qk, P, M and W/U's work, at level 3 from the raw q, k and their norms, see CHUNK_DOTS_FUSE) -> flagged (the
chunks the chunk dots left out, each in one program: A_qk and P inside each sub-block and between them, M on [16, 16]
blocks, W, U, qg, kh from the stored M) -> state (sequential over chunks, per head and V tile) -> output. Below
CHUNK_DOTS_FUSE 2 the inverse and W/U kernels take every chunk after the flagged kernel.
Backward: state (reverse) -> pair (dv, dbeta and the gradients of the in-chunk pair matrices, per chunk) -> direct
(the dq, dk terms through the states, per chunk and block of key channels) -> key (adds the in-chunk pairs: dq, dk
and dG per chunk, block of key channels and sub-block of rows) -> gate (dg: reverse cumsum, fused gate) -> L2-norm
backward.
Everything runs on flattened ``[B*T, H, D]`` tensors with sequence offsets, so equal-length batches
and packed (cu_seqlens) sequences share one code path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._backend import refuse_create_graph
from .._grid import cdiv, next_power_of_2
from .chunk_bwd import (
    kda_direct_bwd_kernel, kda_gate_bwd_kernel, kda_key_bwd_kernel, kda_pair_bwd_kernel,
    kda_state_bwd_kernel, l2norm_bwd_kernel,
)  # fmt: skip
from .chunk_fwd import (
    kda_chunk_dots_fwd_kernel, kda_flagged_fwd_kernel, kda_inverse_fwd_kernel, kda_output_fwd_kernel,
    kda_prep_fwd_kernel, kda_state_fwd_kernel, kda_wu_fwd_kernel,
)  # fmt: skip
from .utils import L2NORM_EPS

CHUNK = 64  # tokens per chunk (BT)
SUB = 16  # rows per sub-block whose pairs are summed exactly (BC)
MAX_HEAD_DIM = 256
# Tiles and warps of the per-chunk kernels. The forward's in-chunk work is split in four (pairs, diagonal, inverse,
# W/U): the H200 profile showed the former single kernel at 255 registers, one program per SM, bound by rounds of
# dependent loads (BENCHMARKS.md).
# Until session 14 one solve kernel computed M by substitution on the whole [64, 64] tile (4x the work of its
# [16, 16] diagonal blocks), then W, U, qg, kh: 0.565 ms of the 1.75 ms forward at B1 T8192 on the H200. The inverse
# now works on [16, 16] blocks in a kernel of its own (166 registers at 2 warps) and W/U run apart from the stored M:
# 0.133 + 0.276 ms, forward 1.60 ms (session 14, same machine). Fusing the pairs between sub-blocks into the inverse
# kernel, as fla does, was slower (0.621 + 0.274 ms for pairs, inverse and W/U against 0.362 + 0.133 + 0.276; branch
# kda-solve-blocks).
# The forward's pairs inside a sub-block (the diagonal [16, 16] tiles of A_qk and P): one program per sub-block, as
# tensor-core dots through its middle row where the decays allow (until session 44 kda_diag_dots_fwd_kernel, see
# DIAG_DOT_SPAN below; 64 key channels per block at 2 warps, 162 registers). Session 20: forward 4.121 against 4.536 ms
# at B8 T4096 on the H200, fwd+bwd 12.72 against 13.12 (32 channels or 4 warps 0.09-0.55 ms slower); on an H100 that
# kernel took 0.539 ms where the former one, a token per program with one exp per partner and channel, took 0.925
# (session 19). That kernel (sessions 6-19: fwd+bwd 6.90 -> 5.45 ms at B1 T8192 against the partners summed inside the
# pairs and key kernels) is removed; storing its rows whole instead of an element per partner was 0.15 ms slower.
# The backward key kernel (the pairs between sub-blocks): 64 key channels per block at 2 warps (session 6: fwd+bwd
# 5.21 ms against 5.46 at 32 channels and 4 warps, the best before the diagonal moved out; 8 warps were 1.5x slower
# then).
# The backward's terms through the states are [64, V] x [V, BK] dots per chunk in their own kernel (64 channels,
# 32 value columns per step): inside the per-sub-block key kernel they were [16, V] dots repeated for each of the
# 4 sub-blocks, with the state tiles reloaded each time (that kernel was 5.6 of 10.3 ms on the H200).
# Registers and spills without a GPU: kernels/benchmarks/kda_registers.py (until session 12 it compiled without the
# launcher's 16-byte alignment facts and reported 255 registers and spills where the launched kernels have far fewer,
# e.g. the former solve kernel 255 for 128); timings: bench_kda.py --sweep.
# The pairs between sub-blocks run one program per (chunk, head) (until session 44 kda_pairs_chunk_fwd_kernel; since
# session 15: the former kernel, one program per sub-block, took 0.362 ms of the 1.59 ms forward at B1 T8192 on the
# H200, this one 0.218, forward 1.46 against 1.59 ms in one sweep). 16 key channels per block at 4 warps: 168 registers
# as compiled for sm_90, three programs per SM (session 15 sweep: 32 channels 1.458 ms forward, 8 warps 1.645-1.789,
# against 1.451).
PAIRS_KEY_BLOCK = 16
# Session 20 (H200, B8 T4096): the inverse inside the pairs kernel, from the pairs between sub-blocks it held in
# registers (as fla's inter-block kernel solves its system), took the forward to 5.003 ms against 4.536; removed.
# Session 18's sweep on the H200 (B1 T8192, forward 1.346 / fwd+bwd 4.080 ms at session 15's kernels) timed the
# candidates of sessions 16-17 and kept two: the inverse's diagonal blocks as products (forward 1.285 ms) and the
# backward's pairs inside each sub-block in the key kernel (fwd+bwd 3.757 ms). Dropped, each slower in every
# combination: the prep inside the pairs kernel (forward 1.77-1.93 ms), the forward's pairs inside each sub-block in
# the pairs kernel (+0.01-0.02 ms), a program per W/U block (+0.09 ms) and the output inside the state pass at 8 warps
# (1.401 ms; an inference forward then stored no h). BENCHMARKS.md has the tables.
# Session 38 (H200, B8 T4096): no prep kernel, the diagonal, pairs and W/U kernels each computing the gate, the
# in-chunk cumsum and the L2 norms from the raw inputs (20% fewer bytes): forward 4.85 ms against these kernels'
# 4.12 in session 24 (fla 4.10 and 4.09 in the two runs), the pairs kernel 1.66 against 0.82 ms even with its
# registers capped at these kernels' 168 (210 uncapped: forward 5.39 ms); reverted.
# Session 41 (H100, B8 T4096, two alternating runs): the prep kernel writing W/U's gated copies (qg, kh, gl and
# kb = beta k exp(G), in key blocks of 64 after a pass for the norms), W/U reading only kb, v, beta and M (5% fewer
# bytes): forward 4.89 ms against these kernels' 4.77, 4.83 with W/U's key blocks of 64; reverted (9779529).
# The pairs inside each sub-block, forward (since session 20) and backward (in the key kernel): tensor-core dots
# through the sub-block's middle row m (exp(G_r - G_c) = exp(G_r - G_m) exp(G_m - G_c)), exact while every
# |G_r - G_m| of a key block is at most DIAG_DOT_SPAN (both factors within e^+-40, far inside fp32's range); a
# sub-block whose decays span more (per-token log-decays beyond about -5 on average over 8 tokens) takes an exact
# one-partner-at-a-time path in the same program.
# The key kernel then spills 176 B at 2 warps and 64 channels (kda_registers.py) and is still the fastest setting
# (session 18: 4 warps or 32 channels 0.01-0.21 ms slower in fwd+bwd).
DIAG_DOT_SPAN = 40.0
DIAG_DOTS_KEY_BLOCK = 64
# Since session 42 the sub-block steps above compute only the chunks that kda_chunk_dots_fwd_kernel leaves out:
# it takes a chunk's whole A_qk and P as six [32, BK] x [BK, 32] dots per key block through the halves' middle rows,
# for chunks whose |G_i - G_m| stay within CHUNK_DOT_SPAN over each half (16 tokens either side of m: factors up to
# e^64 = 6e27, so q and k up to ~5e10 stay finite in fp32). Session 42 (H100, B8 T4096, two alternating rounds
# against the sub-block kernels alone): forward 4.463 / 4.460 ms against 4.768 / 4.770, fwd+bwd 13.84 against 14.16;
# the kernel took 1.029 ms where the diagonal and pairs kernels had taken 0.540 + 0.850 (session 21), at 240
# registers (4 warps, 32 key channels; 16 channels 0.02 ms slower in the forward). The sub-block kernels' programs
# that return at once cost 0.06 ms there. A second sweep at the default CHUNK_DOTS_FUSE below: 8 warps 5.608 ms
# against 4.358 at 4 (each half's q and k rows stacked into one dot operand, bf58bc0: 5.570 and 5.636; removed).
# Session 43 (H100, CHUNK_DOTS_FUSE 3 below): 16 key channels per block 1.153 ms forward at B1 T8192 against 1.166
# at 32 (fwd+bwd 3.623 against 3.641), 4.174 against 4.189 at B8 T4096; 220 registers against 255 as
# kda_registers.py then compiled it, at 1 stage (at the launch's 3 stages: 255 against 255 with 48 B of spills).
CHUNK_DOT_SPAN = 64.0
CHUNK_DOTS_KEY_BLOCK = 16
CHUNK_DOTS_WARPS = 4
# A register cap for the chunk dots kernel (Triton's maxnreg; 0: none). Session 43 (H100, B1 T8192, fuse 3): at 168
# (three programs of 4 warps per SM instead of two; spills of 84 B at 16 key channels, 176 B at 32 as kda_registers.py
# compiles it with triton 3.9) forward 1.214 / 1.230 ms against 1.153 / 1.166 uncapped.
CHUNK_DOTS_MAXNREG = 0
# Software-pipelining stages of the chunk dots kernel's loops (Triton's num_stages; 3 is Triton's default, which the
# launch used without naming it until session 44: 255 registers for an inference forward where kda_registers.py, then
# compiling at 1 stage, reported 216-220). Session 44 sweep (H100, B1 T32768): forward 4.218 ms at 3, 4.231 at 2,
# 4.321 at 1 (W/U's key blocks of 32; of 64: 4.264-4.340).
CHUNK_DOTS_STAGES = 3
# What else the chunk dots kernel does for the chunks it computes, leaving to the separate kernels only the flagged
# chunks: 1 also M (from its halves' [32, 32] blocks of P), 2 also M and then W/U's work (from M's blocks in
# registers); 0 neither; 3 as 2, and it takes the L2 norms of q and k (when the op is asked for them): it sums the raw
# rows and scales the sums by the rows' inverse norms, so the prep kernel neither reads q, k nor writes qn, kn (the
# inference forward stores no qn, kn but the flagged chunks'; training stores them from W/U's work for the backward).
# Session 42 sweep (H100, B8 T4096, 32 key channels): forward 4.406 ms at 2, 4.464 at 0, 4.567 at 1 (the inverse
# on [32, 32] blocks in the chunk dots kernel costs more than the inverse kernel's 0.263 ms unless W/U's launch and
# M's round trip through memory go with it); fwd+bwd 13.81, 13.84, 13.94. At 2 the kernel takes 2.26 ms, where the
# three kernels it stands for took 1.03 + 0.26 + 1.09.
# Session 43 (H100, B8 T4096): forward 4.189 / 4.174 ms at 3 (32 / 16 key channels) against 4.359 / 4.451 at 2,
# fwd+bwd 13.79 / 13.80 against 13.71 / 13.81; the prep kernel 0.372 ms against 0.750, the chunk dots kernel 2.49
# against 2.26. Its first version, which also took the gate and the in-chunk cumsum (no prep kernel; each half's
# cumsum per key block, the pivots' G as column sums), was slower: forward 4.591 / 4.505, the kernel 3.23 ms.
# Session 44 (H100, fuse 3, fla 4.83 / 4.87 / ~1.26 ms): W/U's work from M's [32, 32] blocks and the rows' inverse
# norms as the chunk dots kernel holds them in registers, half by half (an inference forward stores neither M nor
# P), took the forward from 4.069 to 3.912 ms at B8 T4096, 4.297 to 4.149 at B1 T32768, 1.139 to 1.099 at B1 T8192,
# against M and the norms stored and read back after a barrier; fwd+bwd 13.72 -> 13.81, 13.99 -> 14.05,
# 3.62 -> 3.64.
CHUNK_DOTS_FUSE = 3
# The chunks that the chunk dots kernel flags go to one kernel, kda_flagged_fwd_kernel: the pairs inside each
# sub-block and between them (the diagonal and pairs kernels until session 44), and at CHUNK_DOTS_FUSE >= 1 the
# inverse, at >= 2 W/U's work, each chunk whole in one program of FLAGGED_WARPS warps (steps in loops not pipelined by
# Triton, num_stages 1). Its programs each read the flags of FLAGGED_BLOCK (chunk, head) items at once and return
# where none is set (its docstring gives the measured cost against a kernel per step).
FLAGGED_BLOCK = 16
FLAGGED_WARPS = 4
# The inverse at 2 warps (135 registers as compiled for sm_90; 166 with session 15's substitution loop) and W/U at 4
# warps with 32 key channels per block (session 15 sweep on the H200, B1 T8192 forward: the inverse at 4 warps
# 0.10-0.11 ms slower in every W/U setting; W/U 1.563 ms at 4 warps against 1.595 at 8, 64 channels 1.567-1.611, its
# loop pipelined within 0.015 ms).
# Session 19 (H100, B8 T4096 forward): the inverse inside the W/U kernel (M stored and read back after a barrier)
# took 6.83 ms against 6.09, with the pairs between sub-blocks in it too 6.71; both removed.
INVERSE_WARPS = 2
WU_KEY_BLOCK = 32
WU_WARPS = 4
# Session 19 sweep on an H100 at B8 T4096 (forward 5.209 ms at these defaults): W/U at 8 warps, 64 key channels or
# its loops pipelined by Triton (WU_STAGES 2; fla's W/U autotunes over 2-4) were 0.02-0.15 ms slower, the forward
# state pass at 8 warps 0.37-0.40 ms slower.
WU_STAGES = 1
# The forward diagonal kernel's partner loop is plain: software-pipelined (Triton's num_stages 2), with the
# backward's former one, it was slower on the H200 (session 14, B1 T8192: forward 1.85 ms against 1.75, fwd+bwd
# 4.88 against 4.58).
# Software pipelining by Triton (num_stages) of the backward's pair and direct kernels (session 14 sweep on the H200,
# B1 T8192: fwd+bwd 4.51 ms with the pair kernel's loop pipelined against 4.58 plain; the direct kernel's at 2 was
# 0.3% slower, kept plain).
BWD_PAIR_STAGES = 2
BWD_DIRECT_STAGES = 1
BWD_DIRECT_KEY_BLOCK = 64
BWD_DIRECT_BLOCK_V = 32
# The backward's direct and pair kernels at 4 warps (session 7, B1 T8192: fwd+bwd 4.61 ms against 5.03 at 8 and 8,
# 4.80 and 4.84 with one of them at 4), at 255 registers there (224 and 130 at 8 warps; kda_registers.py): twice the
# programs per SM hide more latency. A second sweep: 2 warps slower (4.74-10.3 ms), 32 direct key channels slower
# (4.75-4.95), 32 value columns per pair tile 1% faster than 16 (4.55 ms).
BWD_DIRECT_WARPS = 4
BWD_KEY_BLOCK = 64
BWD_KEY_WARPS = 2
BWD_KEY_STAGES = 2  # pipelined partner loop (session 6 sweep: 2 beat 1 by 1-3% of fwd+bwd)
BWD_PAIR_BLOCK_V = 32
BWD_PAIR_WARPS = 4
# The sequential state passes run 32 value columns per program, the backward at 8 warps (session 14 sweep on the
# H200, B1 T8192: 16 columns fwd 1.85 / fwd+bwd 4.91 ms, the backward at 4 warps fwd+bwd 4.95 ms, against 1.75 /
# 4.58; the backward at 4 warps with 16 columns, spilling 492-692 B, stopped with an illegal memory access, not
# investigated, so its warps are not a constant), the forward at STATE_FWD_WARPS up to K = 128 (4: 230 registers as
# compiled for sm_90, 164 at 8; session 15: forward 1.400 against 1.457 ms at 8, outputs identical; fla's forward
# state pass autotunes over 2 and 4 warps on Hopper) and at twice that above (see _state_fwd_warps).
# STATE_BLOCK_V = 0: the automatic tile of _state_block_v (else a power of two >= 16).
# Session 44 (H100, the forward): 16 columns or 8 warps 4.246-4.458 ms against 4.219 at B1 T32768, 1.115-1.154
# against 1.100 at B1 T8192 (fwd+bwd 14.04 -> 14.97 at 16 columns).
STATE_FWD_WARPS = 4
STATE_BLOCK_V = 0
# Session 45 (H100; aa3936a, removed): the forward state pass overlapped with the chunk dots, on a high-priority
# stream where its programs fit one per SM, reading each chunk once a flag set by the chunk dots said it was stored:
# forward 4.876 ms at B1 T32768 against 4.098 sequential (4.531 / 4.253 with the pass started after a quarter / half
# of the chunks), 1.237 against 1.079 at B1 T8192. Beside a resident pass program (236 registers at 4 warps) an SM
# holds one chunk dots program where it held two. The same run timed the prep kernel at 4 warps and 32 or 64 key
# channels per program and the output kernel at 32 or 128 value columns and 4 warps: within -1% / +5% of these
# kernels (B8 T4096 forward 3.822-3.859 ms against 3.854).
# Session 47 (H100; 8c8b539, removed): the forward's kernels under programmatic dependent launch, each waiting first
# for the one before it: correct (bitwise equal to plain launches at fuse levels 1 and 3) but slower, forward
# 1.102 / 1.079 ms at B1 T8192 against 1.041 / 1.039 plain, in alternation.
NUM_WARPS = 8  # the other kernels


@dataclass
class _Chunks:
    """Sequence/chunk bookkeeping on the device: ``cu_seqlens [N+1]``, ``indices [NC, 2]`` (sequence,
    chunk within it), ``offsets [N+1]`` (first chunk of each sequence)."""

    cu_seqlens: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor
    num_chunks: int
    num_seqs: int


def _chunks(cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device) -> _Chunks:
    """Equal-length batches (``cu_seqlens`` None) are laid out from B and T alone, without waiting for the device:
    a host synchronisation here stalled every forward until the GPU drained. Their layout is kept for the next call
    of the same shape on the same stream (:func:`_kept_equal_layout`), except one being captured into a CUDA graph,
    whose tensors hold nothing until it replays. Packed sequences read the offsets once (their validation has
    already done so)."""
    if cu_seqlens is None:
        if device.type != "cuda":
            return _kept_equal_layout(B, T, device, None)
        if torch.cuda.is_current_stream_capturing():
            return _equal_layout(B, T, device)
        return _kept_equal_layout(B, T, device, torch.cuda.current_stream(device))
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()  # the kernels read it at unit stride
    bounds = cu_seqlens.tolist()
    num_chunks = sum(cdiv(end - start, CHUNK) for start, end in zip(bounds[:-1], bounds[1:]))
    counts = (cu[1:] - cu[:-1] + CHUNK - 1) // CHUNK
    offsets = torch.zeros(counts.numel() + 1, device=device, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    seq = torch.repeat_interleave(
        torch.arange(counts.numel(), device=device, dtype=torch.int32), counts, output_size=num_chunks
    )
    within = torch.arange(num_chunks, device=device, dtype=torch.int32) - offsets[seq.long()]
    indices = torch.stack([seq, within], dim=1).contiguous()
    return _Chunks(cu, indices, offsets, num_chunks, counts.numel())


def _equal_layout(B: int, T: int, device: torch.device) -> _Chunks:
    """The layout of B sequences of T tokens, built on ``device`` (on the current stream)."""
    per_seq = cdiv(T, CHUNK)
    cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
    offsets = torch.arange(B + 1, device=device, dtype=torch.int32) * per_seq
    flat = torch.arange(B * per_seq, device=device, dtype=torch.int32)
    indices = torch.stack([flat // per_seq, flat % per_seq], dim=1)
    return _Chunks(cu, indices, offsets, B * per_seq, B)


@functools.lru_cache(maxsize=64)
def _kept_equal_layout(B: int, T: int, device: torch.device, stream: torch.cuda.Stream | None) -> _Chunks:
    """:func:`_equal_layout`, built once per shape, device and stream (``stream``: the one it is built and read on,
    so that no stream reads it before the kernels that write it have run). Built at every call, its small torch
    kernels took 0.011 ms of the 1.05 ms forward at B1 T8192 H32 on an H100 (session 45)."""
    return _equal_layout(B, T, device)


def _dims(K: int, V: int) -> tuple[int, int]:
    return max(16, next_power_of_2(K)), min(64, max(16, next_power_of_2(V)))


def _state_block_v(BK: int, BV: int) -> int:
    """V tile of the sequential state kernels: 32 columns (16 for K = 256), so that the [K, BV] fp32 state
    and the prefetched tiles of the next chunk fit in registers (wider tiles spill; see kda_registers.py)
    and even a small batch gives the SMs several programs each (the pass is latency-bound). ``STATE_BLOCK_V``,
    when set, replaces the automatic choice."""
    if STATE_BLOCK_V:
        if STATE_BLOCK_V < 16 or STATE_BLOCK_V & (STATE_BLOCK_V - 1):
            raise ValueError(f"STATE_BLOCK_V must be 0 or a power of two >= 16, got {STATE_BLOCK_V}")
        return min(BV, STATE_BLOCK_V)
    return 16 if BK > 128 else min(BV, 32)


def _state_fwd_warps(BK: int) -> int:
    """Warps of the forward state pass: ``STATE_FWD_WARPS``, doubled for K > 128. At K = 256 and 4 warps the
    [256, 16] state tiles spill 576 B per thread, at 8 none (198 registers; kda_registers.py). Both passed the
    head-dim-256 GPU test (sessions 14 and 15); K = 256 was not timed at either."""
    return STATE_FWD_WARPS * 2 if BK > 128 else STATE_FWD_WARPS


def _fuse_levels() -> tuple[bool, bool, bool]:
    """(inverse, wu, norms) of ``CHUNK_DOTS_FUSE``: whether the chunk dots kernel also computes M, and W/U's work, for
    the chunks it takes (the inverse and W/U kernels then take only the flagged ones), and whether it takes the L2
    norms of q and k in place of the prep kernel."""
    if CHUNK_DOTS_FUSE not in (0, 1, 2, 3):
        raise ValueError(f"CHUNK_DOTS_FUSE must be 0, 1, 2 or 3, got {CHUNK_DOTS_FUSE}")
    return CHUNK_DOTS_FUSE >= 1, CHUNK_DOTS_FUSE >= 2, CHUNK_DOTS_FUSE == 3


def _row_limit() -> float:
    """The largest squared row norm of q or k that the chunk dots kernel sums unnormalised (``CHUNK_DOTS_FUSE`` 3):
    every entry of a row times a factor up to e^CHUNK_DOT_SPAN must stay finite in fp32."""
    fp32_max = torch.finfo(torch.float32).max
    return min(fp32_max, (fp32_max * math.exp(-CHUNK_DOT_SPAN)) ** 2)


def _precision(dtype: torch.dtype) -> str:
    # Precision of the dots whose operands are fp32 (decay-weighted pairs, the inverse, dA). fp32 inputs get
    # exact fp32 (tf32 would cost ~1e-3 relative error, but the FMA lowering needs many more registers);
    # with bf16/fp16 inputs, tf32's error is below the inputs' own and the dots run on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def kda_chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    use_gate: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    chunks: _Chunks,
    for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Forward on flattened contiguous ``[TT, H, D]`` inputs (q, k, v of one dtype).

    Returns ``o [TT, H, V]``, the final state ``[N, H, K, V]`` fp32 (or None) and the tensors the
    backward needs (empty unless ``for_backward``: at ``CHUNK_DOTS_FUSE`` 3 an inference forward stores no qn, kn
    but those of the chunks that the flagged kernel computes).
    """
    inverse, wu, norms = _fuse_levels()
    norms = norms and use_qk_l2norm  # the chunk dots kernel normalises q, k, the prep kernel computes G alone
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _dims(K, V)
    dt = q.dtype
    ieee = _precision(dt)
    NC, N = chunks.num_chunks, chunks.num_seqs
    dev = q.device
    G = torch.empty(TT, H, K, device=dev, dtype=torch.float32)
    qn, kn = (torch.empty_like(q), torch.empty_like(k)) if use_qk_l2norm else (q, k)
    P = torch.empty(TT, H, CHUNK, device=dev, dtype=torch.float32)
    # M in the inputs' dtype: W/U rounds it to that dtype for its dots anyway, and the backward's dA = M^T dM M^T
    # starts from the rounded M, as fla's does (session 19 on an H100, B8 T4096: forward 5.995 against 6.085 ms
    # with M in fp32, fwd+bwd unchanged).
    M = torch.empty(TT, H, CHUNK, device=dev, dtype=dt)
    A_qk = torch.empty(TT, H, CHUNK, device=dev, dtype=dt)
    kda_prep_fwd_kernel[(NC, H)](
        q, k, g, A_log, dt_bias, qn, kn, G, chunks.indices, chunks.cu_seqlens, H, K,
        BT=CHUNK, BK=BK, L2NORM=use_qk_l2norm and not norms, GATE=use_gate, EPS=L2NORM_EPS, num_warps=NUM_WARPS,
    )  # fmt: skip
    W, qg, kh = (torch.empty(TT, H, K, device=dev, dtype=dt) for _ in range(3))
    U = torch.empty(TT, H, V, device=dev, dtype=dt)
    gl = torch.empty(NC, H, K, device=dev, dtype=torch.float32)
    exact = torch.empty(NC, H, device=dev, dtype=torch.int32)  # the chunks whose decays the chunk dots leave out
    kda_chunk_dots_fwd_kernel[(NC * H,)](
        q if norms else qn, k if norms else kn, v, G, beta, A_qk, P, M, W, U, qg, kh, gl, qn, kn, exact,
        chunks.indices, chunks.cu_seqlens, scale, H, K, V,
        BT=CHUNK, BK=min(BK, CHUNK_DOTS_KEY_BLOCK), SPAN=CHUNK_DOT_SPAN, INVERSE=inverse, WU=wu,
        BK_WU=min(BK, WU_KEY_BLOCK), BV=BV, IEEE=ieee, NORMS=norms, EPS=L2NORM_EPS, ROW_LIMIT=_row_limit(),
        SAVE=for_backward, num_warps=CHUNK_DOTS_WARPS, num_stages=CHUNK_DOTS_STAGES,
        maxnreg=CHUNK_DOTS_MAXNREG or None,
    )  # fmt: skip
    if FLAGGED_BLOCK < 1 or FLAGGED_BLOCK & (FLAGGED_BLOCK - 1):
        raise ValueError(f"FLAGGED_BLOCK must be a power of two, got {FLAGGED_BLOCK}")
    kda_flagged_fwd_kernel[(cdiv(NC * H, FLAGGED_BLOCK),)](
        qn, kn, v, G, beta, A_qk, P, M, W, U, qg, kh, gl, exact, chunks.indices, chunks.cu_seqlens, scale, NC, H, K, V,
        BT=CHUNK, BC=SUB, BK_DIAG=min(BK, DIAG_DOTS_KEY_BLOCK), BK_PAIRS=min(BK, PAIRS_KEY_BLOCK),
        BK_WU=min(BK, WU_KEY_BLOCK), BV=BV, SPAN=DIAG_DOT_SPAN, INVERSE=inverse, WU=wu, IEEE=ieee,
        BLOCK=FLAGGED_BLOCK, num_warps=FLAGGED_WARPS, num_stages=1,
    )  # fmt: skip
    if not inverse:  # M of every chunk
        kda_inverse_fwd_kernel[(NC, H)](
            P, beta, M, chunks.indices, chunks.cu_seqlens, H, BT=CHUNK, BC=SUB, IEEE=ieee, num_warps=INVERSE_WARPS,
        )  # fmt: skip
    if not wu:  # W/U's work for every chunk
        kda_wu_fwd_kernel[(NC, H)](
            qn, kn, v, G, beta, M, W, U, qg, kh, gl, chunks.indices, chunks.cu_seqlens, scale, H, K, V,
            BT=CHUNK, BK=min(BK, WU_KEY_BLOCK), BV=BV, IEEE=ieee, num_warps=WU_WARPS, num_stages=WU_STAGES,
        )  # fmt: skip
    h = torch.empty(NC, H, K, V, device=dev, dtype=dt)
    v_new = torch.empty(TT, H, V, device=dev, dtype=dt)
    ht = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    BVs = _state_block_v(BK, BV)
    # num_stages=1, the next chunk's tiles prefetched into registers by hand. Session 44 (H100): each chunk's tiles
    # loaded at its own step and pipelined by Triton (asynchronous copies to shared memory, 2 stages; 146 registers
    # against 220) took the pass from 0.722 to 0.771 ms at B8 T4096 and from 0.966 to 1.173 at B1 T32768; unpipelined,
    # forward 4.004 against 3.916 ms at B8 T4096. (That sweep stopped with an illegal memory access at 8 warps, not
    # investigated.)
    kda_state_fwd_kernel[(N * cdiv(V, BVs), H)](
        kh, gl, W, U, h, v_new, initial_state, ht, chunks.cu_seqlens, chunks.offsets, H, K, V,
        BT=CHUNK, BK=BK, BV=BVs, HAS_H0=initial_state is not None, STORE_HT=output_final_state, IEEE=ieee,
        num_warps=_state_fwd_warps(BK), num_stages=1,
    )  # fmt: skip
    o = torch.empty(TT, H, V, device=dev, dtype=dt)
    kda_output_fwd_kernel[(NC * cdiv(V, BV), H)](
        qg, A_qk, h, v_new, o, chunks.indices, chunks.cu_seqlens, H, K, V,
        BT=CHUNK, BK=BK, BV=BV, IEEE=ieee, num_warps=NUM_WARPS, num_stages=1 if BK > 128 else 2,
    )  # fmt: skip
    if not for_backward:
        return o, ht, {}
    saved = dict(qn=qn, kn=kn, G=G, A_qk=A_qk, P=P, M=M, W=W, qg=qg, kh=kh, gl=gl, h=h, v_new=v_new)
    return o, ht, saved


def _l2norm_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient through ``x / sqrt(|x|^2 + eps)`` over the last dim, for ``x [TT, H, K]`` and ``dy``
    (the gradient of the normalised x, fp32); returns x's dtype."""
    K = x.shape[-1]
    rows = x.numel() // K
    dx = torch.empty_like(x)
    BR = 16
    l2norm_bwd_kernel[(cdiv(rows, BR),)](
        x, dy, dx, rows, K, EPS=L2NORM_EPS, BR=BR, BD=max(16, next_power_of_2(K)), num_warps=4
    )
    return dx


def kda_chunk_bwd(
    do: torch.Tensor,
    dht: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    has_initial_state: bool,
    use_qk_l2norm: bool,
    use_gate: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    chunks: _Chunks,
    saved: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """Backward on flattened inputs. Returns dq, dk, dv, dg (fp32), dbeta (fp32), dh0 (or None),
    dA_log ``[H]`` and ddt_bias ``[H, K]`` (or None without the fused gate)."""
    TT, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _dims(K, V)
    dt = q.dtype
    ieee = _precision(dt)
    NC, N = chunks.num_chunks, chunks.num_seqs
    dev = q.device
    dh = torch.empty(NC, H, K, V, device=dev, dtype=dt)
    dv_new = torch.empty(TT, H, V, device=dev, dtype=dt)
    dh0 = torch.empty(N, H, K, V, device=dev, dtype=torch.float32) if has_initial_state else None
    BVs = _state_block_v(BK, BV)
    kda_state_bwd_kernel[(N * cdiv(V, BVs), H)](
        saved["qg"], saved["kh"], saved["gl"], saved["W"], saved["A_qk"], do, dh, dv_new, dht, dh0,
        chunks.cu_seqlens, chunks.offsets, H, K, V,
        BT=CHUNK, BK=BK, BV=BVs, HAS_DHT=dht is not None, STORE_DH0=has_initial_state, IEEE=ieee,
        num_warps=NUM_WARPS, num_stages=1,
    )  # fmt: skip
    dv = torch.empty_like(v)
    dbeta = torch.empty(TT, H, device=dev, dtype=torch.float32)
    dA_qk, dP = (torch.empty(TT, H, CHUNK, device=dev, dtype=torch.float32) for _ in range(2))
    kda_pair_bwd_kernel[(NC, H)](
        saved["kn"], v, beta, saved["P"], saved["M"], saved["h"], saved["v_new"], dv_new, do, dv, dbeta,
        dA_qk, dP, saved["G"], chunks.indices, chunks.cu_seqlens, H, K, V,
        BT=CHUNK, BK=BK, BV=min(BV, BWD_PAIR_BLOCK_V), IEEE=ieee, num_warps=BWD_PAIR_WARPS,
        num_stages=BWD_PAIR_STAGES,
    )  # fmt: skip
    # The key-side gradients, taken with respect to the normalised q/k (fp32; with the L2 norm then through
    # the norm): first the terms through the states, per chunk and block of BWD_DIRECT_KEY_BLOCK channels
    # (dq, dk and dg hold dq, dkp and dkm), then the in-chunk pairs per block of BWD_KEY_BLOCK channels and
    # sub-block of rows (dq, dk in place; dg gets dG), then the gate.
    dq, dk, dg = (torch.empty(TT, H, K, device=dev, dtype=torch.float32) for _ in range(3))
    dlast_part = torch.empty(NC, H, K, device=dev, dtype=torch.float32)
    BKd = min(BK, BWD_DIRECT_KEY_BLOCK)
    kda_direct_bwd_kernel[(NC * cdiv(K, BKd), H)](
        saved["kn"], saved["G"], saved["h"], dh, saved["v_new"], dv, do, dq, dk, dg, dlast_part,
        chunks.indices, chunks.cu_seqlens, scale, H, K, V,
        BT=CHUNK, BK=BKd, BV=min(BV, BWD_DIRECT_BLOCK_V), IEEE=ieee, num_warps=BWD_DIRECT_WARPS,
        num_stages=BWD_DIRECT_STAGES,
    )  # fmt: skip
    BKs = min(BK, BWD_KEY_BLOCK)
    NKB, NS = cdiv(K, BKs), CHUNK // SUB
    kda_key_bwd_kernel[(NC * NKB * NS, H)](
        saved["qn"], saved["kn"], saved["G"], dA_qk, dP, dq, dk, dg, chunks.indices, chunks.cu_seqlens,
        scale, H, K, BT=CHUNK, BC=SUB, BK=BKs, SPAN=DIAG_DOT_SPAN, IEEE=ieee,
        num_warps=BWD_KEY_WARPS, num_stages=BWD_KEY_STAGES,
    )  # fmt: skip
    dA_part = torch.empty(NC, H, NKB, device=dev, dtype=torch.float32) if use_gate else None
    ddt_part = torch.empty(NC, H, K, device=dev, dtype=torch.float32) if use_gate else None
    kda_gate_bwd_kernel[(NC * NKB, H)](
        dg, dlast_part, g, A_log, dt_bias, dA_part, ddt_part, chunks.indices, chunks.cu_seqlens, H, K,
        BT=CHUNK, BK=BKs, GATE=use_gate, num_warps=4,
    )  # fmt: skip
    if use_qk_l2norm:
        dq, dk = _l2norm_bwd(q, dq), _l2norm_bwd(k, dk)
    else:
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    dA_log = dA_part.sum((0, 2)) if use_gate else None
    ddt_bias = ddt_part.sum(0) if use_gate else None
    return dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias


class ChunkKDAFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked KDA kernels on ``[B, T, H, D]`` inputs."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state,
                use_qk_l2norm, use_gate, cu_seqlens):  # fmt: skip
        B, T, H, K = q.shape
        V = v.shape[-1]
        dt = q.dtype
        flat = lambda x, d: x.to(dt).reshape(B * T, H, d).contiguous()  # noqa: E731
        qf, kf, vf = flat(q, K), flat(k, K), flat(v, V)
        gf = g.reshape(B * T, H, K).contiguous()
        bf = beta.reshape(B * T, H).contiguous()
        A_logf = A_log.reshape(H).contiguous() if use_gate else None
        dt_biasf = dt_bias.reshape(H, K).contiguous() if use_gate else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        chunks = _chunks(cu_seqlens, B, T, q.device)
        o, ht, saved = kda_chunk_fwd(
            qf, kf, vf, gf, bf, scale, h0, output_final_state, use_qk_l2norm, use_gate, A_logf, dt_biasf, chunks,
            for_backward=any(ctx.needs_input_grad),
        )
        ctx.save_for_backward(qf, kf, vf, gf, bf, A_logf, dt_biasf, *saved.values())
        ctx.saved_names = list(saved)
        ctx.chunks = chunks
        ctx.meta = (B, T, H, K, V, scale, initial_state is not None, use_qk_l2norm, use_gate)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        ctx.param_shapes = (
            (A_log.shape, A_log.dtype, dt_bias.shape, dt_bias.dtype) if use_gate else None,
            initial_state.dtype if initial_state is not None else None,
        )
        return o.reshape(B, T, H, V), ht

    @staticmethod
    def backward(ctx, do, dht):
        refuse_create_graph("chunk_kda")
        B, T, H, K, V, scale, has_h0, use_qk_l2norm, use_gate = ctx.meta
        qf, kf, vf, gf, bf, A_logf, dt_biasf, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_names, rest))
        dof = do.to(qf.dtype).reshape(B * T, H, V).contiguous()
        dhtf = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias = kda_chunk_bwd(
            dof, dhtf, qf, kf, vf, gf, bf, scale, has_h0, use_qk_l2norm, use_gate, A_logf, dt_biasf,
            ctx.chunks, saved,
        )  # fmt: skip
        q_dt, k_dt, v_dt, g_dt, b_dt = ctx.dtypes
        gate_meta, h0_dtype = ctx.param_shapes
        if use_gate:
            a_shape, a_dt, d_shape, d_dt = gate_meta
            dA_log, ddt_bias = dA_log.reshape(a_shape).to(a_dt), ddt_bias.reshape(d_shape).to(d_dt)
        return (
            dq.reshape(B, T, H, K).to(q_dt),
            dk.reshape(B, T, H, K).to(k_dt),
            dv.reshape(B, T, H, V).to(v_dt),
            dg.reshape(B, T, H, K).to(g_dt),
            dbeta.reshape(B, T, H).to(b_dt),
            dA_log,
            ddt_bias,
            dh0.to(h0_dtype) if dh0 is not None else None,
            None, None, None, None, None,
        )  # fmt: skip


def chunk_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kimi_hf.kernels.kda.chunk_kda` on Triton, for already-validated inputs."""
    K, V = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton KDA kernels take fp16/bf16/fp32 q, got {q.dtype}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"the Triton KDA kernels support head dims up to {MAX_HEAD_DIM}, got K={K}, V={V}")
    scale = K**-0.5 if scale is None else float(scale)
    return ChunkKDAFunction.apply(
        q, k, v, g, beta, A_log, dt_bias, initial_state, scale, output_final_state,
        use_qk_l2norm_in_kernel, use_gate_in_kernel, cu_seqlens,
    )  # fmt: skip
