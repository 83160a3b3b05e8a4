"""A training step's forward and backward captured once in a CUDA graph and replayed for every batch.

Kimi Linear's training step is a few thousand small kernels (about 1,700 torch launches and 450 Triton launches per
step of the ~1B model at B2 T4096, against 88 ms of GPU time), so the host issuing them, not the GPU, can set the
step's wall time. A replay issues the whole step as one graph launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class GraphedLossStep:
    """``model(**batch).loss`` and its backward, captured in a CUDA graph once and replayed per batch.

    Usage (static shapes: every batch has the example's keys, shapes and dtypes)::

        step = GraphedLossStep(model, {"input_ids": ids, "labels": ids})  # warm-up steps, then the capture
        for batch in batches:
            loss = step(batch)      # copies the batch in and replays; every .grad now holds this batch's gradient
            optimizer.step()        # outside the graph
            optimizer.zero_grad()   # allowed: the gradients are handed back to the parameters at the next call

    Semantics:
        - Each call OVERWRITES the parameters' gradients (no accumulation across calls: for gradient accumulation,
          sum them yourself), and the returned loss is a tensor that the next call overwrites (clone it to keep it).
        - The step must be a function of its inputs and of GPU state. Python-side state that a forward changes
          (counters, schedules, tensors handed from one forward to the next) is frozen at capture. The cases this
          package knows are refused: the MoE router's bias updates (``router_bias_update_rate > 0``) and CE-LoRA
          adapters (their kept channels are reselected on a step schedule).
        - The step must not synchronise with the host: CUDA refuses to capture it. Kimi Linear's is free of
          synchronisations without padding or packing, with its MoE on the grouped-GEMM path (bf16/fp16 weights on
          Hopper or newer; the per-expert loop of other dtypes reads the expert sizes back to the host). Both are
          refused up front: an ``attention_mask`` (all ones too), ``cu_seqlens``, ``position_ids`` of a batch of
          one, and an MoE that would take the loop.

    Args:
        model: a model on one CUDA device whose ``forward(**batch)`` returns an output with ``.loss``; its mode
            (train/eval) at construction is the one captured.
        example_batch: tensors on the model's device; their shapes and dtypes fix those of every later batch.
        warmup_steps: eager steps on a side stream before the capture (compile kernels, choose algorithms).
        forward_kwargs: constant non-tensor arguments of every forward (e.g. ``{"use_cache": False}``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_batch: Mapping[str, torch.Tensor],
        warmup_steps: int = 3,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if not isinstance(example_batch, Mapping) or not example_batch:
            raise ValueError(f"example_batch must map names to tensors, got {type(example_batch).__name__}")
        for name, value in example_batch.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"example_batch[{name!r}] must be a tensor, got {type(value).__name__}")
        self._refuse_python_state(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("the model has no parameter that requires a gradient: nothing to train")
        devices = {str(p.device) for p in self._params} | {str(t.device) for t in example_batch.values()}
        if len(devices) != 1 or not next(iter(devices)).startswith("cuda"):
            raise ValueError(f"GraphedLossStep needs the model and the batch on one CUDA device, got {sorted(devices)}")
        device = self._params[0].device
        self._static = {name: t.detach().clone() for name, t in example_batch.items()}
        kwargs = {**(forward_kwargs or {}), **self._static}
        self._refuse_host_syncs(model, kwargs)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._clear_grads()
                model(**kwargs).loss.backward()
        torch.cuda.current_stream(device).wait_stream(side)
        # Captured with no gradient present: backward allocates them from the graph's pool, and every replay
        # rewrites those same tensors.
        self._clear_grads()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            loss = model(**kwargs).loss
            loss.backward()
        # Keep the loss's memory, not its autograd graph: live nodes of the capture (the parameters' gradient
        # accumulators) would otherwise be reused, on the capture's stream, by eager steps taken in between.
        self._loss = loss.detach()
        self._grads = [p.grad for p in self._params]

    @staticmethod
    def _refuse_python_state(model: nn.Module) -> None:
        """Refuse the models of this package whose forward hands Python-side state from one step to the next, and
        models under DDP or FSDP."""
        rates = {getattr(m.config, "router_bias_update_rate", 0.0) for m in model.modules() if hasattr(m, "config")}
        rate = max(rates, default=0.0)  # any model of ours inside a wrapper (a PEFT model, nn.Sequential, ...)
        if rate:
            raise ValueError(
                f"router_bias_update_rate={rate}: the MoE router's bias update hands each forward's expert loads to "
                "the next in Python, which a replayed graph cannot do; set it to 0 to capture the step"
            )
        from .peft.ce_lora.layer import CELinear

        if any(isinstance(m, CELinear) for m in model.modules()):
            raise ValueError("CE-LoRA adapters reselect their kept channels on a step schedule kept in Python, which "
                             "a replayed graph cannot follow; train them eagerly")  # fmt: skip
        # DDP and FSDP reduce (and FSDP gathers) in hooks around backward, with buckets and collectives decided in
        # Python at each step; their capture and replay are untested here, and a replay that skipped a reduction
        # would train each rank on its own gradients without a word.
        if not torch.distributed.is_available():
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel

        fsdp2 = getattr(torch.distributed.fsdp, "FSDPModule", ())
        wrapped = [type(m).__name__ for m in model.modules()
                   if isinstance(m, (DistributedDataParallel, FullyShardedDataParallel, fsdp2))]  # fmt: skip
        if wrapped:
            raise ValueError(f"GraphedLossStep does not capture distributed training ({wrapped[0]}): its gradient "
                             "reductions run in hooks around backward; train such models eagerly")  # fmt: skip

    @staticmethod
    def _refuse_host_syncs(model: nn.Module, inputs: Mapping[str, Any]) -> None:
        """Refuse the inputs and settings that make this package's Kimi Linear models read values back to the host.

        CUDA would break the capture off with an error that names neither (``operation failed due to a previous
        error during capture``, or a refused copy to the host), and an all-ones ``attention_mask``, which
        tokenizers and collators hand over, is read back as much as a padded one.
        """
        from .models.kimi_linear import modeling_kimi_linear as kimi_linear

        if not any(isinstance(m, kimi_linear.KimiLinearModel) for m in model.modules()):
            return
        packing = ("attention_mask", "cu_seqlens", "cu_seq_lens_q", "seq_idx")
        syncing = [name for name in packing if inputs.get(name) is not None]
        positions = inputs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.shape[0] == 1:  # a batch of one is checked for packing
            syncing.append("position_ids")
        if syncing:
            raise ValueError(
                f"Kimi Linear reads {', '.join(syncing)} back to the host to lay out padding and packing, which a "
                "CUDA graph cannot capture: leave them out (unpadded, unpacked batches only)"
            )
        for moe in (m for m in model.modules() if isinstance(m, kimi_linear.KimiLinearSparseMoE)):
            weight = moe.experts[0].w1.weight
            if not (moe.use_grouped_mm and moe._experts_read_in_place() and kimi_linear._grouped_mm_ok(weight)):
                raise ValueError(
                    f"Kimi Linear's MoE would run its experts as a loop (experts {weight.dtype} on "
                    f"{weight.device}, use_grouped_mm={moe.use_grouped_mm}, plain nn.Linear experts: "
                    f"{moe._experts_read_in_place()}), which reads the expert sizes back to the host; the capturable "
                    "grouped-GEMM path needs bf16/fp16 plain nn.Linear experts on a Hopper or newer GPU"
                )

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Copy ``batch`` into the captured inputs, replay; returns the loss (overwritten by the next call)."""
        if set(batch) != set(self._static):
            raise ValueError(f"batch has keys {sorted(batch)}, the step was captured with {sorted(self._static)}")
        for name, t in batch.items():
            static = self._static[name]
            if t.shape != static.shape or t.dtype != static.dtype:
                raise ValueError(
                    f"batch[{name!r}] is {t.dtype} {tuple(t.shape)}, the step was captured for {static.dtype} "
                    f"{tuple(static.shape)}"
                )
            static.copy_(t, non_blocking=True)
        self._graph.replay()
        for p, g in zip(self._params, self._grads):
            p.grad = g
        return self._loss
