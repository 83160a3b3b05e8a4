"""CE-LoRA layer: PEFT's LoRA ``Linear`` whose backward through the frozen base weight is approximated."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .function import ce_linear
from .state import CEChannelState, CEOptions


class CELinear(LoraLinear):
    """LoRA on an ``nn.Linear``; in training, ``dX`` through the frozen weight follows CE-LoRA.

    Forward values, LoRA's branch and all parameter gradients are PEFT LoRA's. Only the input gradient
    through the frozen base weight ``W [O, I]`` is approximated (see :class:`CEChannelState`). The
    approximation is used when the layer trains (``self.training``, grad enabled, ``x`` needs a gradient,
    adapters enabled and unmerged, ``W`` frozen, no forward hooks on the base layer); every other call is
    LoRA's own forward.
    """

    other_param_names = LoraLinear.other_param_names + ("ce_state",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.ce_state: dict[str, CEChannelState] = {}

    def set_ce_options(self, adapter_name: str, options: CEOptions) -> None:
        """Attach (or replace) ``adapter_name``'s CE options; its factors are built at its first backward."""
        self.ce_state[adapter_name] = CEChannelState(options, self.out_features)

    def _active_ce_state(self, x: torch.Tensor, args: tuple, kwargs: dict) -> CEChannelState | None:
        """The state whose approximation applies to this call, or ``None`` for LoRA's exact forward."""
        if not (self.training and torch.is_grad_enabled() and x.requires_grad):
            return None
        if self.disable_adapters or self.merged or args or kwargs:
            return None
        base = self.get_base_layer()
        if type(base) is not nn.Linear or base.weight.requires_grad:
            return None
        if base._forward_hooks or base._forward_pre_hooks or getattr(base, "_hf_hook", None) is not None:
            return None  # e.g. accelerate offloading: the hook must see the call
        for name in self.active_adapters:  # the first active CE adapter decides (they share the base weight)
            state = self.ce_state.get(name)
            if state is not None and name in self.lora_A:
                return None if state.exact else state
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._active_ce_state(x, args, kwargs)
        if state is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        result = ce_linear(x, base.weight, base.bias, state)
        result_dtype = result.dtype
        for name in self.active_adapters:  # PEFT LoRA's (vanilla) branch, unchanged
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name]
            x_a = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + self.lora_B[name](lora_a(self.lora_dropout[name](x_a))) * self.scaling[name]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "ce_" + super().__repr__()
