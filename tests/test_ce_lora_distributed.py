"""CE-LoRA under DDP and FSDP2: two CPU processes (gloo) against a single-process emulation of data parallelism.

Each rank keeps its own channel selection, made from its own ``dY`` (CE-LoRA's state is per layer and per
process, never a buffer DDP would broadcast). So two ranks training together must end exactly where two replicas
of the model end when each runs its own batch through its own CE-LoRA state and both apply the averaged LoRA
gradients. The steps cover an exact step that selects the channels and approximate steps that use them.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close_rel
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from test_ce_lora import ce_config, ce_states, tiny_llama, tokens

WORLD = 2
STEPS = 4  # recompute_every 2: exact steps 0 and 2 select, steps 1 and 3 use the selection
LR = 0.5
TIMEOUT = 120  # seconds: a collective that waits longer fails, and the test fails after twice that


def _model() -> torch.nn.Module:
    model = get_peft_model(tiny_llama(seed=3, layers=2), ce_config(ce_ratio=0.5, ce_recompute_every=2))
    return model.train()


def _batch(step: int, rank: int) -> torch.Tensor:
    return tokens(100 * step + rank)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _worker(rank: int, mode: str, init_file: str, out: str) -> None:
    """Trains and saves, then leaves with ``os._exit``: torch's ``destroy_process_group`` (and the process group's
    destructor at interpreter exit) joins gloo's worker thread while holding the GIL, and that thread can be
    waiting for the GIL to release a finished allreduce's Python state: a deadlock seen with torch 2.13 (see
    pytorch/pytorch#56297). The results are on disk by then; a failure prints its traceback and exits 1."""
    try:
        _train_and_save(rank, mode, init_file, out)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _train_and_save(rank: int, mode: str, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):  # gloo over loopback: no dependence on the host's network setup
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT)
    )
    model = _model()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = torch.optim.SGD(_trainable(model), lr=LR)
    for step in range(STEPS):
        ids = _batch(step, rank)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # full_tensor() gathers an FSDP shard (a collective: every rank calls it)
    params = {n: getattr(p, "full_tensor", p.detach)().detach().contiguous()
              for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    selections = torch.tensor([s.selections for s in ce_states(model)], dtype=torch.float32)
    save_file(params | {"selections": selections}, os.path.join(out, f"rank{rank}.safetensors"))
    dist.barrier()  # neither rank leaves while the other may still need it


def _emulated() -> tuple[dict[str, torch.Tensor], list[int]]:
    """Two replicas, each with its own CE-LoRA state and batches, stepped with the mean of their LoRA gradients."""
    replicas = [_model() for _ in range(WORLD)]
    optimizers = [torch.optim.SGD(_trainable(m), lr=LR) for m in replicas]
    for step in range(STEPS):
        for rank, model in enumerate(replicas):
            ids = _batch(step, rank)
            model(input_ids=ids, labels=ids).loss.backward()
        for params in zip(*(_trainable(m) for m in replicas)):
            mean = sum(p.grad for p in params) / WORLD
            for p in params:
                p.grad = mean.clone()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    named = {n: p.detach() for n, p in replicas[0].named_parameters() if p.requires_grad}
    return named, [s.selections for s in ce_states(replicas[0])]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_matches_emulation(mode, tmp_path):
    workers = mp.spawn(_worker, args=(mode, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 2 * TIMEOUT
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {mode} workers did not finish within {2 * TIMEOUT} s")
    expected, selections = _emulated()
    # two selections (steps 0 and 2) in every layer whose input needs a gradient (not layer 0's q/k/v: the frozen
    # embedding's output does not)
    assert set(selections) == {0, 2} and selections.count(2) > selections.count(0), selections
    for rank in range(WORLD):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert got.pop("selections").int().tolist() == selections, f"rank {rank} selected channels otherwise"
        assert got.keys() == expected.keys(), "no trainable parameters beyond LoRA's, none missing"
        for name, value in expected.items():
            assert_close_rel(got[name], value, 1e-5, f"{mode} rank {rank} {name}")
    initial = {n: p.detach() for n, p in _model().named_parameters() if p.requires_grad}
    moved = [n for n in expected if not torch.equal(expected[n], initial[n])]
    assert len(moved) == len(expected), "every LoRA weight trained (the comparison is not of untouched weights)"

