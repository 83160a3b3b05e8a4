"""Short causal depthwise conv (+ SiLU): reference vs torch's conv1d, varlen, states, decode, Triton."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.conv import (
    causal_conv1d,
    causal_conv1d_update,
    causal_conv1d_update_group,
    naive_causal_conv1d,
    naive_causal_conv1d_update,
)


def _conv1d_oracle(x, weight, bias, activation, history=None):
    """Independent oracle: torch's grouped conv1d over [history, x] for one batch, in float64."""
    width = weight.shape[-1]
    xt = x.double().transpose(1, 2)  # [B, D, T]
    if history is None:
        xt = F.pad(xt, (width - 1, 0))
    else:
        xt = torch.cat([history.double()[:, :, 1:], xt], dim=-1)
    z = F.conv1d(xt, weight.double().reshape(weight.shape[0], 1, width), bias.double() if bias is not None else None,
                 groups=weight.shape[0])
    z = z.transpose(1, 2)
    return F.silu(z) if activation == "silu" else z


def _inputs(batch, length, dim, width, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=gen, dtype=dtype)
    w = torch.randn(dim, width, generator=gen, dtype=dtype) / width**0.5
    b = torch.randn(dim, generator=gen, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_conv1d(activation, bias):
    x, w, b = _inputs(2, 11, 6, 4, bias=bias)
    y, _ = causal_conv1d(x, w, b, activation=activation, backend="torch")
    assert_close_rel(y, _conv1d_oracle(x, w, b, activation), 1e-6, "y")
    h = torch.randn(2, 6, 4)
    y, _ = causal_conv1d(x, w, b, activation=activation, initial_state=h, backend="torch")
    assert_close_rel(y, _conv1d_oracle(x, w, b, activation, h), 1e-6, "y with initial state")


def test_checkpoint_weight_layout_accepted():
    x, w, b = _inputs(1, 5, 6, 4)
    y1, _ = causal_conv1d(x, w, b, backend="torch")
    y2, _ = causal_conv1d(x, w.unsqueeze(1), b, backend="torch")
    assert torch.equal(y1, y2)


def test_final_state_continues_prefill_and_decode():
    x, w, b = _inputs(2, 13, 6, 4)
    y_full, s_full = causal_conv1d(x, w, b, output_final_state=True, backend="torch")
    y1, s1 = causal_conv1d(x[:, :5], w, b, output_final_state=True, backend="torch")
    y2, s2 = causal_conv1d(x[:, 5:10], w, b, initial_state=s1, output_final_state=True, backend="torch")
    state = s2.clone()
    ys = [causal_conv1d_update(x[:, t], state, weight=w, bias=b, backend="torch")[0] for t in range(10, 13)]
    assert_close_rel(torch.cat([y1, y2, torch.stack(ys, 1)], 1), y_full, 1e-6, "chunked + decode")
    assert_close_rel(state, s_full, 0, "state after decode")
    assert_close_rel(s_full, x[:, -4:].transpose(1, 2), 0, "final state = last W inputs")


def test_short_sequence_state_keeps_zeros_or_history():
    x, w, b = _inputs(1, 2, 3, 4)
    _, s = causal_conv1d(x, w, b, output_final_state=True, backend="torch")
    assert torch.equal(s[0, :, :2], torch.zeros(3, 2)) and torch.equal(s[0, :, 2:], x[0].t())
    h = torch.randn(1, 3, 4)
    _, s = causal_conv1d(x, w, b, initial_state=h, output_final_state=True, backend="torch")
    assert torch.equal(s[0, :, :2], h[0, :, 2:]) and torch.equal(s[0, :, 2:], x[0].t())


def test_varlen_matches_separate_sequences():
    lengths = [3, 1, 7, 2]
    _, w, b = _inputs(1, 1, 5, 4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randn(1, n, 5, generator=gen) for n in lengths]
    init = torch.randn(len(lengths), 5, 4, generator=gen)
    cu = torch.tensor([0, 3, 4, 11, 13])
    y, s = causal_conv1d(torch.cat(seqs, 1), w, b, initial_state=init, output_final_state=True, cu_seqlens=cu,
                         backend="torch")
    for n, seq in enumerate(seqs):
        y_n, s_n = causal_conv1d(seq, w, b, initial_state=init[n : n + 1], output_final_state=True, backend="torch")
        assert_close_rel(y[:, cu[n] : cu[n + 1]], y_n, 1e-6, f"y of sequence {n}")
        assert_close_rel(s[n : n + 1], s_n, 0, f"state of sequence {n}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_takes_and_returns_flas_layouts(backend):
    """fla's causal_conv1d_update returns ``(y, cache)`` (ours returned y alone: ``y, _ = ...`` unpacked y's rows,
    silently at N = 2) and takes one token per sequence as [N, D], [N, 1, D] or [1, N, D] (the last was refused)."""
    x, w, b = _inputs(2, 1, 6, 4)
    state = torch.randn(2, 6, 4)
    ref_state = state.clone()
    ref = naive_causal_conv1d_update(x[:, 0], ref_state, w, b, "silu")
    for tokens in (x[:, 0], x, x.transpose(0, 1)):
        cache = state.clone()
        y, returned = causal_conv1d_update(tokens, cache, None, w, b, "silu", backend)
        assert returned is cache and y.shape == tokens.shape
        assert_close_rel(y.reshape(2, 6), ref, 1e-6, f"y of {tuple(tokens.shape)}")
        assert_close_rel(cache, ref_state, 0, f"state after {tuple(tokens.shape)}")


def test_reference_gradcheck():
    x, w, b = _inputs(1, 6, 3, 3, dtype=torch.float64)
    h = torch.randn(2, 3, 3, dtype=torch.float64)
    cu = torch.tensor([0, 2, 6])
    args = [t.requires_grad_() for t in (x, w, b, h)]

    def fn(x, w, b, h):
        y, s = naive_causal_conv1d(x, w, b, "silu", h, True, cu)
        return y, s

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4, 6)), "x must be"),
        (dict(weight=torch.randn(5, 4)), "weight must be"),
        (dict(bias=torch.randn(5)), "bias must be"),
        (dict(activation="gelu"), "activation"),
        (dict(initial_state=torch.randn(2, 6, 3)), "initial_state"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4])), "B == 1"),
        (dict(cu_seqlens=torch.tensor([0.0, 4.0])), "cu_seqlens"),
        (dict(x=torch.randn(1, 4, 6), cu_seqlens=torch.tensor([0, 3])), r"rise from 0 to T=4, got \[0, 3\]"),
        (dict(x=torch.randn(1, 4, 6), cu_seqlens=torch.tensor([0, 3, 2, 4])), r"got \[0, 3, 2, 4\]"),
        (dict(x=torch.ones(2, 4, 6, dtype=torch.int64)), "floating-point tensor, got torch.int64"),
        # these three raised AttributeError (a list) or reached the kernels (another device's state)
        (dict(x=torch.randn(1, 4, 6), cu_seqlens=[0, 4]), r"cu_seqlens must be a 1-D int32/int64 .* got \[0, 4\]"),
        # the Triton path numbered rows in int16, wrapping past 32767 tokens
        (dict(x=torch.randn(1, 4, 6), cu_seqlens=torch.tensor([0, 4], dtype=torch.int16)), "got torch.int16"),
        (dict(initial_state=[0.0]), r"initial_state must be \[N, D, W\] = \(2, 6, 4\), got \[0.0\]"),
        (dict(initial_state=torch.zeros(2, 6, 4, device="meta")), "on x's device cpu, got torch.float32 on meta"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(x=torch.randn(2, 4, 6), weight=torch.randn(6, 4), bias=None, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args)


def test_triton_tokens_past_last_sequence_stay_in_bounds():
    """cu_seqlens ending before T (not checked, to avoid a host sync) must not read out of bounds."""
    from kimi_hf.kernels.conv.triton_kernels import _seq_ids

    assert _seq_ids(torch.tensor([0, 2, 2, 4]), 6).tolist() == [0, 0, 2, 2, 2, 2]
    x, w, b = _inputs(1, 6, 4, 4)
    y, s = causal_conv1d(x, w, b, output_final_state=True, cu_seqlens=torch.tensor([0, 2, 4]), backend="triton")
    y_ref, s_ref = causal_conv1d(x[:, :4], w, b, output_final_state=True, cu_seqlens=torch.tensor([0, 2, 4]),
                                 backend="torch")
    assert_close_rel(y[:, :4], y_ref, 1e-5, "y of the described sequences")
    assert_close_rel(s, s_ref, 0, "final states")


def test_update_bad_input_raises():
    with pytest.raises(ValueError, match="one token"):
        causal_conv1d_update(torch.randn(2, 3, 6), torch.randn(2, 6, 4), weight=torch.randn(6, 4), backend="torch")
    with pytest.raises(ValueError, match=r"cache \(the conv state\) must be \[N, D, W\]"):
        causal_conv1d_update(torch.randn(2, 6), torch.randn(3, 6, 4), weight=torch.randn(6, 4), backend="torch")
    with pytest.raises(ValueError, match="weight must be a tensor, got None"):
        causal_conv1d_update(torch.randn(2, 6), torch.randn(2, 6, 4), backend="torch")
    # an integer cache took x truncated to integers, silently; a cache on another device reached the kernels
    for cache in (torch.zeros(2, 6, 4, dtype=torch.int32), torch.zeros(2, 6, 4, device="meta")):
        with pytest.raises(ValueError, match=f"cache must be a floating-point tensor on x's device cpu, got "
                                             f"{cache.dtype} on {cache.device}"):  # fmt: skip
            causal_conv1d_update(torch.randn(2, 6), cache, weight=torch.randn(6, 4), backend="torch")


def _triton_vs_reference(x, w, b, h, activation, cu, output_final_state, device, rtol_y, rtol_grad):
    """Forward and backward of the Triton op against the fp64 reference (gradients through y and state)."""
    leaves = [t.detach().to(device).requires_grad_() if t is not None else None for t in (x, w, b, h)]
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, h)]
    cu_dev = cu.to(device) if cu is not None else None
    y, s = causal_conv1d(*leaves[:3], initial_state=leaves[3], output_final_state=output_final_state,
                         activation=activation, cu_seqlens=cu_dev, backend="triton")
    y_ref, s_ref = naive_causal_conv1d(*ref_leaves[:3], activation, ref_leaves[3], output_final_state, cu)
    assert_close_rel(y, y_ref, rtol_y, "y")
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    outs, ref_outs, grads = [y], [y_ref], [dy]
    if output_final_state:
        assert_close_rel(s, s_ref, rtol_y, "final state")
        outs.append(s)
        ref_outs.append(s_ref)
        grads.append(torch.randn(s_ref.shape, generator=gen, dtype=torch.float64))
    used = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(outs, [leaves[i] for i in used], [g.to(device, y.dtype) for g in grads])
    want = torch.autograd.grad(ref_outs, [ref_leaves[i] for i in used], grads)
    for i, a, e in zip(used, got, want):
        assert_close_rel(a, e, rtol_grad, ["dx", "dweight", "dbias", "dinitial_state"][i])


