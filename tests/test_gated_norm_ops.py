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
        (dict(x=torch.ones(2, 6, dtype=torch.int64)), "x must be a floating-point tensor, got torch.int64"),
        (dict(gate=torch.ones(2, 6, dtype=torch.int32)), "gate must be a floating-point tensor, got torch.int32"),
        (dict(x=torch.randn(1, 8200), gate=torch.randn(1, 8200), weight=torch.randn(8200), backend="triton"), "D <="),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(x=torch.randn(2, 6), gate=torch.randn(2, 6), weight=torch.randn(6), backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gated_rms_norm(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swish_is_silu_as_in_fla(backend):
    """fla's gated norms name SiLU "swish" (their default activation); ours refused it."""
    x, g, w = _inputs((3, 8), seed=2)
    want = gated_rms_norm(x, g, w, activation="silu", backend=backend)
    assert_close_rel(gated_rms_norm(x, g, w, activation="swish", backend=backend), want, 0, "swish")


def _triton_vs_reference(shape, activation, dtype, device, rtol_y, rtol_grad):
    x, g, w = _inputs(shape, seed=5)
    leaves = [x.to(device, dtype), g.to(device, dtype), w.to(device)]
    leaves = [t.requires_grad_() for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y = gated_rms_norm(*leaves, activation=activation, backend="triton")
    y_ref = naive_gated_rms_norm(*ref, 1e-5, activation)
    assert y.dtype == dtype
    assert_close_rel(y, y_ref, rtol_y, "y")
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy.to(device, dtype))
    want = torch.autograd.grad(y_ref, ref, dy.to(device))
    for name, a, e in zip(("dx", "dgate", "dweight"), got, want):
        assert_close_rel(a, e, rtol_grad, name)


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
@pytest.mark.parametrize("shape", [(3, 5, 24), (2, 9, 256)])
def test_triton_matches_reference_interpreter(shape, activation):
    """Triton kernels under the interpreter (fp32; D not a power of two, several row blocks per program)."""
    _triton_vs_reference(shape, activation, torch.float32, "cpu", 1e-5, 1e-5)


def test_triton_backward_of_no_rows_interpreter():
    """An empty batch: empty input gradients and a zero weight gradient, as on the torch path (it divided by zero)."""
    x, g, w = (torch.randn(0, 8).requires_grad_(), torch.randn(0, 8).requires_grad_(), torch.randn(8).requires_grad_())
    gated_rms_norm(x, g, w, backend="triton").sum().backward()
    assert x.grad.shape == (0, 8) and g.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(8))


def test_triton_backward_programs_walk_several_blocks_interpreter():
    """80 rows of 256 = 10 blocks of 8 rows: two backward programs, the second one partly past the end."""
    _triton_vs_reference((2, 40, 256), "silu", torch.float32, "cpu", 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
@pytest.mark.parametrize("shape", [(4, 1000, 128), (3, 77, 72), (2, 33, 256), (5, 1024)])
def test_triton_matches_reference_gpu(shape, activation, dtype, rtol):
    _triton_vs_reference(shape, activation, dtype, "cuda", rtol, 2 * rtol)
