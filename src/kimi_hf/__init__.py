"""kimi_hf: Moonshot AI's Kimi Linear (KDA), Attention Residuals and CE-LoRA for the Hugging Face stack.

Importing the package registers its model types with transformers' Auto classes (never the name
``kimi_linear``, which transformers' native class owns) and CE-LoRA with PEFT.
"""

from .graphs import GraphedLossStep
from .models.attn_res import AttnResConfig, AttnResForCausalLM, AttnResModel
from .models.kimi_linear import (
    KimiLinearAttnResConfig,
    KimiLinearAttnResForCausalLM,
    KimiLinearAttnResModel,
    KimiLinearCache,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    KimiLinearModel,
    KimiLinearPreTrainedModel,
    KimiLinearStaticCache,
)
from .modules import AttentionResiduals
from .peft import CELoraConfig, CELoraModel, export_as_lora
from .registration import register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "AttentionResiduals",
    "AttnResConfig",
    "AttnResForCausalLM",
    "AttnResModel",
    "CELoraConfig",
    "CELoraModel",
    "GraphedLossStep",
    "KimiLinearAttnResConfig",
    "KimiLinearAttnResForCausalLM",
    "KimiLinearAttnResModel",
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
    "KimiLinearStaticCache",
    "export_as_lora",
]