_CASES = {
    "batch": dict(batch=2, lengths=None, dim=5, width=4, bias=True, activation="silu", init=False, final=False),
    "batch_states": dict(batch=2, lengths=None, dim=5, width=4, bias=True, activation="silu", init=True, final=True),
    "varlen_ragged": dict(
        batch=1, lengths=[3, 0, 1, 7, 2], dim=6, width=4, bias=False, activation=None, init=True, final=True
    ),
    "varlen_width3": dict(
        batch=1, lengths=[2, 9, 1], dim=130, width=3, bias=True, activation="silu", init=False, final=True
    ),
}


def _case_inputs(case, length=7):
    lengths = case["lengths"]
    total = sum(lengths) if lengths is not None else length
    x, w, b = _inputs(case["batch"], total, case["dim"], case["width"], bias=case["bias"], seed=3)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if lengths is not None else None
    num_seqs = case["batch"] if lengths is None else len(lengths)
    h = torch.randn(num_seqs, case["dim"], case["width"]) if case["init"] else None
    return x, w, b, h, cu


@pytest.mark.parametrize("name", list(_CASES))
def test_triton_matches_reference_interpreter(name):
    """Triton kernels under the interpreter (fp32, tiny shapes; empty and 1-token sequences included)."""
    case = _CASES[name]
    x, w, b, h, cu = _case_inputs(case)
    _triton_vs_reference(x, w, b, h, case["activation"], cu, case["final"], "cpu", 1e-5, 1e-5)


