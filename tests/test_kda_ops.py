"""KDA plain-torch references and public dispatch (torch backend): math, packing, options, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.kda import chunk_kda, fused_recurrent_kda, kda_gate, naive_chunk_kda, naive_recurrent_kda


def make_inputs(B=2, T=70, H=2, K=16, V=8, dtype=torch.float32, decay=3.0, seed=0, state=True):
    """Random KDA inputs: unit-norm keys (as in the model), log-decays in (-decay, 0], beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q = rand(B, T, H, K)
    k = F.normalize(rand(B, T, H, K), dim=-1)
    v = rand(B, T, H, V)
    g = -decay * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = rand(B, H, K, V).float() if state else None
    if h0 is not None and dtype == torch.float64:
        h0 = h0.double()
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("T", [1, 63, 64, 130])
def test_chunk_equals_recurrent(dtype, rtol, T):
    q, k, v, g, beta, h0 = make_inputs(T=T, dtype=dtype, seed=T)
    o_c, s_c = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o_c.dtype == dtype and s_c.dtype == dtype
    assert_close_rel(o_c, o_r, rtol, "o")
    assert_close_rel(s_c, s_r, rtol, "final state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_fla_naive(dtype):
    fla_naive = pytest.importorskip("fla.ops.kda.naive")
    q, k, v, g, beta, h0 = make_inputs(T=100, dtype=dtype, seed=1)
    o_fla, s_fla = fla_naive.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    # fla's reference always computes in fp32.
    assert_close_rel(o, o_fla, 1e-5, "o vs fla")
    assert_close_rel(s, s_fla, 1e-5, "final state vs fla")


def test_no_initial_state_and_no_final_state():
    q, k, v, g, beta, _ = make_inputs(T=20, state=False)
    o, s = naive_chunk_kda(q, k, v, g, beta)
    assert s is None
    o0, _ = naive_recurrent_kda(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 16, 8))
    assert_close_rel(o, o0, 1e-5, "o")


def test_strong_decay_stays_finite():
    """g ~ -U(0, 20) sums to about -640 over a chunk: exp(G) alone would underflow, exp(-G) overflow."""
    q, k, v, g, beta, h0 = make_inputs(T=150, decay=20.0, dtype=torch.float64, seed=3)
    o_c, s_c = naive_chunk_kda(q.float(), k.float(), v.float(), g.float(), beta.float(), None, h0.float(), True)
    o_r, s_r = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close_rel(o_c, o_r, 1e-5, "o")
    assert_close_rel(s_c, s_r, 1e-5, "final state")


@pytest.mark.parametrize("fn", [naive_chunk_kda, naive_recurrent_kda])
def test_cu_seqlens_equals_separate_runs(fn):
    lengths = [5, 64, 0, 71]
    cu = torch.tensor([0, 5, 69, 69, 140], dtype=torch.int32)
    q, k, v, g, beta, _ = make_inputs(B=1, T=140, seed=4, state=False)
    h0 = torch.randn(len(lengths), 2, 16, 8)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(bos, eos)
        o_n, s_n = naive_recurrent_kda(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=h0[n : n + 1], output_final_state=True
        )
        if eos > bos:
            assert_close_rel(o[:, sl], o_n, 1e-5, f"o of sequence {n}")
        assert_close_rel(s[n : n + 1], s_n, 1e-5, f"state of sequence {n}")


