"""The "eager" attention implementation shared by kimi_hf's decoders (registered as their default
in ``ALL_ATTENTION_FUNCTIONS.get_interface``; sdpa and others come from transformers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch.

    Args:
        query: ``[B, H, T, Dqk]``; key ``[B, Hkv, S, Dqk]``; value ``[B, Hkv, S, Dv]`` with
            ``H = Hkv * module.num_key_value_groups``.
        attention_mask: ``[B or 1, 1, T, >= S]``, bool (True = attend) or additive float; None means causal
            (the last T of the S keys are the queries' own positions).

    Returns:
        The output ``[B, T, H, Dv]`` and the attention weights ``[B, H, T, S]``.
    """
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    t, s = scores.shape[-2:]
    if attention_mask is None:
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
    else:
        attention_mask = attention_mask[..., :s]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
