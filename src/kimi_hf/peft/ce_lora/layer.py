"""CE-LoRA layer: PEFT's LoRA ``Linear`` whose backward through the frozen base weight is approximated."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .function import ce_linear, ce_lora_linear
from .state import CEChannelState, CEOptions


class CELinear(LoraLinear):
    """LoRA on an ``nn.Linear``; in training, ``dX`` through the frozen weight follows CE-LoRA.

    Forward values, LoRA's branch and all parameter gradients are PEFT LoRA's, up to rounding (the fused path adds
    base and scaled branch in one rounding, PEFT in three; see the README). Only the input gradient
    through the frozen base weight ``W [O, I]`` is approximated (see :class:`CEChannelState`). The CE
    path is taken when the layer trains (``self.training``, grad enabled, adapters enabled and unmerged,
    ``W`` frozen, no forward hooks on the base layer, no extra forward arguments); every other call is
    LoRA's own forward. With one active adapter, no dropout and no LoRA bias, base and LoRA branch run
    as one fused autograd Function (:func:`ce_lora_linear`), in PEFT LoRA's dtypes (the branch in the
    adapter's dtype: fp32 under ``autocast_adapter_dtype=True``, PEFT's default).
    """

    other_param_names = LoraLinear.other_param_names + ("ce_state",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.ce_state: dict[str, CEChannelState] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        """As LoRA's; re-creating an adapter that has CE options at another rank re-sizes them.

        EVA (``initialize_lora_eva_weights``) redistributes ranks this way, calling ``update_layer`` directly: CE's
        packed backward kept ``r`` slots for LoRA's own input gradient and a ``7r/8`` factorisation sized for the old
        rank, and the first approximate backward failed with a shape mismatch.
        """
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        state = getattr(self, "ce_state", {}).get(adapter_name)  # none yet while LoRA's __init__ runs
        if state is not None and state.options.lora_rank != r:
            options = dataclasses.replace(state.options, lora_rank=r, svd_rank=config.svd_rank_for(r))
            self.set_ce_options(adapter_name, options)

    def set_ce_options(self, adapter_name: str, options: CEOptions) -> None:
        """Attach (or replace) ``adapter_name``'s CE options; its factors are built at its first backward."""
        self.ce_state[adapter_name] = CEChannelState(options, self.out_features)

    def _ce_adapters(self, base: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
        """Active adapters of this layer when the CE path applies to this call on ``base`` (the base layer), else
        ``None``."""
        if not (self.training and torch.is_grad_enabled()) or args or kwargs:
            return None
        if self.disable_adapters or self.merged:
            return None
        if type(base) is not nn.Linear or base.weight.requires_grad:
            return None
        # accelerate's hook (offloading) must see the call; it is a plain attribute, read without a failed lookup
        if base._forward_hooks or base._forward_pre_hooks or base.__dict__.get("_hf_hook") is not None:
            return None
        a_modules = self.lora_A
        names = [n for n in self.active_adapters if n in a_modules]
        if not names or names[0] not in self.ce_state:
            return None
        return names

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Runs once per adapted projection and step, on a training step whose wall time can follow the host: the base
        # layer (PEFT resolves it through failing attribute lookups) and each submodule are looked up once.
        base = self.get_base_layer()
        names = self._ce_adapters(base, args, kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        if self.__dict__.get("_is_replica", False):
            # nn.DataParallel's replicas share this layer's Python attributes, so all of them would use one state:
            # its factors rebuilt for each replica's device at every step, its counter raced by their threads.
            raise RuntimeError(
                "CE-LoRA layers cannot run under torch.nn.DataParallel, which the Trainer uses on several GPUs when "
                "the script was not started by torchrun or accelerate launch: its replicas would share one CE-LoRA "
                "state. Launch with `torchrun --nproc_per_node N` or `accelerate launch` (DistributedDataParallel), "
                "or make one GPU visible (CUDA_VISIBLE_DEVICES)"
            )
        name = names[0]
        state = self.ce_state[name]  # adapters share the base weight: the first one's options decide
        a_weight, lora_b = self.lora_A[name].weight, self.lora_B[name]
        fusable = isinstance(self.lora_dropout[name], nn.Identity) and lora_b.bias is None
        # with input casting off (peft.helpers.disable_input_dtype_casting), x meets A in its own dtype
        fusable = fusable and (getattr(self, "cast_input_dtype_enabled", True) or x.dtype == a_weight.dtype)
        weight, bias = base.weight, base.bias
        if len(names) == 1 and fusable:
            return ce_lora_linear(x, weight, bias, a_weight, lora_b.weight, self.scaling[name], state)
        if state.exact or not x.requires_grad:
            return super().forward(x, *args, **kwargs)
        result = ce_linear(x, weight, bias, state)
        result_dtype = result.dtype
        for name in names:  # PEFT LoRA's (vanilla) branch, unchanged
            lora_a = self.lora_A[name]
            x_a = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + self.lora_B[name](lora_a(self.lora_dropout[name](x_a))) * self.scaling[name]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "ce_" + super().__repr__()
