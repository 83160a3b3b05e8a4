"""CE-LoRA tuner: PEFT's ``LoraModel`` that puts :class:`CELinear` on targeted ``nn.Linear`` modules."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers
from peft.utils.peft_types import PeftType
from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers, get_model_conversion_mapping
from torch import nn

from .config import CE_FIELDS, PAPER_RATIOS, CELoraConfig
from .layer import CELinear
from .state import CEOptions


class CELoraModel(LoraModel):
    """LoRA with CE-LoRA's approximate frozen-weight backward (arXiv 2502.01378).

    Everything but the layer class is LoRA's: trainable parameters, state-dict keys (prefix ``lora_``),
    merging, multiple adapters. Targets that are not plain ``nn.Linear`` (embeddings, convolutions,
    ``target_parameters``) get PEFT's ordinary LoRA layers, with a warning where a keep ratio below 1 asked for the
    approximation (not for embeddings, which have no input gradient to approximate).
    """

    prefix: str = "lora_"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """As LoRA's. On transformers 5 PEFT first rewrites the targets of MoE models whose experts became fused
        parameters (e.g. ``deepseek_v3``'s ``gate_proj``/``up_proj``/``down_proj`` to ``experts.gate_up_proj`` /
        ``experts.down_proj``), for LoRA configs only: CE-LoRA's config gets the same rewrite, so that it targets
        what LoRA targets (its routed experts were left untrained) and an exported LoRA adapter means the same.
        A ``ce_ratio`` that gives a target two ratios is refused before any layer is replaced."""
        config = self.peft_config[adapter_name]
        if hasattr(getattr(model, "config", None), "model_type"):
            peft_type, config.peft_type = config.peft_type, PeftType.LORA
            try:
                convert_peft_config_for_transformers(config, model, get_model_conversion_mapping(model))
            finally:
                config.peft_type = peft_type
        # Patterns of ce_ratio that give a target two ratios raise in _create_and_replace, part-way through the
        # injection: checked first, so that a refused config leaves the model as it was. The targets are resolved on a
        # copy as LoRA resolves them ("all-linear", and target_modules=None taking the model type's defaults).
        probe = _maybe_include_all_linear_layers(
            self._prepare_adapter_config(copy.copy(config), self.get_model_config(model)), model
        )
        if probe.target_modules is not None:
            for name, _ in model.named_modules():
                if name and self._check_target_module_exists(probe, name):
                    config.ratio_for(name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        _warn_if_ratio_patterns_unmatched(model, adapter_name, config)
        _warn_if_nothing_approximated(model, adapter_name, config)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args: Any,
                             **kwargs: Any) -> None:  # fmt: skip
        """As LoRA's. The combined adapter takes the CE-LoRA options (``ce_*``) of ``adapters[0]``, as LoRA takes its
        other options: a warning names the options where another adapter differs."""
        first = self.peft_config[adapters[0]]
        for name in adapters[1:]:
            other = self.peft_config.get(name)
            differ = [f"{f}={getattr(other, f)!r}" for f in CE_FIELDS
                      if other is not None and getattr(other, f, None) != getattr(first, f)]  # fmt: skip
            if differ:
                warnings.warn(f"add_weighted_adapter: {adapter_name!r} takes {adapters[0]!r}'s CE-LoRA options; "
                              f"{name!r} differs in {', '.join(differ)}")  # fmt: skip
        super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    def _create_and_replace(
        self,
        lora_config: CELoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        module = getattr(parent, target_name)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        # An embedding has no input gradient to approximate; any other target left to LoRA loses the speed-up.
        approximated = isinstance(module, CELinear) or isinstance(base, nn.Embedding)
        if not approximated and lora_config.ratio_for(current_key) < 1.0:
            warnings.warn(f"CE-LoRA approximates the backward of nn.Linear targets only: {current_key} "
                          f"({type(base).__name__}) gets LoRA's exact backward")  # fmt: skip
        if isinstance(module, CELinear) and adapter_name in module.r:
            options = CEOptions(
                ratio=lora_config.ratio_for(current_key),
                svd_rank=lora_config.svd_rank_for(module.r[adapter_name]),
                recompute_every=lora_config.ce_recompute_every,
                score=lora_config.ce_score,
                lora_rank=module.r[adapter_name],
            )
            module.set_ce_options(adapter_name, options)

    @staticmethod
    def _create_new_module(lora_config: CELoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if type(base) is nn.Linear and kwargs.get("parameter_name") is None:
            if lora_config.fan_in_fan_out:  # as PEFT's LoRA: an nn.Linear weight is [out, in]
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                              "Setting fan_in_fan_out to False.")  # fmt: skip
                lora_config.fan_in_fan_out = False
            return CELinear(target, adapter_name, config=lora_config, **kwargs)
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)


def _warn_if_ratio_patterns_unmatched(model: nn.Module, adapter_name: str, config: CELoraConfig) -> None:
    """Warn about ``ce_ratio`` keys that match none of the adapter's targets, as PEFT does for ``rank_pattern``.

    A typo in one key (``{"v_proj": 0.5, "down_porj": 0.5}``) left its layers on the exact backward without a word.
    Not for the default (the paper's ratios name projections a model need not target) nor where no key matches
    (:func:`_warn_if_nothing_approximated` names that case).
    """
    if not isinstance(config.ce_ratio, dict) or config.ce_ratio == PAPER_RATIOS:
        return
    targets = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    matched = {pattern for name in targets for pattern in config.ratio_patterns_matching(name)}
    unmatched = sorted(set(config.ce_ratio) - matched)
    if matched and unmatched:
        warnings.warn(f"CE-LoRA adapter {adapter_name!r}: the ce_ratio keys {unmatched} match none of its targets and "
                      "were ignored")  # fmt: skip


def _warn_if_nothing_approximated(model: nn.Module, adapter_name: str, config: CELoraConfig) -> None:
    """Warn when ``config`` asks for a keep ratio below 1 yet every ``CELinear`` of the adapter has the exact backward.

    The adapter then trains as plain LoRA, without CE-LoRA's speed-up: ``ce_ratio``'s patterns match none of the
    targets (e.g. the default's ``v_proj``/``o_proj``/``up_proj``/``down_proj`` on a model with other names), or the
    matched layers are too narrow for the kept channels plus the factorisation's rank to cost less than ``dY W``.
    """
    ratios = config.ce_ratio.values() if isinstance(config.ce_ratio, dict) else [config.ce_ratio]
    if min(ratios) >= 1.0:
        return  # an exact backward was asked for
    states = {n: m.ce_state[adapter_name] for n, m in model.named_modules()
              if isinstance(m, CELinear) and adapter_name in m.ce_state}  # fmt: skip
    if not states or any(not state.exact for state in states.values()):
        return
    matched = [n for n, state in states.items() if state.options.ratio < 1.0]
    if not matched:
        why = f"ce_ratio={config.ce_ratio!r} matches none of its {len(states)} nn.Linear targets"
        example = next(iter(states))
    else:
        why = (f"the {len(matched)} layers ce_ratio matches are too narrow for the kept channels plus the "
               "factorisation's rank (ce_svd_rank, default 7r/8) to cost less than the exact backward")  # fmt: skip
        example = matched[0]
    warnings.warn(f"CE-LoRA adapter {adapter_name!r} approximates no layer's backward and trains as plain LoRA: "
                  f"{why} (e.g. {example})")  # fmt: skip
