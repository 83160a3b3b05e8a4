"""CE-LoRA (arXiv 2502.01378) as a PEFT method: LoRA with an approximate backward through frozen weights."""

from .config import PAPER_RATIOS, CELoraConfig
from .export import export_as_lora
from .layer import CELinear
from .model import CELoraModel
from .registration import register_ce_lora
from .state import CEChannelState, CEOptions

__all__ = [
    "PAPER_RATIOS",
    "CEChannelState",
    "CELinear",
    "CELoraConfig",
    "CELoraModel",
    "CEOptions",
    "export_as_lora",
    "register_ce_lora",
]
