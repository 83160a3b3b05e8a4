"""Registration of kimi_hf's classes with transformers' Auto classes and with PEFT."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .data import ByteTokenizer
from .models.attn_res import AttnResConfig, AttnResForCausalLM
from .models.attn_res import register_auto as register_attn_res_auto
from .models.kimi_linear import (
    KimiLinearAttnResConfig,
    KimiLinearAttnResForCausalLM,
    KimiLinearAttnResModel,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    KimiLinearModel,
)
from .peft.ce_lora import register_ce_lora


def register_all() -> None:
    """Register everything (idempotent).

    - ``kimi_linear_attn_res`` and ``kimi_attn_res`` (our own model types) with AutoConfig, AutoModel
      and AutoModelForCausalLM.
    - Plain ``kimi_linear`` is left to transformers' native class, which owns that name in the Auto
      mappings; our classes are reached directly or through the ``auto_map`` that ``save_pretrained``
      writes (``trust_remote_code=True``). Our config class maps to our models in AutoModel and
      AutoModelForCausalLM (``from_config``): those mappings are keyed by the class itself, so the native
      config still maps to the native models (by name alone, the two ``KimiLinearConfig`` would collide).
    - :class:`~kimi_hf.data.ByteTokenizer` for ``auto_map``: a saved tokenizer folder carries its code, so
      ``AutoTokenizer.from_pretrained(path, trust_remote_code=True)`` loads it (no model type owns it).
    - Our own model types' causal LMs in transformers' table of causal-LM class names, which the Trainer reads to
      shift the labels for its label smoother (``label_smoothing_factor``) and ``compute_loss_func``: unlisted,
      they were smoothed against unshifted labels, each token trained towards itself.
    - CE-LoRA with PEFT.
    """
    KimiLinearConfig.register_for_auto_class()
    KimiLinearModel.register_for_auto_class("AutoModel")
    KimiLinearForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    AutoModel.register(KimiLinearConfig, KimiLinearModel, exist_ok=True)
    AutoModelForCausalLM.register(KimiLinearConfig, KimiLinearForCausalLM, exist_ok=True)
    AutoConfig.register(KimiLinearAttnResConfig.model_type, KimiLinearAttnResConfig, exist_ok=True)
    AutoModel.register(KimiLinearAttnResConfig, KimiLinearAttnResModel, exist_ok=True)
    AutoModelForCausalLM.register(KimiLinearAttnResConfig, KimiLinearAttnResForCausalLM, exist_ok=True)
    ByteTokenizer.register_for_auto_class("AutoTokenizer")
    register_attn_res_auto()
    for config_class, model_class in (
        (KimiLinearAttnResConfig, KimiLinearAttnResForCausalLM),
        (AttnResConfig, AttnResForCausalLM),
    ):
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(config_class.model_type, model_class.__name__)
    register_ce_lora()
