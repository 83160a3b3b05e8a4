"""Triton KDA decode kernel (kimi_hf.kernels.kda.fused_recurrent) vs token-loop references."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.kda import fused_recurrent_kda
from kimi_hf.kernels.kda.fused_recurrent import fused_recurrent_kda_fwd


def _loop_kda(q, k, v, g, beta, scale, state):
    """Independent fp64 oracle for one sequence: q, k, g [T, H, K], v [T, H, V], beta [T, H], state [H, K, V]."""
    S = state.double().clone()
    outs = []
    for t in range(q.shape[0]):
        S = S * g[t].double().exp()[..., None]
        u = beta[t].double()[:, None] * (v[t].double() - torch.einsum("hk,hkv->hv", k[t].double(), S))
        S = S + k[t].double()[..., None] * u[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t].double() * scale, S))
    return torch.stack(outs) if outs else v.new_zeros(v.shape, dtype=torch.float64), S


def _inputs(B, T, H, K, V, raw_gate, num_states, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.randn(B, T, H, K, generator=gen) if raw_gate else F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 3)
    beta = torch.rand(B, T, H, generator=gen)
    A_log, dt_bias = torch.randn(H, generator=gen), torch.randn(H * K, generator=gen)
    h0 = torch.randn(num_states, H, K, V, generator=gen)
    return q, k, v, g, beta, A_log, dt_bias, h0


def _prologue(q, k, g, A_log, dt_bias, l2norm, gate):
    """What the kernel fuses, in fp64 (fla's l2norm epsilon 1e-6)."""
    q, k, g = q.double(), k.double(), g.double()
    if l2norm:
        q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    if gate:
        H, K = q.shape[-2:]
        g = -A_log.double().exp()[:, None] * F.softplus(g + dt_bias.double().view(H, K))
    return q, k, g


def _check(device, dtype, B, T, H, K, V, lengths, l2norm, gate, use_h0, inplace, rtol, block_v=None):
    num_states = B if lengths is None else len(lengths)
    total = T if lengths is None else sum(lengths)
    q, k, v, g, beta, A_log, dt_bias, h0 = _inputs(B, total, H, K, V, gate, num_states)
    if not l2norm:
        k = F.normalize(k, dim=-1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device) if lengths is not None else None
    args = [t.to(device, dtype) for t in (q, k, v)] + [g.to(device), beta.to(device, dtype)]
    state = h0.to(device).clone() if use_h0 else None
    scale = K**-0.5
    o, final = fused_recurrent_kda_fwd(
        *args, scale, state, True, l2norm, gate, False, A_log.to(device) if gate else None,
        dt_bias.to(device) if gate else None, cu, inplace, block_v=block_v,
    )  # fmt: skip
    assert o.dtype == dtype and o.shape == v.shape
    if inplace:
        assert final is state
    qd, kd, gd = _prologue(*(t.to(dtype).double() for t in (q, k)), g, A_log, dt_bias, l2norm, gate)
    vd, bd = v.to(dtype).double(), beta.to(dtype).double()
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()] if lengths is not None else None
    for n in range(num_states):
        b, sl = (0, slice(bounds[n], bounds[n + 1])) if lengths is not None else (n, slice(None))
        start = h0[n] if use_h0 else torch.zeros(H, K, V)
        o_ref, s_ref = _loop_kda(qd[b, sl], kd[b, sl], vd[b, sl], gd[b, sl], bd[b, sl], scale, start)
        if o_ref.numel():
            assert_close_rel(o[b, sl], o_ref, rtol, f"o of sequence {n}")
        assert_close_rel(final[n], s_ref, rtol, f"final state of sequence {n}")


_CASES = {
    "plain": dict(B=2, T=3, H=2, K=16, V=16, lengths=None, l2norm=False, gate=False, use_h0=False, inplace=False),
    "fused_prologue": dict(B=2, T=3, H=2, K=16, V=32, lengths=None, l2norm=True, gate=True, use_h0=True, inplace=False),
    "varlen_ragged": dict(
        B=1, T=0, H=2, K=20, V=12, lengths=[2, 0, 5, 1], l2norm=True, gate=True, use_h0=True, inplace=False
    ),
    "decode_inplace": dict(B=3, T=1, H=2, K=32, V=48, lengths=None, l2norm=True, gate=False, use_h0=True, inplace=True),
    # 1024 head states: the wide default tiling (64 state columns per program)
    "decode_wide_tiling": dict(
        B=64, T=1, H=16, K=16, V=64, lengths=None, l2norm=True, gate=True, use_h0=True, inplace=True
    ),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_triton_matches_loop_interpreter(name):
    """Under the interpreter: fp32, tiny; empty sequences, non-power-of-two K and V, in-place state."""
    _check("cpu", torch.float32, **_CASES[name], rtol=1e-5)


def test_public_op_triton_matches_torch_path_interpreter():
    """Through kimi_hf.kernels.kda.fused_recurrent_kda: Triton vs the other helper's torch path."""
    q, k, v, g, beta, A_log, dt_bias, h0 = _inputs(1, 6, 2, 16, 16, True, 2, seed=1)
    cu = torch.tensor([0, 4, 6])
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
              A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu)
    o, s = fused_recurrent_kda(q, k, v, g, beta, backend="triton", **kw)
    o_ref, s_ref = fused_recurrent_kda(q, k, v, g, beta, backend="torch", **kw)
    assert_close_rel(o, o_ref, 1e-5, "o")
    assert_close_rel(s, s_ref, 1e-5, "final state")


