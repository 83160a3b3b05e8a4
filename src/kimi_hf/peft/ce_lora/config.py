"""Configuration of CE-LoRA adapters: LoRA's options plus how the frozen-weight backward is approximated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import LoraConfig

from kimi_hf.kernels.ce_lora import SCORES

from .registration import ensure_peft_type

# The public code's keep ratios (arXiv 2502.01378); modules not listed (q/k/gate) keep the exact backward.
PAPER_RATIOS: dict[str, float] = {"v_proj": 0.55, "o_proj": 0.55, "up_proj": 0.65, "down_proj": 0.65}

# LoRA variants replace LoRA's forward; CE-LoRA's layer computes plain LoRA's branch itself. (MiCA is an
# init_lora_weights value, not a field: its forward is LoRA's, and CE-LoRA trains it.)
_UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "use_qalora",
)


# CE-LoRA's own options (the rest are LoRA's)
CE_FIELDS = ("ce_ratio", "ce_svd_rank", "ce_recompute_every", "ce_score")


def _check_ratio(ratio: object, where: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"{where} must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


@dataclass
class CELoraConfig(LoraConfig):
    """LoRA whose backward through the frozen base weight is approximated (CE-LoRA, arXiv 2502.01378).

    All of :class:`peft.LoraConfig`'s options apply (``r``, ``lora_alpha``, ``target_modules``,
    ``lora_dropout``, ``bias``, ``modules_to_save``, ``rank_pattern``, ...) except LoRA variants (DoRA,
    aLoRA, ...). CE-LoRA adds:

    Args:
        ce_ratio: fraction of output channels whose residual gradient is kept, in (0, 1]. A float applies
            to every targeted ``nn.Linear``; a dict maps module-name patterns (regex matched against the
            end of the module name, like ``rank_pattern``) to ratios, and modules that match no pattern
            keep the exact backward (ratio 1). Patterns with different ratios must not match the same
            module. Default: the paper's 0.55 for ``v_proj``/``o_proj``, 0.65 for ``up_proj``/``down_proj``.
        ce_svd_rank: rank of the frozen factorisation ``W ~= B0 A0`` used for the dropped channels
            (default ``7r/8``, rounded down, at least 1, from each module's LoRA rank ``r``).
        ce_recompute_every: the kept channels are reselected every this many backward passes through the
            layer (the first backward is exact and makes the first selection).
        ce_score: ``"activation_aware"`` ranks channel ``i`` by ``||dY[:, i]|| * ||R[i, :]||`` (the paper's
            intended score); ``"weight_norm"`` by ``||R[i, :]||`` alone (what the public code does).
    """

    ce_ratio: float | dict[str, float] = field(
        default_factory=lambda: dict(PAPER_RATIOS),
        metadata={"help": "Kept fraction of output channels: a float, or {module-name pattern: ratio}."},
    )
    ce_svd_rank: int | None = field(
        default=None, metadata={"help": "Rank of the frozen low-rank factorisation (default 7r/8)."}
    )
    ce_recompute_every: int = field(
        default=200, metadata={"help": "Reselect kept channels every this many backward passes."}
    )
    ce_score: str = field(
        default="activation_aware", metadata={"help": f"Channel score, one of {SCORES}."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        for name in _UNSUPPORTED_LORA_OPTIONS:
            if getattr(self, name, None):
                raise ValueError(f"CE-LoRA does not support the LoRA option {name}={getattr(self, name)!r}")
        if isinstance(self.ce_ratio, dict):
            if not self.ce_ratio:
                raise ValueError("ce_ratio must not be an empty dict (use 1.0 for an exact backward everywhere)")
            for pattern, ratio in self.ce_ratio.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"ce_ratio keys must be non-empty module-name patterns, got {pattern!r}")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"ce_ratio key {pattern!r} is not a valid regular expression: {exc}") from None
                self.ce_ratio[pattern] = _check_ratio(ratio, f"ce_ratio[{pattern!r}]")
        else:
            self.ce_ratio = _check_ratio(self.ce_ratio, "ce_ratio")
        if self.ce_svd_rank is not None and (
            isinstance(self.ce_svd_rank, bool) or not isinstance(self.ce_svd_rank, int) or self.ce_svd_rank <= 0
        ):
            raise ValueError(f"ce_svd_rank must be a positive int or None, got {self.ce_svd_rank!r}")
        if (
            isinstance(self.ce_recompute_every, bool)
            or not isinstance(self.ce_recompute_every, int)
            or self.ce_recompute_every <= 0
        ):
            raise ValueError(f"ce_recompute_every must be a positive int, got {self.ce_recompute_every!r}")
        if self.ce_score not in SCORES:
            raise ValueError(f"ce_score must be one of {SCORES}, got {self.ce_score!r}")

    @property
    def init_weights(self) -> bool | str:
        """LoRA's ``init_lora_weights`` under the name PEFT uses for every other method: ``save_pretrained(...,
        path_initial_model_for_weight_conversion=...)`` resets ``init_weights`` unless the type is LoRA's, and
        CE-LoRA's initialisation (PiSSA, OLoRA, ...) is LoRA's."""
        return self.init_lora_weights

    @init_weights.setter
    def init_weights(self, value: bool | str) -> None:
        self.init_lora_weights = value

    def ratio_for(self, module_name: str) -> float:
        """Keep ratio of the module called ``module_name`` (1.0 = exact backward).

        Raises ``ValueError`` when patterns with different ratios match the module: the order of ``ce_ratio``'s keys
        cannot decide, since ``adapter_config.json`` is written with sorted keys and would reload another order.
        """
        if not isinstance(self.ce_ratio, dict):
            return self.ce_ratio
        matches = self.ratio_patterns_matching(module_name)
        if len(set(matches.values())) > 1:
            raise ValueError(
                f"ce_ratio patterns with different ratios match {module_name!r}: {matches}; make them disjoint"
            )
        return next(iter(matches.values()), 1.0)

    def ratio_patterns_matching(self, module_name: str) -> dict[str, float]:
        """The patterns of a dict ``ce_ratio`` that match ``module_name`` (as ``rank_pattern``'s), with their ratios."""
        return {p: r for p, r in self.ce_ratio.items() if re.match(rf"(.*\.)?(?:{p})$", module_name)}

    def svd_rank_for(self, lora_rank: int) -> int:
        """SVD rank for a module whose LoRA rank is ``lora_rank``."""
        return self.ce_svd_rank if self.ce_svd_rank is not None else max(1, 7 * lora_rank // 8)
