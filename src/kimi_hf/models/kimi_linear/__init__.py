from .cache_kimi_linear import KimiLinearCache
from .configuration_kimi_linear import KimiLinearConfig
from .modeling_kimi_linear import KimiLinearForCausalLM, KimiLinearModel, KimiLinearPreTrainedModel

__all__ = [
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
]
