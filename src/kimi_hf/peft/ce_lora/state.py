"""Per-layer CE-LoRA state: frozen factorisation, current channel selection, backward counter.

Kept as plain tensors on a plain object, not as module buffers: the factors are derived from the frozen
weight (never saved; recomputed deterministically after loading; the backward counter and the channel selection
are not saved either, so a resumed run selects again on its first backward), must not be broadcast by DDP every
step, and must not appear in ``state_dict``. They are rebuilt whenever the weight's device, dtype, storage or
values change (``.to()``, merging, in-place edits, a new weight tensor). Writes through ``weight.data`` are the
exception: they bypass torch's version counter, so the factors and the kept rows follow the old values until the
next selecting (exact) backward, which always compares the values; edit a frozen weight in place under
``torch.no_grad()`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_hf.kernels.ce_lora import (
    CEPlan,
    ce_pack_grad_output,
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
    lora_rank: int = 0  # slots for LoRA's own input gradient in the packed GEMM


class CEChannelState:
    """Everything one adapted ``nn.Linear`` needs to approximate ``dX = dY W`` (``W`` is ``[O, I]``).

    ``steps`` counts backward passes through the layer. Step ``0, N, 2N, ...`` (``N = recompute_every``)
    computes the exact ``dY W`` and, from that step's ``dY``, selects the kept channels used by the next
    ``N - 1`` steps. A recomputed forward (gradient checkpointing) runs no backward, so it is not counted.
    Neither is a selecting backward whose ``dY`` is not finite (an fp16 overflow step, which the loss scaler
    skips): it keeps the previous selection and the next backward is exact and selects instead.
    """

    def __init__(self, options: CEOptions, out_features: int, backend: str | None = None) -> None:
        self.options = options
        self.backend = backend
        self.keep = kept_channels(out_features, options.ratio, options.svd_rank + options.lora_rank)
        self.steps = 0
        self.selections = 0
        self.b0: torch.Tensor | None = None  # [O, r] fp32
        self.a0: torch.Tensor | None = None  # [r, I] fp32
        self.row_norms: torch.Tensor | None = None  # [O] fp32, ||R[i, :]||
        self.plan: CEPlan | None = None
        self._weight_key: tuple | None = None
        self._fingerprint: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        """True when the kept channels would cost as much as the exact GEMM (e.g. ratio 1)."""
        return self.keep is None

    def grad_input(
        self,
        grad_output: torch.Tensor,
        weight: torch.Tensor,
        lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``dX [T, I]`` (dtype of ``grad_output``) for ``dY [T, O]`` through the frozen ``weight [O, I]``.

        With ``lora = (A [r, I], B [O, r], s)`` (``grad_output``'s dtype) LoRA's own input gradient
        ``(dY s B) A`` is added to ``dX`` (in the same GEMM on approximate steps) and ``dY s B [T, r]``,
        which LoRA's ``A`` gradient needs, is returned as well (else ``None``).
        """
        dtype = grad_output.dtype
        if self.exact or self._due(weight):
            grad_input = grad_output @ weight.to(dtype)
            if not self.exact and self._reselect(grad_output, weight):
                self.steps += 1
            if lora is None:
                return grad_input, None
            lora_a, lora_b, scaling = lora
            dy_b = grad_output @ (lora_b * scaling)
            return grad_input.addmm_(dy_b, lora_a), dy_b
        if self.plan.stack.dtype != dtype:  # e.g. autocast switched on or off
            self.plan = make_plan(weight, self.b0, self.a0, self.plan.index, dtype, self.options.lora_rank)
        packed = ce_pack_grad_output(grad_output, self.plan, self.backend, lora=lora)
        self.steps += 1
        return packed @ self.plan.stack, (packed[:, self.plan.lora_slots] if lora is not None else None)

    def _due(self, weight: torch.Tensor) -> bool:
        """Whether this backward is exact and reselects (every ``recompute_every``-th, or no valid plan)."""
        selecting = self.steps % self.options.recompute_every == 0
        # A selecting step compares the values even under an unchanged key: a write through ``weight.data`` (PEFT's
        # unsafe merge and unmerge write so) leaves the key as it was, and the factors then stayed stale for good.
        # One more read of W per selection, which reads W for the exact product anyway.
        self._sync_factors(weight, compare_values=selecting)
        return selecting or self.plan is None

    def _sync_factors(self, weight: torch.Tensor, compare_values: bool = False) -> None:
        """(Re)build the factors when the weight's device, dtype, shape or values changed.

        A bumped version counter or new storage alone is not a change: FSDP, for one, rewrites the same values
        into the weight's storage every step. Only then (or with ``compare_values``) is a fingerprint (sum and
        norm, one read of ``W``) compared. The storage's address is in the key because a new weight tensor starts
        at version 0 again.
        """
        key = (weight.device, weight.dtype, tuple(weight.shape), weight._version, weight.data_ptr())
        if key == self._weight_key and not compare_values:
            return
        with torch.no_grad():
            acc = torch.promote_types(weight.dtype, torch.float32)
            fingerprint = torch.stack([weight.sum(dtype=acc), torch.linalg.vector_norm(weight, dtype=acc)])
            same_values = (
                self._weight_key is not None
                and key[:3] == self._weight_key[:3]
                and torch.equal(fingerprint, self._fingerprint)
            )
            if not same_values:
                self.b0, self.a0 = low_rank_factors(weight, self.options.svd_rank)
                self.row_norms = residual_row_norms(weight, self.b0, self.a0)
                self.plan = None  # the next backward is exact and reselects against the new weight
        self._weight_key, self._fingerprint = key, fingerprint

    @torch.no_grad()
    def _reselect(self, grad_output: torch.Tensor, weight: torch.Tensor) -> bool:
        """Select the kept channels from ``dY [T, O]``; ``False`` (nothing changed) when the scores are not finite.

        A NaN/inf ``dY`` (fp16 overflow) ranks channels arbitrarily (``topk`` puts NaN first): that selection would
        be used for ``recompute_every - 1`` steps. Checking costs one host sync per selection, not per step.
        """
        scores = channel_scores(grad_output, self.row_norms, self.options.score)
        if not bool(torch.isfinite(scores).all()):
            return False
        index = select_channels(scores, self.keep)
        self.plan = make_plan(weight, self.b0, self.a0, index, grad_output.dtype, self.options.lora_rank)
        self.selections += 1
        return True
