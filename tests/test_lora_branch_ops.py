"""LoRA's fp32 branch on 16-bit activations (``kimi_hf.kernels.lora_branch``): Triton against float64 and PEFT's ops.

On CPU the kernels run under Triton's interpreter, whose fp32 -> bf16 cast truncates where a GPU rounds to nearest
even: there, bf16 outputs are allowed one bf16 step from the reference (fp16 outputs and every fp32 output are
checked to fp32 accuracy everywhere). The GPU tests check the rounding itself.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_rel

from kimi_hf.kernels.lora_branch import (
    lora_down,
    lora_up_add_,
    lora_weight_grad,
    naive_lora_down,
    naive_lora_up_add_,
    naive_lora_weight_grad,
)
from kimi_hf.kernels.lora_branch import triton_kernels

TRITON_AVAILABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (T, N, R): row and column tails against the 32-row / 64-column tiles, ranks below, at and above tl.dot's 16
SHAPES = [(70, 100, 16), (33, 64, 8), (129, 40, 24)]
HALF = [torch.bfloat16, torch.float16]


def on_16bit_shapes(test):
    """``test(dtype, shape, ...)`` under Triton, for each 16-bit activation dtype and each of ``SHAPES``."""
    return needs_triton(pytest.mark.parametrize("dtype", HALF)(pytest.mark.parametrize("shape", SHAPES)(test)))


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _assert_rounded_like(actual: torch.Tensor, expected: torch.Tensor, branch: torch.Tensor, name: str) -> None:
    """16-bit ``actual`` against ``expected`` (the same sums rounded by torch), ``branch`` the added term in float64:
    equal up to the fp32 sums' order, which moves a rounding (of the branch, then of the sum) by one 16-bit step at
    most, and rarely; under the interpreter a bf16 cast truncates, so there by one step anywhere."""
    assert actual.dtype == expected.dtype and not actual.isnan().any()
    eps = torch.finfo(expected.dtype).eps
    diff = (actual.double() - expected.double()).abs()
    bound = eps * (branch.abs() + expected.double().abs()) + torch.finfo(expected.dtype).tiny
    assert (diff <= bound).all(), f"{name}: {(diff - bound).max().item()} beyond one step"
    interpreted_bf16 = expected.dtype == torch.bfloat16 and not actual.is_cuda
    if not interpreted_bf16:
        assert (diff > 0).float().mean().item() < 0.01, f"{name}: {(diff > 0).float().mean().item():.2%} differ"


@on_16bit_shapes
@pytest.mark.parametrize("strided", [False, True])
def test_lora_down_matches_float64(dtype, shape, strided):
    """``scale x W^T`` of 16-bit ``x`` and fp32 ``W`` to fp32 accuracy, also for a transposed view (``B^T``)."""
    gen = torch.Generator().manual_seed(0)
    t, n, r = shape
    x = _randn(t, n, gen=gen, dtype=dtype)
    weight = _randn(n, r, gen=gen).T if strided else _randn(r, n, gen=gen)
    got = lora_down(x, weight, 0.75, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (t, r)
    assert_close_rel(got, naive_lora_down(x.double(), weight.double(), 0.75), 1e-6, "y")


@on_16bit_shapes
@pytest.mark.parametrize("round_first", [False, True])
def test_lora_up_add_rounds_like_peft(dtype, shape, round_first):
    """``out += s y W^T`` in place, rounded as PEFT's torch ops round it (once, or the branch first)."""
    gen = torch.Generator().manual_seed(1)
    t, m, r = shape
    out = _randn(t, m, gen=gen, dtype=dtype)
    y, weight = _randn(t, r, gen=gen), _randn(m, r, gen=gen)
    expected = naive_lora_up_add_(out.clone(), y, weight, 0.5, round_first)
    got = out.clone()
    assert lora_up_add_(got, y, weight, 0.5, round_first, backend="triton") is got
    _assert_rounded_like(got, expected, 0.5 * y.double() @ weight.double().T, "out")
    # the transposed view of A ([I, r] over A's [r, I]) that the backward passes
    a = _randn(r, m, gen=gen)
    got, expected = out.clone(), naive_lora_up_add_(out.clone(), y, a.T, 1.0, round_first)
    lora_up_add_(got, y, a.T, round_first=round_first, backend="triton")
    _assert_rounded_like(got, expected, y.double() @ a.double(), "out, A^T")


