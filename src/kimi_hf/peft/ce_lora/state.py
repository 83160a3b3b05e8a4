"""Per-layer CE-LoRA state: frozen factorisation, current channel selection, backward counter.

Kept as plain tensors on a plain object, not as module buffers: they are derived from the frozen
weight (never saved; recomputed deterministically after loading), must not be broadcast by DDP every
step, and must not appear in ``state_dict``. They follow the weight's device and are rebuilt whenever
the weight's storage or version counter changes (``.to()``, merging, in-place edits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_hf.kernels.ce_lora import (
    CEPlan,
    ce_grad_input,
    channel_scores,
    kept_channels,
    low_rank_factors,
    make_plan,
    residual_row_norms,
    select_channels,
)


@dataclass(frozen=True)
class CEOptions:
    """Resolved CE-LoRA options of one layer for one adapter (``ratio`` 1.0 = exact backward)."""

    ratio: float
    svd_rank: int
    recompute_every: int
    score: str


class CEChannelState:
    """Everything one adapted ``nn.Linear`` needs to approximate ``dX = dY W`` (``W`` is ``[O, I]``).

    ``steps`` counts backward passes through the layer. Step ``0, N, 2N, ...`` (``N = recompute_every``)
    computes the exact ``dY W`` and, from that step's ``dY``, selects the kept channels used by the next
    ``N - 1`` steps. A recomputed forward (gradient checkpointing) runs no backward, so it is not counted.
    """

    def __init__(self, options: CEOptions, out_features: int, backend: str | None = None) -> None:
        self.options = options
        self.backend = backend
        self.keep = kept_channels(out_features, options.ratio, options.svd_rank)
        self.steps = 0
        self.selections = 0
        self.b0: torch.Tensor | None = None  # [O, r] fp32
        self.a0: torch.Tensor | None = None  # [r, I] fp32
        self.row_norms: torch.Tensor | None = None  # [O] fp32, ||R[i, :]||
        self.plan: CEPlan | None = None
        self._weight_key: tuple | None = None

    @property
    def exact(self) -> bool:
        """True when the kept channels would cost as much as the exact GEMM (e.g. ratio 1)."""
        return self.keep is None

    def grad_input(self, grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``dX [T, I]`` (dtype of ``grad_output``) for ``dY [T, O]`` through the frozen ``weight [O, I]``."""
        if self.exact:
            return grad_output @ weight.to(grad_output.dtype)
        self._sync_factors(weight)
        if self.steps % self.options.recompute_every == 0 or self.plan is None:
            grad_input = grad_output @ weight.to(grad_output.dtype)
            self._reselect(grad_output, weight)
        else:
            if self.plan.stack.dtype != grad_output.dtype:  # e.g. autocast switched on or off
                self.plan = make_plan(weight, self.b0, self.a0, self.plan.index, grad_output.dtype)
            grad_input = ce_grad_input(grad_output, self.plan, self.backend)
        self.steps += 1
        return grad_input

    def _sync_factors(self, weight: torch.Tensor) -> None:
        key = (weight.device, weight.data_ptr(), weight._version, tuple(weight.shape))
        if key == self._weight_key:
            return
        with torch.no_grad():
            self.b0, self.a0 = low_rank_factors(weight, self.options.svd_rank)
            self.row_norms = residual_row_norms(weight, self.b0, self.a0)
        self.plan = None  # the next backward is exact and reselects against the new weight
        self._weight_key = key

    @torch.no_grad()
    def _reselect(self, grad_output: torch.Tensor, weight: torch.Tensor) -> None:
        scores = channel_scores(grad_output, self.row_norms, self.options.score)
        index = select_channels(scores, self.keep)
        self.plan = make_plan(weight, self.b0, self.a0, index, grad_output.dtype)
        self.selections += 1
