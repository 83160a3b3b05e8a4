from .cache_kimi_linear import KimiLinearCache, KimiLinearStaticCache
from .configuration_kimi_linear import KimiLinearAttnResConfig, KimiLinearConfig
from .modeling_kimi_linear import (
    KimiLinearAttnResForCausalLM,
    KimiLinearAttnResModel,
    KimiLinearForCausalLM,
    KimiLinearModel,
    KimiLinearPreTrainedModel,
)

__all__ = [
    "KimiLinearAttnResConfig",
    "KimiLinearAttnResForCausalLM",
    "KimiLinearAttnResModel",
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
    "KimiLinearStaticCache",
]
