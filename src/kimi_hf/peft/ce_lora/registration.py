"""Making ``"ce_lora"`` a PEFT method: a ``PeftType`` member plus PEFT's method registry.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of the str Enum
``PeftType``; PEFT offers no hook to add one, and Enum classes cannot be subclassed once they have
members. We therefore add the member the way ``aenum.extend_enum`` does: build it with ``str.__new__``
and enter it in the Enum's three lookup tables (by name, by value, in definition order) and as a class
attribute. Everything PEFT does with peft types afterwards (``PeftType("CE_LORA")``, ``PeftType.CE_LORA``,
``list(PeftType)``, dict lookups by the plain string read from ``adapter_config.json``) then works.
Both steps are idempotent.
"""

from __future__ import annotations

from peft.utils import PeftType

CE_LORA_NAME = "ce_lora"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.CE_LORA``, adding the member first if this process has not yet."""
    name = CE_LORA_NAME.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)  # Python >= 3.11 members carry their definition order
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_ce_lora() -> None:
    """Register CE-LoRA with PEFT (``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``).

    Safe to call any number of times.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import CELoraConfig
    from .model import CELoraModel

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is CELoraModel:
        return
    # prefix "lora_": CE-LoRA's trainable parameters are LoRA's own (lora_A/lora_B), so adapter files use
    # LoRA's key names and a trained CE-LoRA adapter is a plain LoRA adapter apart from its config.
    register_peft_method(name=CE_LORA_NAME, config_cls=CELoraConfig, model_cls=CELoraModel, prefix="lora_")