@pytest.mark.parametrize("tiles_per_program", [1, 3])
@pytest.mark.parametrize("width", [2, 4, 5])
def test_triton_weight_grad_partials_interpreter(monkeypatch, tiles_per_program, width):
    """The weight/bias gradients summed per tap tile (up to width 4) or per row tile (wider), over one or several
    row tiles per backward program, and over several programs' partials."""
    from kimi_hf.kernels.conv import triton_kernels

    monkeypatch.setattr(triton_kernels, "BWD_TILES_PER_PROGRAM", tiles_per_program)
    monkeypatch.setattr(triton_kernels, "BWD_ROWS", 8)
    case = dict(_CASES["batch_states"], width=width)
    x, w, b, h, cu = _case_inputs(case, length=29)
    _triton_vs_reference(x, w, b, h, "silu", cu, True, "cpu", 1e-5, 1e-5)


def test_triton_refuses_more_rows_than_int32_indexes(monkeypatch):
    """The kernels find each row's sequence with int32 row indices: B * T must stay under 2**31 (lowered here)."""
    from kimi_hf.kernels.conv import triton_kernels

    monkeypatch.setattr(triton_kernels, "_MAX_ROWS", 16)
    x, w, b = _inputs(2, 8, 4, 4)
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 tokens .* got B=2, T=8"):
        causal_conv1d(x, w, b, backend="triton")


