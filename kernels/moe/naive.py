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

    Every expert runs on every token and only the chosen (token, expert) pairs are added, with their mixing
    weights: no sorting and no host synchronisation, so this path can be captured in a CUDA graph; each expert's
    weights are read once. A token's output never depends on experts it did not choose (an overflow or NaN there
    stays there), and an id outside ``[0, E)`` adds nothing, as on the Triton path.

    Args:
        x: ``[N, hidden]``.
        expert_ids: ``[N, k]`` integer, values in ``[0, E)``.
        weights: ``[N, k]`` mixing weights.
        w1, w3: E gate and up weights ``[I, hidden]``; w2: E down weights ``[hidden, I]``.

    Returns:
        ``[N, hidden]`` in x's dtype.
    """
    num_experts = len(w1)
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    ids = ids.clamp(0, num_experts - 1)
    mix = x.new_zeros(x.shape[0], num_experts).scatter_add_(1, ids, torch.where(valid, weights.to(x.dtype), 0))
    chosen = torch.zeros_like(mix, dtype=torch.bool).scatter_(1, ids, valid)
    out = torch.zeros_like(x)
    for e in range(num_experts):
        act = F.silu(F.linear(x, w1[e])) * F.linear(x, w3[e])
        out += torch.where(chosen[:, e, None], F.linear(act, w2[e]) * mix[:, e, None], 0)
    return out