def test_tensor_scale_as_in_chunk_kda_interpreter():
    """A 0-d tensor ``scale`` (taken by chunk_kda and the torch path) stopped the Triton decode kernel with a type
    error about a pointer operand."""
    q, k, v, g, beta, _, _, h0 = _inputs(1, 3, 2, 16, 8, False, 1, seed=3)
    for backend in ("torch", "triton"):
        o, _ = fused_recurrent_kda(q, k, v, g, beta, scale=torch.tensor(0.3), initial_state=h0, backend=backend)
        o_ref, _ = fused_recurrent_kda(q, k, v, g, beta, scale=0.3, initial_state=h0, backend="torch")
        assert_close_rel(o, o_ref, 1e-5, f"o ({backend})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_beta_logits_take_the_sigmoid_in_kernel(backend):
    """``use_beta_sigmoid_in_kernel``: beta given as logits (fla's option) equals sigmoid(beta) given, against the
    fp64 loop (the Triton kernel applies the sigmoid itself)."""
    q, k, v, g, _, A_log, dt_bias, h0 = _inputs(1, 5, 2, 16, 16, True, 1, seed=3)
    logits = torch.randn(1, 5, 2, generator=torch.Generator().manual_seed(4)) * 3
    o, s = fused_recurrent_kda(
        q, k, v, g, logits, A_log, dt_bias, None, h0, True, True, True, True, backend=backend
    )  # fmt: skip
    qd, kd, gd = _prologue(q, k, g, A_log, dt_bias, True, True)
    o_ref, s_ref = _loop_kda(qd[0], kd[0], v[0], gd[0], logits[0].double().sigmoid(), 16**-0.5, h0[0])
    assert_close_rel(o[0], o_ref, 1e-5, "o")
    assert_close_rel(s[0], s_ref, 1e-5, "final state")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("name", list(_CASES))
def test_triton_matches_loop_gpu(name, dtype, rtol):
    case = dict(_CASES[name], K=128, V=128, H=4)
    _check("cuda", dtype, **case, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("block_v", [8, 16, 32, 64])
@pytest.mark.parametrize("K", [64, 256])
def test_triton_tiles_and_wide_heads_gpu(K, block_v):
    _check("cuda", torch.bfloat16, B=2, T=2, H=3, K=K, V=128, lengths=None, l2norm=True, gate=True, use_h0=True,
           inplace=True, rtol=2e-2, block_v=block_v)


@pytest.mark.gpu
def test_decode_step_cuda_graph():
    """A captured decode step with the state updated in place; two replays = two steps of the loop."""
    B, H, K, V = 4, 8, 128, 128
    q, k, v, g, beta, A_log, dt_bias, h0 = (t.cuda() for t in _inputs(B, 1, H, K, V, True, B))
    q, k, v, beta = (t.bfloat16() for t in (q, k, v, beta))
    state = h0.clone()
    step = lambda: fused_recurrent_kda(  # noqa: E731
        q, k, v, g, beta, initial_state=state, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        A_log=A_log, dt_bias=dt_bias, inplace_final_state=True,
    )
    fused_recurrent_kda(q, k, v, g, beta, initial_state=h0.clone(), use_qk_l2norm_in_kernel=True,
                        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, inplace_final_state=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = step()
    graph.replay()
    graph.replay()
    qd, kd, gd = _prologue(q.double(), k.double(), g, A_log, dt_bias, True, True)
    for n in range(B):
        s_ref = h0[n].double()
        for _ in range(2):
            o_ref, s_ref = _loop_kda(qd[n], kd[n], v[n], gd[n], beta[n], K**-0.5, s_ref)
        assert_close_rel(state[n], s_ref, 1e-4, "state after two replays")
        assert_close_rel(o[n], o_ref, 2e-2, "o of the second replay")
