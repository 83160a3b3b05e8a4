"""``save_pretrained`` that writes a complete ``auto_map`` and safetensors only, shared by kimi_hf's model classes."""

from __future__ import annotations

import os
import sys


class BaseModelAutoMapMixin:
    """Once registered for ``auto_map`` (:func:`kimi_hf.register_all`), ``save_pretrained`` writes the ``AutoModel``
    and ``AutoModelForCausalLM`` entries of the model's family (``XModel`` and ``XForCausalLM`` of the base model's
    module), as the official Kimi checkpoints list both: transformers writes only the saved class's entry, so
    ``AutoModel.from_pretrained(path, trust_remote_code=True)`` of a saved causal LM failed, as did
    ``AutoModelForCausalLM`` of a saved base model (it fell through to transformers' native class of the same config
    name). Other ``AutoModel*`` entries read from another checkpoint (the official ``modeling_kimi.*``) are dropped:
    they name files that are not saved here. Mixed in before ``PreTrainedModel``."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """As :meth:`transformers.PreTrainedModel.save_pretrained`, with the ``auto_map`` entries (see the class).

        Raises:
            ValueError: for ``safe_serialization=False``: the weights are written as safetensors only (transformers 5
                has no other format and silently ignored the argument, so a caller asking for a pickled ``.bin``
                got safetensors without a word).
        """
        if not kwargs.pop("safe_serialization", True):
            raise ValueError(
                "save_pretrained(safe_serialization=False) is not supported: kimi_hf saves weights as safetensors only"
            )
        if self._auto_class is not None:
            base = type(self.base_model)
            module = base.__module__.rsplit(".", 1)[-1]
            causal_lm = getattr(sys.modules[base.__module__], base.__name__.removesuffix("Model") + "ForCausalLM")
            inherited = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {
                **{key: ref for key, ref in inherited.items() if not key.startswith("AutoModel")},
                "AutoModel": f"{module}.{base.__name__}",
                "AutoModelForCausalLM": f"{module}.{causal_lm.__name__}",
            }
        super().save_pretrained(save_directory, *args, **kwargs)
