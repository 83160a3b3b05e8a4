"""RMSNorm shared by kimi_hf's decoders."""

from __future__ import annotations

import torch
from torch import nn

from kimi_hf.kernels.attn_res import prenorm


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, computed in fp32 (fp64 for fp64 inputs).

    Decoder layers usually do not call it: they hand its ``weight`` and ``variance_epsilon`` to
    :meth:`~kimi_hf.modules.AttentionResiduals.sublayer_input`, which fuses the norm into the read of the
    residual stream. Called (MLA's latent norms), it is one Triton kernel forward and one backward on CUDA
    (:func:`~kimi_hf.kernels.attn_res.prenorm`), where the torch formula takes about seven.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return prenorm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
