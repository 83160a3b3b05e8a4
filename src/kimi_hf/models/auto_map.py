"""``save_pretrained`` that names the base model in the saved ``auto_map``, shared by kimi_hf's model classes."""

from __future__ import annotations

import os


class BaseModelAutoMapMixin:
    """Once registered for ``auto_map`` (:func:`kimi_hf.register_all`), ``save_pretrained`` writes the base model's
    ``AutoModel`` entry too, as the official Kimi checkpoints do: transformers writes only the saved class's entry,
    so ``AutoModel.from_pretrained(path, trust_remote_code=True)`` of a saved causal LM failed, and an entry read
    from another checkpoint would point at a file that is not saved here. Mixed in before ``PreTrainedModel``."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """As :meth:`transformers.PreTrainedModel.save_pretrained`, with the ``AutoModel`` entry (see the class)."""
        if self._auto_class is not None:
            base = type(self.base_model)
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{base.__module__.rsplit('.', 1)[-1]}.{base.__name__}",
            }
        super().save_pretrained(save_directory, *args, **kwargs)