@on_16bit_shapes
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("min_split_rows", [16, 10**9])
def test_lora_weight_grad_matches_float64(dtype, shape, transpose, min_split_rows, monkeypatch):
    """``s y^T x`` to fp32 accuracy, in one row split or several (their partials added in order)."""
    monkeypatch.setattr(triton_kernels, "MIN_SPLIT_ROWS", min_split_rows)
    gen = torch.Generator().manual_seed(2)
    t, n, r = shape
    y, x = _randn(t, r, gen=gen), _randn(t, n, gen=gen, dtype=dtype)
    got = lora_weight_grad(y, x, 1.25, transpose, backend="triton")
    assert got.dtype == torch.float32 and got.shape == ((n, r) if transpose else (r, n)) and got.is_contiguous()
    assert_close_rel(got, naive_lora_weight_grad(y.double(), x.double(), 1.25, transpose), 1e-6, "grad")
    again = lora_weight_grad(y, x, 1.25, transpose, backend="triton")
    assert torch.equal(got, again), "the partials' sum must not depend on the run"


@needs_triton
def test_ops_take_no_rows():
    """An empty batch: empty outputs, zero weight gradients, ``out`` untouched; a layer of no columns."""
    x, weight = torch.empty(0, 64, device=DEVICE, dtype=torch.bfloat16), torch.randn(16, 64, device=DEVICE)
    assert lora_down(x, weight, backend="triton").shape == (0, 16)
    assert lora_up_add_(x, torch.empty(0, 16, device=DEVICE), weight.T, backend="triton").shape == (0, 64)
    grad = lora_weight_grad(torch.empty(0, 16, device=DEVICE), x, backend="triton")
    assert grad.shape == (16, 64) and not grad.any()
    no_columns = torch.empty(8, 0, device=DEVICE, dtype=torch.bfloat16)
    grad = lora_weight_grad(torch.randn(8, 16, device=DEVICE), no_columns, transpose=True, backend="triton")
    assert grad.shape == (0, 16)


def test_other_dtypes_run_pefts_torch_ops():
    """Combinations without a widened copy to avoid (one dtype; a narrower branch) run the torch sequence, whatever
    the backend asked for; its results are PEFT's ops."""
    gen = torch.Generator().manual_seed(3)
    x, a = torch.randn(8, 32, generator=gen), torch.randn(4, 32, generator=gen).bfloat16()
    assert torch.equal(lora_down(x, a, backend="torch"), x.bfloat16() @ a.T)
    out, y, b = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen), torch.randn(16, 4, generator=gen)
    assert torch.equal(lora_up_add_(out.clone(), y, b, 2.0), torch.addmm(out, y, b.T, alpha=2.0))
    assert torch.equal(lora_weight_grad(y, out, 2.0, transpose=True), torch.addmm(b, out.T, y, beta=0, alpha=2.0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: lora_down(torch.zeros(4, 8), torch.zeros(2, 9)), "must share N"),
        (lambda: lora_down(torch.zeros(4, 8, 1), torch.zeros(2, 8)), "x must be 2-D"),
        (lambda: lora_down(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(2, 8)), "x must be a floating-point"),
        (lambda: lora_up_add_(torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(8, 3)), "must agree"),
        (lambda: lora_up_add_(torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(8, 2).double()), "share the branch"),
        (lambda: lora_weight_grad(torch.zeros(4, 2), torch.zeros(5, 8)), "must share T"),
        (lambda: lora_up_add_(torch.zeros(1, 8).expand(4, 8), torch.zeros(4, 2), torch.zeros(8, 2)), "rows overlap"),
    ],
)
def test_ops_name_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_ops_on_gpu_at_a_projection_shape(dtype):
    """A LoRA r16 projection at 4K tokens (several row splits, full tiles) on a GPU: fp32 accuracy, and outputs
    rounded to nearest even as PEFT's torch casts round them."""
    gen = torch.Generator().manual_seed(4)
    t, n, m, r = 4096, 2048, 5632, 16
    x, a, b = _randn(t, n, gen=gen, dtype=dtype), _randn(r, n, gen=gen), _randn(m, r, gen=gen)
    xa = lora_down(x, a)
    assert_close_rel(xa, naive_lora_down(x.double(), a.double()), 1e-6, "x A^T")
    out = _randn(t, m, gen=gen, dtype=dtype)
    expected = naive_lora_up_add_(out.clone(), xa, b, 2.0)
    _assert_rounded_like(lora_up_add_(out.clone(), xa, b, 2.0), expected, 2.0 * xa.double() @ b.double().T, "out")
    dy = _randn(t, m, gen=gen, dtype=dtype)
    assert_close_rel(lora_weight_grad(xa, dy, 2.0, transpose=True),
                     naive_lora_weight_grad(xa.double(), dy.double(), 2.0, transpose=True), 1e-6, "dB")  # fmt: skip
