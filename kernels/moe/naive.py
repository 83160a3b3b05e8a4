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


def naive_moe_route(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    activation: str = "sigmoid",
    renormalize: bool = True,
    scaling: float = 1.0,
    shared_expert: int | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of ``logits [N, E]``: scores = sigmoid (or softmax) of the logits, experts chosen by score +
    ``bias [E]`` (selection only), mixing weights = the chosen experts' unbiased scores, renormalised to sum to 1
    (``renormalize``), times ``scaling``. ``num_groups`` > 1: the experts are in that many equal groups and only
    the ``topk_groups`` groups with the best sum of their two best biased scores are chosen from (DeepSeek-V3's
    grouped top-k). ``shared_expert``: an expert id every token also takes, with weight 1, as a last column.
    Differentiable in ``logits``.

    Returns:
        expert ids ``[N, k (+1)]`` int64 (by decreasing biased score) and weights ``[N, k (+1)]`` in the scores' dtype.
    """
    scores = logits.sigmoid() if activation == "sigmoid" else logits.softmax(dim=-1)
    choice = scores.detach() if bias is None else scores.detach() + bias
    if num_groups > 1:
        grouped = choice.view(-1, num_groups, choice.shape[-1] // num_groups)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(topk_groups, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        choice = grouped.masked_fill(~group_keep[..., None], float("-inf")).view(-1, choice.shape[-1])
    expert_ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if shared_expert is not None:
        expert_ids = torch.cat([expert_ids, expert_ids.new_full((expert_ids.shape[0], 1), shared_expert)], dim=1)
        weights = torch.cat([weights, weights.new_ones(weights.shape[0], 1)], dim=1)
    return expert_ids, weights
