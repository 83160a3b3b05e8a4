"""Gradient-checkpointing rules shared by kimi_hf's decoders."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def check_non_reentrant_checkpointing(layers: Iterable[nn.Module]) -> None:
    """Raise if any checkpointed decoder layer uses reentrant checkpointing.

    Our decoder layers pass the residual state (:class:`~kimi_hf.modules.attn_res.AttnResState`) as a
    Python object; reentrant checkpointing only tracks tensor arguments and would silently drop the
    gradients flowing through it. Non-reentrant checkpointing (transformers' default) sees them.
    """
    for layer in layers:
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        func = getattr(layer, "_gradient_checkpointing_func", None)
        # transformers binds the checkpointing kwargs with functools.partial; a custom function's are unknown
        keywords = getattr(func, "keywords", None)
        if keywords is None:
            continue
        # torch.utils.checkpoint runs reentrant when use_reentrant is missing or None (with only a warning), e.g.
        # gradient_checkpointing_kwargs={} as peft's prepare_model_for_kbit_training passes by default
        use_reentrant = keywords.get("use_reentrant")
        if use_reentrant is None or use_reentrant:
            raise ValueError(
                f"use_reentrant={use_reentrant!r} is not supported (torch.utils.checkpoint runs reentrant when it is "
                "None or missing): kimi_hf decoder layers need non-reentrant gradient checkpointing, e.g. "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
