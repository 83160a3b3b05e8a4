"""``save_pretrained`` that writes a complete ``auto_map``, safetensors only and no stale weights files, shared by
kimi_hf's model classes."""

from __future__ import annotations

import inspect
import json
import os
import re
import sys

from transformers.modeling_utils import _add_variant
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME


def remove_stale_weights(folder: str | os.PathLike, variant: str | None = None) -> None:
    """Remove what an earlier save into ``folder`` left next to the weights just saved there.

    transformers removes an earlier save's shards that a new save does not write, but not the single weights file
    when the new save is sharded (``from_pretrained`` reads that file first: the earlier weights, not the new
    shards) nor the index when the new save is a single file (it names shards that are gone). The index tells
    which: only an unsharded save removes every shard it lists. An index naming other files than transformers'
    shards (``model-00001-of-00002.safetensors``) is left alone, as is the single file beside it.
    """
    index = os.path.join(folder, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))
    if not os.path.isfile(index):
        return
    with open(index, encoding="utf-8") as f:
        shards = set(json.load(f).get("weight_map", {}).values())
    stem = re.escape(_add_variant(SAFE_WEIGHTS_NAME, variant).removesuffix(".safetensors"))
    if not shards or not all(re.fullmatch(stem + r"-\d{5}-of-\d{5}\.safetensors", name) for name in shards):
        return
    if all(os.path.isfile(os.path.join(folder, name)) for name in shards):
        stale = os.path.join(folder, _add_variant(SAFE_WEIGHTS_NAME, variant))
        if os.path.isfile(stale):
            os.remove(stale)
    else:
        os.remove(index)


class BaseModelAutoMapMixin:
    """Once registered for ``auto_map`` (:func:`kimi_hf.register_all`), ``save_pretrained`` writes the ``AutoModel``
    and ``AutoModelForCausalLM`` entries of the model's family (``XModel`` and ``XForCausalLM`` of the base model's
    module), as the official Kimi checkpoints list both: transformers writes only the saved class's entry, so
    ``AutoModel.from_pretrained(path, trust_remote_code=True)`` of a saved causal LM failed, as did
    ``AutoModelForCausalLM`` of a saved base model (it fell through to transformers' native class of the same config
    name). Other ``AutoModel*`` entries read from another checkpoint (the official ``modeling_kimi.*``) are dropped:
    they name files that are not saved here. The weights file or index of an earlier save into the same folder that
    this save does not rewrite is removed (:func:`remove_stale_weights`). Mixed in before ``PreTrainedModel``."""

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
        options = inspect.signature(super().save_pretrained).bind(save_directory, *args, **kwargs).arguments
        # Only the process that wrote the weights (another rank could race it), and not for distributed checkpoints
        # (their own files).
        if options.get("is_main_process", True) and not options.get("distributed_checkpoint", False):
            remove_stale_weights(save_directory, options.get("variant"))
