"""Registration of kimi_hf's classes with transformers' Auto classes and with PEFT."""

from __future__ import annotations

from .models.kimi_linear import KimiLinearConfig, KimiLinearForCausalLM, KimiLinearModel


def register_all() -> None:
    """Idempotent. Plain Kimi Linear keeps ``model_type: kimi_linear``, which transformers' native class
    owns in the Auto mappings: we do not take it over. Our classes are reached directly, or through
    the ``auto_map`` that ``save_pretrained`` writes (``trust_remote_code=True``)."""
    KimiLinearConfig.register_for_auto_class()
    KimiLinearModel.register_for_auto_class("AutoModel")
    KimiLinearForCausalLM.register_for_auto_class("AutoModelForCausalLM")
