"""Plain-torch reference for the gated RMSNorm applied to KDA's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight * act(gate), in float32 (float64 stays float64).

    x, gate ``[..., D]``; weight ``[D]``; activation ``"sigmoid"`` or ``"silu"``.
    Returns y in x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, gc = x.to(compute), gate.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    gated = torch.sigmoid(gc) if activation == "sigmoid" else F.silu(gc)
    return (normed * weight.to(compute) * gated).to(x.dtype)