@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda])
def test_l2norm_and_gate_options_equal_doing_it_outside(op):
    q, k, v, g_raw, beta, h0 = make_inputs(T=40, seed=5)
    H, K = 2, 16
    g_raw = torch.randn_like(g_raw) * 2
    k = k * 3.0  # not unit-norm, so the in-op normalisation matters
    A_log = torch.randn(1, 1, H, 1)
    dt_bias = torch.randn(H * K)
    o, s = op(
        q, k, v, g_raw, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, backend="torch",
    )  # fmt: skip
    g = -A_log.reshape(H, 1).exp() * F.softplus(g_raw + dt_bias.reshape(H, K))
    qn = q / torch.sqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    kn = k / torch.sqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    o_ref, s_ref = naive_recurrent_kda(qn, kn, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close_rel(o, o_ref, 1e-5, "o")
    assert_close_rel(s, s_ref, 1e-5, "final state")
    # kda_gate accepts both parameter layouts.
    assert_close_rel(kda_gate(g_raw, A_log.reshape(H), dt_bias.reshape(H, K)), g, 1e-6, "kda_gate")


def test_kda_gate_bias_is_optional_as_in_fla():
    """fla's gate functions take ``dt_bias=None`` (no bias), as our ops' fused gate does; kda_gate refused it."""
    _, _, _, g_raw, _, _ = make_inputs(T=6, seed=18)
    A_log = torch.randn(2)
    g = kda_gate(g_raw, A_log)
    assert_close_rel(g, kda_gate(g_raw, A_log, torch.zeros(2, 16)), 0, "no bias = a zero bias")
    fla_gate = pytest.importorskip("fla.ops.kda.gate")
    assert_close_rel(g, fla_gate.naive_kda_gate(g_raw, A_log), 1e-6, "fla's naive_kda_gate")


def test_kda_gate_takes_any_leading_dims_as_fla():
    """fla's gate functions take g ``[..., H, K]``; kda_gate refused a decode step's ``[B, H, K]`` and packed
    ``[N, H, K]`` rows (only ``[B, T, H, K]``)."""
    _, _, _, g_raw, _, _ = make_inputs(T=5, seed=20)
    B, T, H, K = g_raw.shape
    A_log, dt_bias = torch.randn(1, 1, H, 1), torch.randn(H * K)
    full = kda_gate(g_raw, A_log, dt_bias)
    assert_close_rel(kda_gate(g_raw[:, -1], A_log, dt_bias), full[:, -1], 0, "[B, H, K]")
    assert_close_rel(kda_gate(g_raw.reshape(B * T, H, K), A_log, dt_bias), full.reshape(B * T, H, K), 0, "[N, H, K]")
    with pytest.raises(ValueError, match=r"g must be \[..., H, K\], got \(16,\)"):
        kda_gate(g_raw[0, 0, 0], A_log, dt_bias)
    fla_gate = pytest.importorskip("fla.ops.kda.gate")
    assert_close_rel(kda_gate(g_raw[:, -1], A_log, dt_bias), fla_gate.naive_kda_gate(g_raw[:, -1], A_log, dt_bias),
                     1e-6, "fla's naive_kda_gate")  # fmt: skip


def test_public_ops_dispatch_to_reference_on_cpu():
    q, k, v, g, beta, h0 = make_inputs(T=30, seed=6)
    o_c, s_c = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_r, s_r = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close_rel(o_c, o_r, 1e-5, "o")
    assert_close_rel(s_c, s_r, 1e-5, "final state")


def test_low_precision_inputs_return_input_dtype():
    q, k, v, g, beta, h0 = make_inputs(T=30, seed=7)
    o, s = chunk_kda(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16(), initial_state=h0,
                     output_final_state=True)  # fmt: skip
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, _ = naive_recurrent_kda(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), g,
                                   beta.bfloat16().float(), initial_state=h0)  # fmt: skip
    assert_close_rel(o, o_ref, 1e-2, "bf16 o")


def test_inplace_final_state():
    q, k, v, g, beta, h0 = make_inputs(T=3, seed=8)
    expected_o, expected_s = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True)
    state = h0.clone()
    o, s = fused_recurrent_kda(q, k, v, g, beta, initial_state=state, inplace_final_state=True)
    assert s is state
    assert_close_rel(o, expected_o, 1e-6, "o")
    assert_close_rel(state, expected_s, 1e-6, "state written in place")


def test_gradcheck_chunk_reference_fp64():
    q, k, v, g, beta, h0 = make_inputs(B=1, T=7, H=1, K=3, V=2, dtype=torch.float64, seed=9)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def fn(q, k, v, g, beta, h0):
        o, s = naive_chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=3)
        return o, s

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_fused_gate_and_l2norm_fp64():
    q, k, v, g, beta, h0 = make_inputs(B=1, T=4, H=1, K=3, V=2, dtype=torch.float64, seed=10)
    A_log = torch.randn(1, dtype=torch.float64)
    dt_bias = torch.randn(3, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, A_log, dt_bias)]

    def fn(q, k, v, g, beta, A_log, dt_bias):
        return chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                         A_log=A_log, dt_bias=dt_bias, backend="torch")[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, inputs)


