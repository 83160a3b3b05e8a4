"""Config checks shared by kimi_hf's model configs: each raises ``ValueError`` naming the field and value."""

from __future__ import annotations

import math
from collections.abc import Iterable

from kimi_hf.modules.attn_res import RESIDUAL_MODES


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a size, id or layer index)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_ints(config: object, names: Iterable[str]) -> None:
    """Every attribute in ``names`` must be an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_numbers(config: object, names: Iterable[str]) -> None:
    """Every attribute in ``names`` must be a finite real number > 0 (an int or float, not a bool; an infinite
    ``rope_theta`` would leave RoPE without frequencies, and JSON has no infinity)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_residual(residual: str, block_size: int | None, num_sublayers: int) -> None:
    """``residual`` is one of :data:`RESIDUAL_MODES`; Block AttnRes needs 1 <= block size <= sublayers."""
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if residual == "block" and (not is_int(block_size) or not 1 <= block_size <= num_sublayers):
        raise ValueError(
            f"attn_res_block_size must be an integer in [1, {num_sublayers}] (the number of sublayers, "
            f"2 * num_hidden_layers) for residual='block', got {block_size!r}"
        )