def test_arguments_follow_flas_order_and_defaults():
    """fla 0.6.0's order (x, weight, bias, residual, initial_state, output_final_state, activation, backend,
    cu_seqlens) and defaults (no activation; "swish" is SiLU): a call written for fla means the same here."""
    import inspect

    x, w, b = _inputs(2, 7, 6, 4)
    residual, h = torch.randn(2, 7, 6), torch.randn(2, 6, 4)
    y, s = causal_conv1d(x, w, b, residual, h, True, "swish", "torch")
    y_ref, s_ref = naive_causal_conv1d(x, w, b, "silu", h, True, None)
    assert_close_rel(y, y_ref + residual, 1e-6, "y, positional, with residual")
    assert_close_rel(s, s_ref, 0, "final state, positional")
    assert_close_rel(causal_conv1d(x, w, b, backend="torch")[0], _conv1d_oracle(x, w, b, None), 1e-6, "default act")
    state, token, res = h.clone(), torch.randn(2, 6), torch.randn(2, 6)
    step, _ = causal_conv1d_update(token, state, res, w, b, "swish", "torch")
    ref = naive_causal_conv1d_update(token, h.clone(), w, b, "silu")
    assert_close_rel(step, ref + res, 1e-6, "update, positional, with residual")
    with pytest.raises(ValueError, match=r"residual must be a tensor of the output's shape \(2, 7, 6\)"):
        causal_conv1d(x, w, b, torch.randn(2, 6), backend="torch")
    fla_conv = pytest.importorskip("fla.modules.causal_conv1d")
    pairs = ((causal_conv1d, fla_conv.causal_conv1d, 9), (causal_conv1d_update, fla_conv.causal_conv1d_update, 6))
    for ours, theirs, shared in pairs:
        assert list(inspect.signature(ours).parameters)[:shared] == list(inspect.signature(theirs).parameters)[:shared]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_cu_seqlens_and_empty_batch_interpreter(backend):
    """cu_seqlens as a strided view (the kernels read offsets at unit stride: it was silently wrong), and B = 0."""
    x, w, b = _inputs(1, 20, 6, 4)
    cu = torch.tensor([0, 99, 7, 99, 20])[::2]
    y, s = causal_conv1d(x, w, b, output_final_state=True, activation="silu", cu_seqlens=cu, backend=backend)
    y_ref, s_ref = naive_causal_conv1d(x, w, b, "silu", None, True, torch.tensor([0, 7, 20]))
    assert_close_rel(y, y_ref, 1e-5, "y")
    assert_close_rel(s, s_ref, 0, "final state")
    y, s = causal_conv1d(torch.randn(0, 5, 6), w, b, output_final_state=True, backend=backend)
    assert y.shape == (0, 5, 6) and s.shape == (0, 6, 4)


def test_triton_reads_a_strided_bias_and_weight_interpreter():
    """A bias or weight that is a strided view (e.g. a column of a larger tensor) reaches the kernels as its values."""
    x, w, b = _inputs(1, 9, 6, 4)
    wide_b, wide_w = torch.stack([b, -b], dim=1), torch.stack([w, -w], dim=2)
    strided_b, strided_w = wide_b[:, 0], wide_w[..., 0]
    assert not strided_b.is_contiguous() and not strided_w.is_contiguous()
    y, _ = causal_conv1d(x, strided_w, strided_b, backend="triton")
    assert_close_rel(y, causal_conv1d(x, w, b, backend="torch")[0], 1e-5, "y")
    tokens, state = x[0, :2], torch.randn(2, 6, 4)  # one token for each of two sequences
    step, _ = causal_conv1d_update(tokens, state.clone(), weight=strided_w, bias=strided_b, backend="triton")
    ref, _ = causal_conv1d_update(tokens, state.clone(), weight=w, bias=b, backend="torch")
    assert_close_rel(step, ref, 1e-5, "update")


