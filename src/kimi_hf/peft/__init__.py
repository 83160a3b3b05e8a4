"""kimi_hf's PEFT methods. Importing this package registers them with PEFT."""

from .ce_lora import (
    PAPER_RATIOS,
    CELinear,
    CELoraConfig,
    CELoraModel,
    export_as_lora,
    register_ce_lora,
)

register_ce_lora()

__all__ = ["PAPER_RATIOS", "CELinear", "CELoraConfig", "CELoraModel", "export_as_lora", "register_ce_lora"]
