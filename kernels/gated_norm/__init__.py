"""Gated RMSNorm of KDA's output: ``RMSNorm(x) * weight * act(gate)``, Triton or plain torch."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .autograd import GatedRMSNormFunction
from .naive import naive_gated_rms_norm

__all__ = ["gated_rms_norm", "naive_gated_rms_norm"]

_ACTIVATIONS = ("sigmoid", "silu", "swish")
MAX_TRITON_DIM = 8192


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    activation: str = "sigmoid",
    backend: str | None = None,
) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight * act(gate), computed in float32.

    Args:
        x: ``[..., D]``.
        gate: same shape as x (pre-activation).
        weight: ``[D]``.
        eps: added to the mean square.
        activation: ``"sigmoid"`` (Kimi Linear) or ``"silu"`` (``"swish"``, fla's name and default for it, is the
            same).
        backend: ``"triton"``, ``"torch"`` or None (see :func:`kimi_hf.kernels.resolve_backend`).

    Returns:
        y with x's shape and dtype; differentiable w.r.t. x, gate and weight.
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got shape {tuple(x.shape)}")
    for name, value in (("x", x), ("gate", gate), ("weight", weight)):
        if not value.is_floating_point():  # the output takes x's dtype: integers would be truncated
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be [D] with D={x.shape[-1]}, got {tuple(weight.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    # fla's gated norms say "swish" (their default): taken as "silu", as the conv takes it, so fla calls port as written
    activation = "silu" if activation == "swish" else activation
    if resolve_backend(backend, x) == "torch":
        return naive_gated_rms_norm(x, gate, weight, eps, activation)
    if x.shape[-1] > MAX_TRITON_DIM:
        raise ValueError(
            f"the Triton gated_rms_norm keeps a row in registers: D <= {MAX_TRITON_DIM}, got {x.shape[-1]}"
        )
    return GatedRMSNormFunction.apply(x, gate, weight, eps, activation)
