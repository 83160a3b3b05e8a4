"""KDA Triton kernels on a CUDA GPU: bf16/fp32 vs a float64 reference, long sequences, varlen, decay extremes, decode.

Every check draws fresh random inputs; the float64 plain-torch chunked reference runs on the GPU too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.kda import chunk_kda, fused_recurrent_kda, naive_chunk_kda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


# Relative-error budgets: bf16 inputs/intermediates vs exact fp32 dots.
RTOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _inputs(B, T, H, K, V, N=None, seed=0, decay=(0.0, 3.0), raw_gate=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    lo, hi = decay
    g = rand(B, T, H, K) * 2 if raw_gate else -(lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen, device="cuda"))
    return dict(
        q=rand(B, T, H, K), k=rand(B, T, H, K), v=rand(B, T, H, V), g=g,
        beta=torch.rand(B, T, H, generator=gen, device="cuda"), initial_state=rand(N or B, H, K, V),
    )  # fmt: skip


def _outputs(inputs, params, dtype, grads, backend, **options):
    low = {"q", "k", "v", "beta"}
    cast = lambda n, x: x.to(dtype if (n in low or dtype == torch.float64) else x.dtype)  # noqa: E731
    leaves = {n: cast(n, x).detach().clone().requires_grad_(grads is not None) for n, x in {**inputs, **params}.items()}
    o, s = chunk_kda(**leaves, output_final_state=True, backend=backend, **options)
    out = {"o": o, "final state": s}
    if grads is not None:
        do, ds = grads
        ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
        out.update({f"d{n}": x.grad for n, x in leaves.items()})
    return out


def _check(inputs, dtype, params=None, backward=True, rtol=None, **options):
    params = params or {}
    rtol = rtol or RTOL[dtype]
    # Both sides see the same (rounded) q, k, v, beta: only the kernels' own error is measured.
    inputs = {n: x.to(dtype).float() if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}
    grads = None
    if backward:
        N, H, K, V = inputs["initial_state"].shape
        grads = (torch.randn_like(inputs["v"], dtype=torch.float64), torch.randn(N, H, K, V, device="cuda").double())
    got = _outputs(inputs, params, dtype, grads, "triton", **options)
    ref = _outputs(inputs, params, torch.float64, grads, "torch", **options)
    for name in ref:
        assert_close_rel(got[name], ref[name], rtol * (3 if name.startswith("d") else 1), name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fwd_bwd_vs_fp64(dtype):
    _check(_inputs(2, 1000, 4, 128, 128, seed=1), dtype, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_fused_gate_vs_fp64(dtype):
    cu = torch.tensor([0, 1, 65, 200, 200, 777, 1200], device="cuda", dtype=torch.int32)
    params = dict(A_log=torch.randn(1, 1, 4, 1, device="cuda"), dt_bias=torch.randn(4 * 128, device="cuda"))
    inputs = _inputs(1, 1200, 4, 128, 128, N=6, seed=2, raw_gate=True)
    _check(inputs, dtype, params, cu_seqlens=cu, use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("decay", [(0.0, 1e-4), (0.0, 20.0)], ids=["near-zero", "very-negative"])
def test_decay_extremes(decay):
    _check(_inputs(1, 700, 2, 128, 128, seed=3, decay=decay), torch.bfloat16, use_qk_l2norm_in_kernel=True)


def test_head_dim_256_and_unequal_dims():
    _check(_inputs(1, 300, 2, 256, 256, seed=4), torch.float32, use_qk_l2norm_in_kernel=True)
    _check(_inputs(1, 300, 2, 64, 192, seed=5), torch.bfloat16, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_decay_paths(dtype):
    """Decays strong in one stretch only: in the backward's key kernel both diagonal paths (the dots through the
    middle row and the exact one past ``DIAG_DOT_SPAN``) in one chunk, against float64."""
    mixed = _inputs(1, 700, 2, 128, 128, seed=24)
    mixed["g"][:, 100:300] *= 20 / 3
    _check(mixed, dtype, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("fuse", [0, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_chunk_dots_fuse_level(fuse, dtype, monkeypatch):
    """Each ``CHUNK_DOTS_FUSE`` level, the inference forward (no input needs a gradient: at level 3 the chunk dots
    kernel then stores qn, kn of the flagged chunks only) and fwd+bwd, on ragged sequences with the fused gate and a
    stretch of strong decays (flagged chunks), against float64."""
    from kimi_hf.kernels.kda import chunk

    monkeypatch.setattr(chunk, "CHUNK_DOTS_FUSE", fuse)
    cu = torch.tensor([0, 1, 65, 200, 777, 1200], device="cuda", dtype=torch.int32)
    params = dict(A_log=torch.randn(1, 1, 4, 1, device="cuda"), dt_bias=torch.randn(4 * 128, device="cuda"))
    inputs = _inputs(1, 1200, 4, 128, 128, N=5, seed=7, raw_gate=True)
    inputs["g"][:, 300:500] += 8  # softplus ~8 -> decays beyond CHUNK_DOT_SPAN over a chunk's half
    for backward in (False, True):
        _check(inputs, dtype, params, backward=backward, cu_seqlens=cu, use_gate_in_kernel=True,
               use_qk_l2norm_in_kernel=True)  # fmt: skip


def test_equal_length_layout_is_kept_per_stream_and_not_while_capturing():
    """The chunk layout of an equal-length batch is built once per shape and stream (torch's Stream objects for one
    stream compare equal), again on another stream, and not kept from a CUDA graph capture, whose tensors hold
    nothing until the graph replays."""
    from kimi_hf.kernels.kda.chunk import _chunks

    dev = torch.device("cuda", torch.cuda.current_device())
    first = _chunks(None, 2, 300, dev)
    assert _chunks(None, 2, 300, dev) is first
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = _chunks(None, 2, 300, dev)
    assert other is not first
    side.synchronize()
    assert torch.equal(other.indices, first.indices)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _chunks(None, 2, 300, dev)
    assert captured is not _chunks(None, 2, 300, dev)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.indices, first.indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_sequence_forward(dtype):
    """T = 32K, forward only, vs the float64 chunked reference."""
    inputs = _inputs(1, 32768, 2, 128, 128, seed=6)
    inputs["k"] = F.normalize(inputs["k"], dim=-1)
    inputs["q"] = F.normalize(inputs["q"], dim=-1)
    o, s = chunk_kda(**{n: x.to(dtype) if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()},
                     output_final_state=True)  # fmt: skip
    low = {n: x.to(dtype).double() if n in ("q", "k", "v", "beta") else x.double() for n, x in inputs.items()}
    o_ref, s_ref = naive_chunk_kda(**low, output_final_state=True)
    assert_close_rel(o, o_ref, RTOL[dtype], "o")
    assert_close_rel(s, s_ref, RTOL[dtype], "final state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_fused_recurrent(dtype):
    cu = torch.tensor([0, 1, 2, 4], device="cuda", dtype=torch.int32)
    inputs = _inputs(1, 4, 8, 128, 128, N=3, seed=7, raw_gate=True)
    params = dict(A_log=torch.randn(8, device="cuda"), dt_bias=torch.randn(8, 128, device="cuda"))
    options = dict(cu_seqlens=cu, use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)
    low = {n: x.to(dtype) if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}
    o, s = fused_recurrent_kda(**low, **params, output_final_state=True, **options)
    ref = {n: x.double() for n, x in low.items()}
    o_ref, s_ref = fused_recurrent_kda(**ref, **{n: x.double() for n, x in params.items()}, output_final_state=True,
                                       backend="torch", **options)  # fmt: skip
    assert_close_rel(o, o_ref, RTOL[dtype], "o")
    assert_close_rel(s, s_ref, RTOL[dtype], "final state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 32, 64])
def test_decode_steps_in_place_each_tiling(dtype, batch):
    """Three one-token steps updating the state in place, at the batch sizes of each default tiling (B1: 8 state
    columns per program; B32/B64 at H32: 64 columns, 4 warps), against the float64 torch path."""
    H, K = 32, 128
    inputs = _inputs(batch, 3, H, K, K, seed=11 + batch, raw_gate=True)
    params = dict(A_log=torch.randn(H, device="cuda"), dt_bias=torch.randn(H, K, device="cuda"))
    options = dict(use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True)
    low = {n: x.to(dtype) if n in ("q", "k", "v", "beta") else x for n, x in inputs.items()}
    state = low.pop("initial_state").clone()
    ref_state = state.double()
    for t in range(3):
        step = {n: x[:, t : t + 1] for n, x in low.items()}
        o, s = fused_recurrent_kda(**step, **params, initial_state=state, inplace_final_state=True, **options)
        assert s is state
        o_ref, ref_state = fused_recurrent_kda(
            **{n: x.double() for n, x in step.items()}, **{n: x.double() for n, x in params.items()},
            initial_state=ref_state, output_final_state=True, backend="torch", **options,
        )  # fmt: skip
        assert_close_rel(o, o_ref, RTOL[dtype], f"o at step {t}")
        assert_close_rel(state, ref_state, RTOL[dtype], f"state after step {t}")