@pytest.mark.parametrize("squeeze", [True, False])
def test_triton_update_matches_reference_interpreter(squeeze):
    x, w, b = _inputs(3, 1, 6, 4)
    x = x[:, 0] if squeeze else x
    cache = torch.randn(3, 2, 6, 4)
    state, state_ref = cache[:, 1], cache[:, 1].clone()  # a non-contiguous slice of a larger cache
    y, _ = causal_conv1d_update(x, state, weight=w, bias=b, activation="silu", backend="triton")
    y_ref, _ = causal_conv1d_update(x, state_ref, weight=w, bias=b, activation="silu", backend="torch")
    assert_close_rel(y, y_ref, 1e-6, "y")
    assert_close_rel(cache[:, 1], state_ref, 0, "state updated in place")


@pytest.mark.parametrize("count", [1, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_update_group_matches_one_by_one(backend, bias, count, monkeypatch):
    """Several convs' decode updates at once (on Triton up to three per launch: 4 takes a group of 3 and one of 1)
    equal one causal_conv1d_update each, outputs and states; on Triton no single-conv launch is made."""
    gen = torch.Generator().manual_seed(count)
    xs = [torch.randn(3, 1, 6, generator=gen) for _ in range(count)]
    weights = [torch.randn(6, 1, 4, generator=gen) for _ in range(count)]
    biases = [torch.randn(6, generator=gen) for _ in range(count)] if bias else None
    caches = [torch.randn(3, 6, 4, generator=gen) for _ in range(count)]
    wanted_caches = [c.clone() for c in caches]
    wanted = [
        causal_conv1d_update(x, c, weight=w, bias=biases[i] if bias else None, activation="silu", backend="torch")[0]
        for i, (x, c, w) in enumerate(zip(xs, wanted_caches, weights))
    ]
    if backend == "triton":
        import kimi_hf.kernels.conv as conv

        monkeypatch.setattr(conv, "causal_conv1d_update_fwd", None)  # would fail if called
    ys = causal_conv1d_update_group(xs, caches, weights, biases, activation="silu", backend=backend)
    for i in range(count):
        assert ys[i].shape == xs[i].shape
        assert_close_rel(ys[i], wanted[i], 1e-6, f"y {i}")
        assert_close_rel(caches[i], wanted_caches[i], 0, f"state {i}")


def test_update_group_mixed_shapes_and_bad_input():
    """Convs of different widths are updated one by one; lists of different lengths are refused by name."""
    xs = [torch.randn(2, 6), torch.randn(2, 8)]
    caches = [torch.randn(2, 6, 4), torch.randn(2, 8, 3)]
    weights = [torch.randn(6, 4), torch.randn(8, 3)]
    wanted_caches = [c.clone() for c in caches]
    ys = causal_conv1d_update_group(xs, caches, weights, backend="triton")
    for x, y, c, w, cw in zip(xs, ys, caches, weights, wanted_caches):
        assert_close_rel(y, causal_conv1d_update(x, cw, weight=w, backend="torch")[0], 1e-6, "y")
        assert_close_rel(c, cw, 0, "state")
    with pytest.raises(ValueError, match="one entry per convolution, got 2, 1, 2 and 2"):
        causal_conv1d_update_group(xs, caches[:1], weights)
    with pytest.raises(ValueError, match=r"cache \(the conv state\) must be \[N, D, W\]"):
        causal_conv1d_update_group(xs, caches[::-1], weights)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", list(_CASES))
def test_triton_matches_reference_gpu(name, dtype, rtol):
    case = dict(_CASES[name])
    case["dim"] = 4 * case["dim"] + 3  # several channel tiles with a ragged last one
    if case["lengths"] is not None:
        case["lengths"] = [37 * n for n in case["lengths"]]
    x, w, b, h, cu = _case_inputs(case, length=300)
    x, w, b, h = (t.to(dtype) if t is not None else None for t in (x, w, b, h))
    _triton_vs_reference(x, w, b, h, case["activation"], cu, case["final"], "cuda", rtol, 2 * rtol)


@pytest.mark.gpu
def test_triton_update_cuda_graph():
    x, w, b = (t.cuda() for t in _inputs(4, 1, 4096, 4, dtype=torch.bfloat16)[:3])
    x = x[:, 0]
    state = torch.randn(4, 4096, 4, device="cuda", dtype=torch.bfloat16)
    state_ref = state.clone()
    causal_conv1d_update(x, state.clone(), weight=w, bias=b, activation="silu")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = causal_conv1d_update(x, state, weight=w, bias=b, activation="silu")
    graph.replay()
    graph.replay()
    causal_conv1d_update(x, state_ref, weight=w, bias=b, activation="silu", backend="torch")
    y_ref, _ = causal_conv1d_update(x, state_ref, weight=w, bias=b, activation="silu", backend="torch")
    assert_close_rel(state, state_ref, 0, "state after two replays")
    assert_close_rel(y, y_ref, 1e-2, "y")
