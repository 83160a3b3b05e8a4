"""kimi_hf: Moonshot AI's Kimi Linear (KDA), Attention Residuals and CE-LoRA for the Hugging Face stack.

Importing the package registers its model types with transformers' Auto classes (never the name
``kimi_linear``, which transformers' native class owns) and its PEFT method with PEFT.
"""

from .models.kimi_linear import (
    KimiLinearCache,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    KimiLinearModel,
    KimiLinearPreTrainedModel,
)
from .registration import register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
]