def _bad(**changes):
    q, k, v, g, beta, h0 = make_inputs(T=8, seed=11)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(k=torch.randn(2, 8, 2, 15)), "k must have q's shape"),
        (dict(q=torch.randn(2, 8, 32)), "q must be"),
        (dict(v=torch.randn(2, 8, 3, 8)), "v must be"),
        (dict(g=torch.randn(2, 8, 2, 8)), "g must be"),
        (dict(beta=torch.rand(2, 8, 2, 1)), "beta must be"),
        (dict(beta=torch.ones(2, 8, 2, dtype=torch.int64)), "beta must be a floating"),
        (dict(initial_state=torch.zeros(3, 2, 16, 8)), "initial_state must be"),
        (dict(initial_state=torch.zeros(2, 2, 16, 8, dtype=torch.int32)), "initial_state must be a floating"),
        (dict(initial_state=torch.zeros(2, 2, 16, 8, device="meta")), "initial_state is on meta but q is on cpu"),
        (dict(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), "batch size must be 1"),
        (dict(use_gate_in_kernel=True), r"needs A_log \(dt_bias is optional, as in fla\)"),
        (dict(A_log=torch.zeros(2)), "only used with use_gate_in_kernel"),
        (dict(use_gate_in_kernel=True, A_log=torch.zeros(3), dt_bias=torch.zeros(32)), "A_log must have shape"),
        (dict(use_gate_in_kernel=True, A_log=torch.zeros(2), dt_bias=torch.zeros(31)), "dt_bias must have shape"),
        (dict(backend="cuda"), "unknown kernel backend"),
    ],
)
def test_bad_inputs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        chunk_kda(**_bad(**changes))


def test_positional_arguments_follow_flas_order():
    """fla 0.6.0 orders ``fused_recurrent_kda``'s arguments (A_log, dt_bias, scale, initial_state, ...) unlike its
    ``chunk_kda`` (scale, initial_state, ...); ours follow each, and take the rest by keyword only."""
    import inspect

    q, k, v, g, beta, h0 = make_inputs(B=1, T=9, seed=13)
    o, s = fused_recurrent_kda(q, k, v, g, beta, None, None, 0.5, h0, True)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True)
    assert_close_rel(o, o_ref, 1e-6, "o, positional")
    assert_close_rel(s, s_ref, 1e-6, "final state, positional")
    o, s = chunk_kda(q, k, v, g, beta, 0.5, h0, True)
    assert_close_rel(o, o_ref, 1e-5, "chunk o, positional")
    fla_kda = pytest.importorskip("fla.ops.kda")
    pairs = ((fused_recurrent_kda, fla_kda.fused_recurrent_kda, 13), (chunk_kda, fla_kda.chunk_kda, 11))
    for ours, theirs, shared in pairs:
        names = list(inspect.signature(ours).parameters)
        assert names[:shared] == list(inspect.signature(theirs).parameters)[:shared], ours.__name__
        kinds = [p.kind for p in inspect.signature(ours).parameters.values()]
        assert set(kinds[shared:]) == {inspect.Parameter.KEYWORD_ONLY}, ours.__name__


