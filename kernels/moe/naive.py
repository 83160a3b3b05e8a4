"""Plain-torch reference of the small-batch routed experts (and their torch path on CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def naive_moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """sum_j weights[n, j] * w2[e] (silu(w1[e] x_n) * (w3[e] x_n)) with e = expert_ids[n, j], for every token n.

    Every expert runs on every token, scaled by its mixing weight (zero where not chosen): no sorting and no
    host synchronisation, so this path can be captured in a CUDA graph; each expert's weights are read once.

    Args:
        x: ``[N, hidden]``.
        expert_ids: ``[N, k]`` integer, values in ``[0, E)``.
        weights: ``[N, k]`` mixing weights.
        w1, w3: E gate and up weights ``[I, hidden]``; w2: E down weights ``[hidden, I]``.

    Returns:
        ``[N, hidden]`` in x's dtype.
    """
    mix = x.new_zeros(x.shape[0], len(w1)).scatter_add_(1, expert_ids.long(), weights.to(x.dtype))
    out = torch.zeros_like(x)
    for e in range(len(w1)):
        act = F.silu(F.linear(x, w1[e])) * F.linear(x, w3[e])
        out.addcmul_(F.linear(act, w2[e]), mix[:, e, None])
    return out
