"""Data parallelism on two CPU processes (gloo) against single-process emulations: CE-LoRA under DDP and FSDP2, and
the Kimi Linear MoE's balancing bias under DDP.

CE-LoRA: each rank keeps its own channel selection, made from its own ``dY`` (CE-LoRA's state is per layer and per
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
from kimi_linear_utils import random_ids, routers, tiny_model
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


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):  # gloo over loopback: no dependence on the host's network setup
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT)
    )


def _worker(rank: int, mode: str, init_file: str, out: str) -> None:
    """Trains and saves, then leaves with ``os._exit``: torch's ``destroy_process_group`` (and the process group's
    destructor at interpreter exit) joins gloo's worker thread while holding the GIL, and that thread can be
    waiting for the GIL to release a finished allreduce's Python state: a deadlock seen with torch 2.13 (see
    pytorch/pytorch#56297). The results are on disk by then; a failure prints its traceback and exits 1."""
    try:
        _init(rank, init_file)
        (_balance_and_save if mode == "router_bias" else _train_and_save)(rank, mode, out)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _train_and_save(rank: int, mode: str, out: str) -> None:
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


def _spawn(mode: str, tmp_path) -> None:
    workers = mp.spawn(_worker, args=(mode, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 2 * TIMEOUT
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {mode} workers did not finish within {2 * TIMEOUT} s")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_matches_emulation(mode, tmp_path):
    _spawn(mode, tmp_path)
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



# ------------------------------------------------------------------------------- the MoE's balancing bias
RATE = 0.01


def _balancing_model() -> torch.nn.Module:
    return tiny_model(seed=9, router_bias_update_rate=RATE).train()


def _balancing_seed(step: int, rank: int) -> int:
    # at step 0 the ranks' batches (seeds 0 and 2) give loads whose update differs, in one router, from the update
    # of their sum: the test then tells a per-rank update from a global one
    return 10 * step + 2 * rank


def _balance_and_save(rank: int, mode: str, out: str) -> None:
    """Two training forwards under DDP: the second applies the bias update from the first one's expert loads."""
    model = torch.nn.parallel.DistributedDataParallel(_balancing_model(), find_unused_parameters=True)
    for step in range(2):
        ids = random_ids(2, 12, seed=_balancing_seed(step, rank))
        model(ids, labels=ids).loss.backward()
    biases = {f"router{i}": r.e_score_correction_bias.detach() for i, r in enumerate(routers(model.module))}
    save_file(biases, os.path.join(out, f"rank{rank}.safetensors"))
    dist.barrier()


def test_balancing_bias_follows_the_load_of_every_rank(tmp_path):
    """Under DDP every rank makes the same balancing update, from the expert loads summed over the ranks (each rank
    used to update from its own load: the ranks routed with different biases)."""
    _spawn("router_bias", tmp_path)
    model = _balancing_model()
    initial = [r.e_score_correction_bias.clone() for r in routers(model)]
    loads = []
    for rank in range(WORLD):  # the first step's loads of each rank's batch
        model(random_ids(2, 12, seed=_balancing_seed(0, rank)))
        loads.append([r._pending_load for r in routers(model)])
        for router in routers(model):
            router._pending_load = None
    def step(load: torch.Tensor) -> torch.Tensor:
        return torch.sign(load.mean() - load)

    per_rank_differs = [not torch.equal(step(own), step(sum(rank_loads))) for rank_loads in zip(*loads)
                        for own in rank_loads]  # fmt: skip
    assert any(per_rank_differs), "pick other batches: every rank's own update equals the global one"
    for router, *rank_loads in zip(routers(model), *loads):
        router._pending_load = sum(rank_loads)
        router._apply_pending_bias_update()
    expected = [r.e_score_correction_bias for r in routers(model)]
    assert any(not torch.equal(a, b) for a, b in zip(expected, initial)), "no update to compare"
    for rank in range(WORLD):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        for i, value in enumerate(expected):
            assert torch.equal(got[f"router{i}"], value), f"rank {rank} router {i}"


def test_router_routes_in_fp32_under_autocast():
    """The Trainer's ``bf16=True`` keeps fp32 weights and runs the forward under autocast, whose bf16 linear gave
    bf16 router logits: experts chosen and weighed from rounded scores. Routing must be the fp32 model's."""
    router = routers(_balancing_model().eval())[0]
    x = torch.randn(64, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    for name, a, b in zip(("logits", "weights", "expert ids"), got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} under autocast: {a.dtype}, fp32 gives {b.dtype}"