def test_naive_chunk_takes_flas_positional_chunk_size():
    """fla's ``naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)``: ours had
    ``cu_seqlens`` in chunk_size's place, so a ported positional call failed on a 'cu_seqlens' it never passed."""
    q, k, v, g, beta, h0 = make_inputs(B=1, T=40, seed=21)
    o, s = naive_chunk_kda(q, k, v, g, beta, None, h0, True, 16)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close_rel(o, o_ref, 1e-5, "o")
    assert_close_rel(s, s_ref, 1e-5, "final state")
    packed = naive_chunk_kda(q, k, v, g, beta, None, h0[[0, 0]], True, cu_seqlens=torch.tensor([0, 25, 40]))[0]
    assert_close_rel(packed[:, :25], o[:, :25], 1e-5, "first packed sequence")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunk_beta_logits_equal_sigmoid_given(backend):
    """chunk_kda's ``use_beta_sigmoid_in_kernel``: logits give what their sigmoid gives, and the logits' gradient is
    the beta gradient times sigmoid'."""
    q, k, v, g, _, h0 = make_inputs(B=1, T=70, seed=15)
    logits = torch.randn(1, 70, 2, generator=torch.Generator().manual_seed(16)).mul(3).requires_grad_()
    o, _ = chunk_kda(q, k, v, g, logits, None, h0, False, False, False, True, backend=backend)
    beta = logits.detach().sigmoid().requires_grad_()
    o_ref, _ = chunk_kda(q, k, v, g, beta, initial_state=h0, backend="torch")
    assert_close_rel(o, o_ref, 1e-5, "o")
    do = torch.randn_like(o)
    (d_logits,) = torch.autograd.grad(o, logits, do)
    (d_beta,) = torch.autograd.grad(o_ref, beta, do)
    assert_close_rel(d_logits, d_beta * beta * (1 - beta), 1e-5, "d logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda])
def test_low_precision_initial_state_is_read_as_fp32(op, backend):
    """fla takes a bf16 initial state (its chunk_kda example passes one); it was refused. The op reads it as fp32:
    the same results as its fp32 copy, an fp32 final state, and the state's gradient in bf16."""
    q, k, v, g, beta, h0 = make_inputs(B=1, T=5, seed=17)
    h0_bf16 = h0.bfloat16().requires_grad_()
    h0_fp32 = h0_bf16.detach().float().requires_grad_()
    with torch.set_grad_enabled(op is chunk_kda or backend == "torch"):  # Triton's recurrence is forward-only
        o, s = op(q, k, v, g, beta, initial_state=h0_bf16, output_final_state=True, backend=backend)
        o_ref, s_ref = op(q, k, v, g, beta, initial_state=h0_fp32, output_final_state=True, backend="torch")
    assert s.dtype == torch.float32
    assert_close_rel(o, o_ref, 1e-5, "o")
    assert_close_rel(s, s_ref, 1e-5, "final state")
    if o.requires_grad:
        (o.sum() + s.sum()).backward()
        (o_ref.sum() + s_ref.sum()).backward()
        assert h0_bf16.grad.dtype == torch.bfloat16
        assert_close_rel(h0_bf16.grad.float(), h0_fp32.grad, 1e-2, "d initial_state")


def test_inplace_final_state_refuses_autograd():
    """The in-place decode overwrites the state the backward would read: refused under autograd, on either path."""
    q, k, v, g, beta, h0 = make_inputs(B=1, T=1, seed=14)
    with pytest.raises(ValueError, match="overwrites initial_state, which the backward needs"):
        fused_recurrent_kda(q.requires_grad_(), k, v, g, beta, initial_state=h0, inplace_final_state=True)
    with torch.no_grad():
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, inplace_final_state=True)


def test_bad_cu_seqlens_and_inplace_raise():
    q, k, v, g, beta, _ = make_inputs(B=1, T=8, seed=12, state=False)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5, 4, 8]))
    with pytest.raises(ValueError, match="int32 or int64"):
        chunk_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="needs an initial_state"):
        fused_recurrent_kda(q, k, v, g, beta, inplace_final_state=True)
    with pytest.raises(ValueError, match="contiguous fp32"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=torch.zeros(1, 2, 8, 16).transpose(-1, -2),
                            inplace_final_state=True)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_size"):
        naive_chunk_kda(q, k, v, g, beta, chunk_size=0)


def test_triton_forced_on_cpu_names_the_environment_variable(monkeypatch):
    """A call that passed no backend, forced to Triton by KIMI_HF_KERNEL_BACKEND, was told that backend='triton'
    needs CUDA tensors: the error must name the variable that asked for it."""
    import kimi_hf.kernels._backend as backend_module

    q, k, v, g, beta, _ = make_inputs(B=1, T=3, seed=19, state=False)
    monkeypatch.setattr(backend_module, "_triton_interpreter_on", lambda: False)  # as on a CPU machine without it
    monkeypatch.setenv(backend_module.BACKEND_ENV_VAR, "triton")
    with pytest.raises(ValueError, match="KIMI_HF_KERNEL_BACKEND='triton' needs CUDA tensors"):
        chunk_kda(q, k, v, g, beta)
    with pytest.raises(ValueError, match="^backend='triton' needs CUDA tensors"):
        chunk_kda(q, k, v, g, beta, backend="triton")


def test_automatic_backend_sends_fp64_cuda_tensors_to_the_references(monkeypatch):
    """Triton was picked for every CUDA tensor: chunk_kda then refused fp64 (a float64 model on a GPU stopped in its
    first KDA layer) and the decode, conv and norm kernels computed fp64 inputs in fp32. Only the device and dtype
    are read, so a stand-in for a CUDA tensor shows the choice on CPU."""
    from types import SimpleNamespace

    from kimi_hf.kernels import BACKEND_ENV_VAR, resolve_backend

    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    for dtype, want in ((torch.float64, "torch"), (torch.float32, "triton"), (torch.bfloat16, "triton")):
        cuda_tensor = SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))
        assert resolve_backend(None, cuda_tensor) == want, dtype
    # asked for explicitly, Triton is still used (the ops then refuse or compute in fp32, as documented)
    assert resolve_backend("triton", SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "triton"
