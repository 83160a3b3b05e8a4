"""Reusable nn.Modules shared by kimi_hf's models."""

from .attn_res import RESIDUAL_MODES, AttentionResiduals, AttnResState

__all__ = ["RESIDUAL_MODES", "AttentionResiduals", "AttnResState"]
