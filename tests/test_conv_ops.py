"""Short causal depthwise conv (+ SiLU): reference vs torch's conv1d, varlen, states, decode, Triton."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.conv import causal_conv1d, causal_conv1d_update, naive_causal_conv1d


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
    y, _ = causal_conv1d(x, w, b, activation, backend="torch")
    assert_close_rel(y, _conv1d_oracle(x, w, b, activation), 1e-6, "y")
    h = torch.randn(2, 6, 4)
    y, _ = causal_conv1d(x, w, b, activation, initial_state=h, backend="torch")
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
    ys = [causal_conv1d_update(x[:, t], state, w, b, backend="torch") for t in range(10, 13)]
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


def test_update_accepts_three_dim_tokens():
    x, w, b = _inputs(3, 1, 6, 4)
    state1 = torch.randn(3, 6, 4)
    state2 = state1.clone()
    y1 = causal_conv1d_update(x, state1, w, b, backend="torch")
    y2 = causal_conv1d_update(x[:, 0], state2, w, b, backend="torch")
    assert y1.shape == (3, 1, 6) and torch.equal(y1[:, 0], y2) and torch.equal(state1, state2)


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
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(x=torch.randn(2, 4, 6), weight=torch.randn(6, 4), bias=None, backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(**args)


def test_update_bad_input_raises():
    with pytest.raises(ValueError, match="one token"):
        causal_conv1d_update(torch.randn(2, 3, 6), torch.randn(2, 6, 4), torch.randn(6, 4), backend="torch")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(torch.randn(2, 6), torch.randn(3, 6, 4), torch.randn(6, 4), backend="torch")
