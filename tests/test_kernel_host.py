"""Host-side pieces shared by the kernel ops: the launchers' grid helpers, the Triton backwards' refusal of
``create_graph``."""

import pytest
import torch
import triton

from kimi_hf.kernels._grid import cdiv, next_power_of_2
from kimi_hf.kernels.conv import causal_conv1d
from kimi_hf.kernels.gated_norm import gated_rms_norm
from kimi_hf.kernels.kda import chunk_kda


def test_grid_helpers_equal_tritons():
    """The plain-Python grid helpers give Triton's values (they replace its constexpr functions on the host)."""
    for n in range(0, 4100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def _conv(x: torch.Tensor, backend: str) -> torch.Tensor:
    return causal_conv1d(x.view(1, 6, 8), torch.ones(8, 4) / 4, activation="silu", backend=backend)[0]


def _norm(x: torch.Tensor, backend: str) -> torch.Tensor:
    return gated_rms_norm(x.view(6, 8), x.view(6, 8).flip(0), torch.ones(8), backend=backend)


def _kda(x: torch.Tensor, backend: str) -> torch.Tensor:
    q = k = torch.nn.functional.normalize(x.view(1, 6, 2, 4), dim=-1)
    v, g, beta = x.view(1, 6, 2, 4), -torch.ones(1, 6, 2, 4) * 0.1, torch.full((1, 6, 2), 0.5)
    return chunk_kda(q, k, v, g, beta, backend=backend)[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", [_conv, _norm, _kda], ids=["causal_conv1d", "gated_rms_norm", "chunk_kda"])
def test_triton_backwards_refuse_create_graph(op, backend):
    """A second derivative (create_graph=True, e.g. a gradient penalty) through the Triton backward kernels would take
    their gradients as constants, silently wrong: refused by name; the torch path's autograd gives it."""
    lin = torch.nn.Linear(48, 48)
    x = torch.randn(48, generator=torch.Generator().manual_seed(0))
    out = op(lin(x), backend)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="backward is not differentiable"):
            torch.autograd.grad(out.square().sum(), lin.weight, create_graph=True)
    else:
        (grad,) = torch.autograd.grad(out.square().sum(), lin.weight, create_graph=True)
        assert torch.autograd.grad(grad.square().sum(), lin.weight)[0].abs().max() > 0
