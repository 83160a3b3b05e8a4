"""Gated RMSNorm: reference vs torch's rms_norm, autograd, Triton kernels."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.gated_norm import gated_rms_norm, naive_gated_rms_norm


def _inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    g = torch.randn(*shape, generator=gen, dtype=dtype) * 2
    w = 1 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=dtype)
    return x, g, w


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
def test_reference_matches_rms_norm(activation):
    x, g, w = _inputs((3, 5, 24), torch.float64)
    act = torch.sigmoid(g) if activation == "sigmoid" else F.silu(g)
    expected = F.rms_norm(x, (24,), w, eps=1e-5) * act
    assert_close_rel(gated_rms_norm(x, g, w, activation=activation, backend="torch"), expected, 1e-12, "y")


def test_reference_keeps_dtype_and_computes_in_fp32():
    x, g, w = _inputs((4, 16))
    y = gated_rms_norm(x.bfloat16(), g.bfloat16(), w, backend="torch")
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, naive_gated_rms_norm(x.bfloat16().float(), g.bfloat16().float(), w), 8e-3, "bf16 y")


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
def test_reference_gradcheck(activation):
    x, g, w = (t.requires_grad_() for t in _inputs((3, 7), torch.float64))
    assert torch.autograd.gradcheck(lambda *a: naive_gated_rms_norm(*a, 1e-5, activation), (x, g, w))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gate=torch.randn(2, 5)), "gate must"),
        (dict(weight=torch.randn(5)), "weight must"),
        (dict(activation="relu"), "activation"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(x=torch.randn(2, 6), gate=torch.randn(2, 6), weight=torch.randn(6), backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gated_rms_norm(**args)
