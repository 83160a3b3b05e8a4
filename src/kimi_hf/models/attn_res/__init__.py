"""Dense Llama-style decoder with Attention Residuals (``model_type = "kimi_attn_res"``)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_attn_res import AttnResConfig
from .modeling_attn_res import AttnResForCausalLM, AttnResModel, AttnResPreTrainedModel


def register_auto() -> None:
    """Register the classes with transformers' Auto classes (idempotent) and for ``auto_map`` on save.

    After this, ``save_pretrained`` writes ``auto_map`` and copies the configuration/modeling files, so
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works where kimi_hf is installed.
    """
    AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
    AutoModel.register(AttnResConfig, AttnResModel, exist_ok=True)
    AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)
    AttnResConfig.register_for_auto_class()
    AttnResModel.register_for_auto_class("AutoModel")
    AttnResForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["AttnResConfig", "AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel", "register_auto"]
