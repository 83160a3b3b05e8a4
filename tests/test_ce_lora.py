"""CE-LoRA: approximate-backward math, selection, step counting and the PEFT integration (CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close_rel
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from kimi_hf.kernels.ce_lora import (
    ce_grad_input,
    ce_pack_grad_output,
    channel_scores,
    channel_slots,
    kept_channels,
    low_rank_factors,
    make_plan,
    naive_ce_grad_input,
    residual_row_norms,
    select_channels,
)
from kimi_hf.peft import CELinear, CELoraConfig, export_as_lora
from kimi_hf.peft.ce_lora import CEChannelState, CEOptions

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny shapes run much faster on one intra-op thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random Llama whose projections are wide enough (256) for CE-LoRA to drop channels."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def ce_config(**kwargs) -> CELoraConfig:
    kwargs.setdefault("r", 8)
    kwargs.setdefault("lora_alpha", 16)
    kwargs.setdefault("target_modules", ALL_PROJ)
    kwargs.setdefault("init_lora_weights", False)  # random B: LoRA's branch is non-zero from the start
    return CELoraConfig(task_type="CAUSAL_LM", **kwargs)


def tokens(seed: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=gen)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def train_backward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def ce_states(model: torch.nn.Module, adapter: str = "default") -> list[CEChannelState]:
    return [m.ce_state[adapter] for m in model.modules() if isinstance(m, CELinear) and not m.ce_state[adapter].exact]


def decaying_matrix(out_features: int, in_features: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A weight with a decaying spectrum and uneven row norms, like a trained projection."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_features, out_features, generator=gen, dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=dtype)).Q
    n = min(out_features, in_features)
    s = 1.0 / (1.0 + torch.arange(n, dtype=dtype)) ** 0.7
    rows = torch.rand(out_features, 1, generator=gen, dtype=dtype) * 2 + 0.1
    return rows * (u[:, :n] * s) @ v[:, :n].T


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ce_ratio": 0.0}, "ce_ratio"),
        ({"ce_ratio": 1.5}, "ce_ratio"),
        ({"ce_ratio": True}, "ce_ratio"),
        ({"ce_ratio": {"v_proj": -0.1}}, "v_proj"),
        ({"ce_ratio": {}}, "empty"),
        ({"ce_svd_rank": 0}, "ce_svd_rank"),
        ({"ce_recompute_every": 0}, "ce_recompute_every"),
        ({"ce_score": "l1"}, "ce_score"),
        ({"use_dora": True}, "use_dora"),
        ({"ce_ratio": {"v_proj(": 0.5}}, r"ce_ratio key 'v_proj\(' is not a valid regular expression"),
    ],
)
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CELoraConfig(**kwargs)


def test_config_ratio_patterns_and_svd_rank():
    config = CELoraConfig(r=16)
    assert config.ratio_for("model.layers.3.self_attn.v_proj") == 0.55
    assert config.ratio_for("model.layers.3.mlp.down_proj") == 0.65
    assert config.ratio_for("model.layers.3.self_attn.q_proj") == 1.0  # the paper keeps q/k/gate exact
    assert config.svd_rank_for(16) == 14  # 7/8 r
    assert CELoraConfig(ce_ratio=0.3).ratio_for("anything") == 0.3
    assert CELoraConfig(ce_ratio={r"layers\.0\..*": 0.4}).ratio_for("model.layers.0.mlp.up_proj") == 0.4


def test_overlapping_ratio_patterns_are_refused_not_resolved_by_order():
    """adapter_config.json is saved with sorted keys: a first-match rule would give another ratio after a reload.
    Overlaps with one ratio are fine; overlaps with different ratios are an error naming both."""
    overlapping = CELoraConfig(ce_ratio={"v_proj": 0.5, r"layers\.0\..*": 0.25})
    assert overlapping.ratio_for("model.layers.1.self_attn.v_proj") == 0.5
    assert overlapping.ratio_for("model.layers.0.mlp.up_proj") == 0.25
    with pytest.raises(ValueError, match=r"different ratios match 'model.layers.0.self_attn.v_proj'.*v_proj.*0.25"):
        overlapping.ratio_for("model.layers.0.self_attn.v_proj")
    same = CELoraConfig(ce_ratio={"v_proj": 0.5, r"layers\.0\..*": 0.5})
    assert same.ratio_for("model.layers.0.self_attn.v_proj") == 0.5


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj", "up_proj"], "all-linear", None])
def test_overlapping_ratio_patterns_leave_the_model_untouched(target_modules):
    """The overlap is found before any layer is replaced: the refused model keeps its plain nn.Linear layers (it was
    left half-injected, layer 0's attention already wrapped; with "all-linear", or no target_modules (Llama's default
    q_proj/v_proj), the check saw no targets at all)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_llama()
    config = CELoraConfig(r=4, target_modules=target_modules, task_type="CAUSAL_LM",
                          ce_ratio={"v_proj": 0.5, r"layers\.1\..*": 0.25})  # fmt: skip
    with pytest.raises(ValueError, match=r"different ratios match 'model.layers.1.self_attn.v_proj'"):
        get_peft_model(model, config)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_add_weighted_adapter_names_the_ce_options_it_drops():
    """The combined adapter takes the first adapter's CE-LoRA options (as LoRA takes its other options): a warning
    names those another adapter had otherwise; none when they agree."""
    model = get_peft_model(tiny_llama(), CELoraConfig(r=4, target_modules=["v_proj"], ce_ratio=0.5))
    model.add_adapter("other", CELoraConfig(r=4, target_modules=["v_proj"], ce_ratio=0.25, ce_recompute_every=7))
    model.add_adapter("same", CELoraConfig(r=4, target_modules=["v_proj"], ce_ratio=0.5))
    with pytest.warns(UserWarning, match=r"'mix' takes 'default'.*'other' differs in ce_ratio=0.25, "
                      r"ce_recompute_every=7"):  # fmt: skip
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_weighted_adapter(["default", "same"], [0.5, 0.5], "mix2", combination_type="linear")
    assert not [w for w in caught if "CE-LoRA options" in str(w.message)]
    assert model.peft_config["mix"].ce_ratio == 0.5


def test_kept_channels_fill_whole_tiles():
    for out_features, ratio, rank in [(4096, 0.65, 14), (14336, 0.55, 14), (4096, 0.25, 7), (1000, 0.3, 40)]:
        keep = kept_channels(out_features, ratio, rank)
        r_pad = 16 * math.ceil(rank / 16)
        assert keep >= math.ceil(ratio * out_features)
        assert (r_pad + keep) % 64 == 0 and r_pad + keep - 64 < r_pad + math.ceil(ratio * out_features)
    assert kept_channels(4096, 1.0, 14) is None  # exact: nothing to save
    assert kept_channels(64, 0.65, 14) is None  # rounding up reaches the full width
    # ratio * O lands a hair above an integer in floats (0.56 * 200 = 112.00000000000001): no extra tile for that
    assert kept_channels(200, 0.56, 14) == 112 and kept_channels(5000, 0.56, 14) == 2800


# ----------------------------------------------------------------------------------------------- math


def test_low_rank_factors_near_optimal():
    w = decaying_matrix(192, 160, seed=1)
    b0, a0 = low_rank_factors(w, 12)
    assert b0.shape == (192, 12) and a0.shape == (12, 160)
    s = torch.linalg.svdvals(w)
    optimal = s[12:].norm() / s.norm()
    achieved = (w - b0.double() @ a0.double()).norm() / w.norm()
    assert achieved <= optimal * 1.01
    b1, a1 = low_rank_factors(w, 12)
    assert torch.equal(b0, b1) and torch.equal(a0, a1)  # deterministic: recomputed identically after loading


def test_fused_backward_matches_unfused_reference():
    w = decaying_matrix(256, 192, seed=2)
    dy = torch.randn(48, 256, dtype=torch.float64)
    b0, a0 = low_rank_factors(w, 14)
    index = select_channels(channel_scores(dy, residual_row_norms(w, b0, a0), "activation_aware"), 100)
    plan = make_plan(w, b0, a0, index, torch.float64)
    expected = naive_ce_grad_input(dy, w, b0.double(), a0.double(), index)
    assert_close_rel(ce_grad_input(dy, plan, backend="torch"), expected, 1e-12, "dX")
    # keeping every channel is exact whatever the factorisation
    full = make_plan(w, b0, a0, torch.arange(256), torch.float64)
    assert_close_rel(ce_grad_input(dy, full, backend="torch"), dy @ w, 1e-12, "dX all channels")


def test_gradient_error_falls_as_ratio_grows():
    w = decaying_matrix(512, 256, seed=3)
    dy = torch.randn(64, 512, dtype=torch.float64) * torch.rand(512, dtype=torch.float64) ** 2
    exact = dy @ w
    errors = []
    for ratio in (0.1, 0.25, 0.5, 0.75):
        state = CEChannelState(CEOptions(ratio, 14, 100, "activation_aware"), 512)
        state.grad_input(dy, w)  # step 0: exact, selects from this dY
        approx, _ = state.grad_input(dy, w)
        errors.append(((approx - exact).norm() / exact.norm()).item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1, errors


def test_activation_aware_score_beats_weight_norm():
    """Same budget, same dY: ranking by ||dY_i|| ||R_i|| leaves a smaller error than ranking by ||R_i||."""
    w = decaying_matrix(512, 256, seed=4)
    dy = torch.randn(64, 512, dtype=torch.float64) * torch.rand(512, dtype=torch.float64) ** 3
    errors = {}
    for score in ("activation_aware", "weight_norm"):
        state = CEChannelState(CEOptions(0.25, 14, 100, score), 512)
        state.grad_input(dy, w)
        errors[score] = ((state.grad_input(dy, w)[0] - dy @ w).norm() / (dy @ w).norm()).item()
    assert errors["activation_aware"] < errors["weight_norm"], errors


def test_selection_follows_the_score():
    """Hand-made case: W diagonal, so ||R_i|| = w_i (the rank-1 factor absorbs the largest row)."""
    n = 128
    w_diag = 1.0 + torch.arange(n, dtype=torch.float64) / n  # increasing row norms
    weight = torch.diag(w_diag)
    dy = torch.ones(4, n, dtype=torch.float64) / w_diag**2  # product score 1/w_i: decreasing
    keep = kept_channels(n, 0.25, 1)
    for score, expected in [
        ("activation_aware", torch.arange(keep)),  # smallest w_i win
        ("weight_norm", torch.arange(n - 1 - keep, n - 1)),  # largest residual rows (row n-1 is in B0 A0)
    ]:
        state = CEChannelState(CEOptions(0.25, 1, 10, score), n)
        state.grad_input(dy, weight)
        assert torch.equal(state.plan.index, expected), score


def test_reselection_period_and_exact_first_step():
    w = decaying_matrix(256, 128, seed=5)
    state = CEChannelState(CEOptions(0.25, 8, 3, "activation_aware"), 256)
    gen = torch.Generator().manual_seed(0)
    selected = []
    for step in range(8):
        scale = torch.rand(256, generator=gen, dtype=torch.float64)
        dy = torch.randn(16, 256, generator=gen, dtype=torch.float64) * scale
        dx, _ = state.grad_input(dy, w)
        is_exact = torch.allclose(dx, dy @ w, rtol=1e-12, atol=1e-12)
        assert is_exact == (step % 3 == 0), step
        selected.append(state.plan.index.clone())
    assert state.steps == 8 and state.selections == 3
    assert torch.equal(selected[0], selected[2]) and not torch.equal(selected[2], selected[3])


def test_non_finite_gradient_does_not_select_channels():
    """An fp16 overflow step (NaN/inf dY, skipped by the loss scaler) must not pick the kept channels: NaN scores
    rank channels arbitrarily, and that selection was used for the next recompute_every - 1 steps."""
    w = decaying_matrix(256, 128, seed=8)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(16, 256, generator=gen, dtype=torch.float64) * torch.rand(256, generator=gen, dtype=torch.float64)
    reference = CEChannelState(CEOptions(0.25, 8, 100, "activation_aware"), 256)
    reference.grad_input(dy, w)
    state = CEChannelState(CEOptions(0.25, 8, 100, "activation_aware"), 256)
    overflow = dy.clone()
    overflow[:, ::2] = float("inf")
    overflow[0] = float("nan")
    state.grad_input(overflow, w)
    assert state.plan is None and state.steps == 0 and state.selections == 0
    dx, _ = state.grad_input(dy, w)  # exact again, and selects from this step's dY
    assert torch.allclose(dx, dy @ w) and state.steps == 1 and state.selections == 1
    assert torch.equal(state.plan.index, reference.plan.index)
    for _ in range(99):  # a later selecting step that overflows keeps the current selection, and is not counted
        state.grad_input(dy, w)
    kept = state.plan.index.clone()
    assert torch.allclose(state.grad_input(overflow, w)[0].nan_to_num(), (overflow @ w).nan_to_num())
    assert state.steps == 100 and state.selections == 1 and torch.equal(state.plan.index, kept)
    assert torch.allclose(state.grad_input(dy, w)[0], dy @ w) and state.selections == 2


def test_factors_follow_weight_changes():
    w = decaying_matrix(256, 128, seed=6)
    state = CEChannelState(CEOptions(0.25, 8, 100, "activation_aware"), 256)
    dy = torch.randn(16, 256, dtype=torch.float64)
    state.grad_input(dy, w)
    state.grad_input(dy, w)
    with torch.no_grad():
        w.copy_(w.clone())  # same values rewritten in place (as FSDP does): nothing to rebuild
    assert not torch.allclose(state.grad_input(dy, w)[0], dy @ w)
    with torch.no_grad():
        w.mul_(2.0)  # e.g. merging an adapter: new values
    assert torch.allclose(state.grad_input(dy, w)[0], dy @ w)  # refactorised, exact, reselected
    assert state.selections == 2
    state.grad_input(dy, w)
    fresh = decaying_matrix(256, 128, seed=7)  # a new weight tensor: version 0 again, like the first one
    assert fresh._version == 0 and torch.allclose(state.grad_input(dy, fresh)[0], dy @ fresh)
    assert state.selections == 3


def test_writes_through_weight_data_are_caught_at_the_next_selection():
    """``weight.data`` writes (PEFT's unsafe merge/unmerge, older user code) bypass the version counter: the factors
    and ``||R_i||`` of the old weight stayed in use for good, reselections included. Now the next selecting backward
    compares the values, refactorises and approximates the new weight."""
    w = decaying_matrix(256, 128, seed=6)
    state = CEChannelState(CEOptions(0.25, 8, 3, "activation_aware"), 256)
    dy = torch.randn(16, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        state.grad_input(dy, w)
    version = w._version
    w.data.mul_(2.0)
    assert w._version == version  # what made the change invisible
    state.grad_input(dy, w)  # step 2: approximate, still on the old values (documented)
    assert torch.allclose(state.grad_input(dy, w)[0], dy @ w)  # step 3 selects: exact, and refactorised
    fresh_b0, fresh_a0 = low_rank_factors(w, 8)
    assert torch.equal(state.b0, fresh_b0) and torch.equal(state.a0, fresh_a0)
    expected = naive_ce_grad_input(dy, w, fresh_b0.double(), fresh_a0.double(), state.plan.index)
    assert_close_rel(state.grad_input(dy, w)[0], expected, 1e-12, "dX after the write")


def test_channel_slots_map_every_kept_channel_once():
    gen = torch.Generator().manual_seed(0)
    for out_features, keep in [(1000, 300), (200, 64), (4096, 2096), (130, 10), (64, 64)]:
        index = torch.randperm(out_features, generator=gen)[:keep].sort().values
        slots = channel_slots(index, out_features)  # channel -> its column among G's kept ones, or -1
        assert slots.dtype == torch.int32 and slots.shape == (out_features,)
        assert torch.equal(slots[index].long(), torch.arange(keep))  # in G's order, each kept channel once
        assert (slots >= 0).sum() == keep and (slots >= -1).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize(
    "out_features, rows, ratio, lora_rank, dtype, config",
    [
        (200, 37, 0.3, 8, torch.float32, -1),  # a partial channel tile and row block, LoRA slots filled
        (1000, 21, 0.5, 0, torch.float32, -1),  # 32 channel tiles, O not a multiple of 16
        (512, 18, 0.25, 16, torch.float16, 4),  # half precision (bf16 is broken in the interpreter), tiles of 64
        # r_pad 14 + 24 -> 48, not a power of two (tl.arange refused it: LoRA ranks 24, 40, 128 failed on a GPU)
        (200, 21, 0.3, 24, torch.float32, 0),
    ],
)
@pytest.mark.parametrize("shares", [0, 3], ids=["auto-shares", "3-shares"])
def test_triton_pack_matches_torch_reference(out_features, rows, ratio, lora_rank, dtype, config, shares, monkeypatch):
    """The packing kernel against the torch reference, on the interpreter's small tiles (16 rows, 32 channels) and on
    two of the GPU's (``config``: an index of ``pack._CONFIGS``); with 3 channel shares per row block, the partial
    products' hand-over (the last program of a row block sums them) is exercised too."""
    from kimi_hf.kernels.ce_lora import pack

    monkeypatch.setattr(pack, "SHARES", shares)
    monkeypatch.setattr(pack, "CONFIG", config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    in_features = 96
    w = decaying_matrix(out_features, in_features, seed=7, dtype=torch.float32).to(device)
    dy = torch.randn(rows, out_features, device=device) * torch.rand(out_features, device=device)
    b0, a0 = low_rank_factors(w, 14)
    scores = channel_scores(dy, residual_row_norms(w, b0, a0), "activation_aware")
    index = select_channels(scores, kept_channels(out_features, ratio, 14 + lora_rank))
    plan = make_plan(w, b0, a0, index, dtype, lora_rank=lora_rank)
    lora = None
    if lora_rank:  # s B goes into the plan's b0 slots, and the kernel copies A into its stack rows in the same launch
        lora_a = torch.randn(lora_rank, in_features, device=device, dtype=dtype)
        lora = (lora_a, torch.randn(out_features, lora_rank, device=device, dtype=dtype), 0.5)
    dy = dy.to(dtype)
    packed = ce_pack_grad_output(dy, plan, "triton", lora=lora)
    # column-major, each column 16-byte aligned (the GEMM reads G transposed; cuBLAS needs aligned columns for speed)
    assert packed.stride(0) == 1 and packed.stride(1) % 8 == 0 and rows <= packed.stride(1) < rows + 8
    if lora:
        assert torch.equal(plan.stack[plan.lora_slots], lora_a)
        plan.stack[plan.lora_slots].zero_()  # the torch path writes it back
    reference = ce_pack_grad_output(dy, plan, "torch", lora=lora)
    r_pad = plan.b0_pad.shape[1]
    assert torch.equal(packed[:, r_pad:], reference[:, r_pad:])  # the kept columns are copies
    rtol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close_rel(packed[:, :r_pad], reference[:, :r_pad], rtol, "low-rank block")
    grad_input = ce_grad_input(dy, plan, "triton", lora=lora)
    assert_close_rel(grad_input, ce_grad_input(dy, plan, "torch", lora=lora), rtol, "dX")
    if lora:  # LoRA's input gradient is in dX, and a pack without LoRA clears the slots again
        with_lora = (dy.double() @ (0.5 * lora[1].double())) @ lora_a.double()
        without = ce_grad_input(dy, plan, "triton")
        assert not plan.stack[plan.lora_slots].any() and not plan.b0_pad[:, plan.lora_slots].any()
        assert_close_rel(grad_input.double() - without.double(), with_lora, 10 * rtol, "LoRA's dX")
    for counters in pack._COUNTERS.values():  # left zeroed for the next launch, which reuses them (the one above did)
        assert not counters.any()


def test_forced_pack_config_is_checked(monkeypatch):
    """``pack.CONFIG`` (sweeps launch one tile config at every shape): -1 leaves the pick to the autotuner, an index
    outside the config list is named."""
    from kimi_hf.kernels.ce_lora import pack

    assert pack.forced_config() is None  # the default
    monkeypatch.setattr(pack, "CONFIG", 1)
    assert pack.forced_config() is pack._CONFIGS[1]
    monkeypatch.setattr(pack, "CONFIG", len(pack._CONFIGS))
    with pytest.raises(ValueError, match=f"got {len(pack._CONFIGS)}"):
        pack.forced_config()


def test_plan_takes_the_kept_channels_in_any_order():
    """An unsorted index gives the sorted one's plan (the Triton tile map assumed sorted channels: dX was wrong by
    about 17 on values of order 1; found by the kernel audit); a repeated channel is refused."""
    w = decaying_matrix(200, 48, seed=3, dtype=torch.float32)
    b0, a0 = low_rank_factors(w, 6)
    index = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:42]
    dy = torch.randn(9, 200)
    shuffled, ordered = make_plan(w, b0, a0, index, torch.float32), make_plan(w, b0, a0, index.sort().values,
                                                                            torch.float32)  # fmt: skip
    assert torch.equal(shuffled.index, ordered.index)
    backend = "triton" if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert_close_rel(ce_grad_input(dy, shuffled, backend), ce_grad_input(dy, ordered, "torch"), 1e-5, "dX")
    with pytest.raises(ValueError, match="distinct channels"):
        make_plan(w, b0, a0, torch.tensor([3, 5, 3]), torch.float32)
    # channels outside [0, O) or an index of another shape/dtype are named (they would fail in channel_slots' indexing)
    for bad in (torch.tensor([3, 200]), torch.tensor([-1, 5])):
        with pytest.raises(ValueError, match=r"channels in \[0, 200\), got -?\d+ to \d+"):
            make_plan(w, b0, a0, bad, torch.float32)
    for bad in (torch.tensor([[1, 2], [3, 4]]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="1-D int32/int64 tensor of at most 200 channels"):
            make_plan(w, b0, a0, bad, torch.float32)


def test_pack_names_bad_inputs():
    """dY of another rank, width or dtype than the plan's, and LoRA factors of another rank, shape or dtype, are named
    (a LoRA B of the wrong rank would be read past its rows by the kernel)."""
    w = decaying_matrix(200, 48, seed=3, dtype=torch.float32)
    b0, a0 = low_rank_factors(w, 6)
    plan = make_plan(w, b0, a0, torch.arange(100), torch.float32, lora_rank=8)
    lora_a, lora_b = torch.randn(8, 48), torch.randn(200, 8)
    for dy, message in [(torch.randn(2, 3, 200), r"2-D \[T, O\], got shape \(2, 3, 200\)"),
                        (torch.randn(4, 199), "199 channels but the plan was built for 200"),
                        (torch.randn(4, 200).double(), "torch.float64 != plan dtype torch.float32")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ce_pack_grad_output(dy, plan, "torch")
    dy = torch.randn(4, 200)
    for lora, message in [((lora_a[:4], lora_b, 1.0), r"\[8, 48\] and \[200, 8\].*got \[4, 48\] and \[200, 8\]"),
                          ((lora_a, lora_b[:, :4], 1.0), r"got \[8, 48\] and \[200, 4\]"),
                          ((lora_a.half(), lora_b, 1.0), "must be torch.float32.*got torch.float16 and torch.float32")]:
        with pytest.raises(ValueError, match=message):
            ce_pack_grad_output(dy, plan, "torch", lora=lora)


# ---------------------------------------------------------------------------------------- PEFT model


def test_ratio_one_gives_loras_gradients_exactly():
    """float64, so that "exactly" means up to reassociation (the fused layer adds LoRA's terms in another order)."""
    ids = tokens(0)
    torch.manual_seed(1)  # same adapter init for both
    lora = get_peft_model(
        tiny_llama(layers=1).double(), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ, init_lora_weights=False)
    )
    torch.manual_seed(1)
    ce = get_peft_model(tiny_llama(layers=1).double(), ce_config(ce_ratio=1.0))
    for model in (lora, ce):
        train_backward(model, ids)
    expected, actual = lora_grads(lora), lora_grads(ce)
    assert expected.keys() == actual.keys() and len(expected) == 2 * 7
    for name, grad in expected.items():
        assert_close_rel(actual[name], grad, 1e-12, name)


def test_dropout_path_matches_lora_on_exact_steps():
    """With dropout the LoRA branch is PEFT's own (unfused); step 0 is exact, so gradients equal LoRA's."""
    ids = tokens(0)
    grads = []
    for config in (
        LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ, init_lora_weights=False, lora_dropout=0.1),
        ce_config(ce_ratio=0.5, lora_dropout=0.1),
    ):
        torch.manual_seed(1)
        model = get_peft_model(tiny_llama(layers=1).double(), config)
        model.enable_input_require_grads()  # every projection's input needs a gradient: CE-LoRA everywhere
        torch.manual_seed(2)  # same dropout masks
        train_backward(model, ids)
        grads.append(lora_grads(model))
    for name, grad in grads[0].items():
        assert_close_rel(grads[1][name], grad, 1e-12, name)


def test_fused_layer_function_matches_explicit_formula():
    """ce_lora_linear: values, LoRA/bias gradients exact; dX = CE approximation + LoRA's exact dX term."""
    from kimi_hf.peft.ce_lora.function import ce_lora_linear

    gen = torch.Generator().manual_seed(9)
    weight = decaying_matrix(256, 128, seed=9)
    bias = torch.randn(256, dtype=torch.float64, generator=gen, requires_grad=True)
    lora_a = torch.randn(8, 128, dtype=torch.float64, generator=gen, requires_grad=True)
    lora_b = torch.randn(256, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(3, 10, 128, dtype=torch.float64, generator=gen, requires_grad=True)
    dy = torch.randn(3, 10, 256, dtype=torch.float64, generator=gen)
    state = CEChannelState(CEOptions(0.3, 6, 100, "activation_aware", lora_rank=8), 256)
    for step in range(2):  # step 0 exact, step 1 approximate
        out = ce_lora_linear(x, weight, bias, lora_a, lora_b, 0.5, state)
        got = torch.autograd.grad(out, (x, bias, lora_a, lora_b), dy)
        ref_out = x @ weight.T + bias + 0.5 * (x @ lora_a.T) @ lora_b.T
        ref = torch.autograd.grad(ref_out, (x, bias, lora_a, lora_b), dy)
        assert_close_rel(out, ref_out, 1e-12, "out")
        for name, g, r in zip(("bias", "A", "B"), got[1:], ref[1:]):
            assert_close_rel(g, r, 1e-12, f"step {step} d{name}")
        dy_2d = dy.reshape(-1, 256)
        exact_base = dy_2d @ weight
        approx_base = naive_ce_grad_input(dy_2d, weight, state.b0.double(), state.a0.double(), state.plan.index)
        lora_term = 0.5 * (dy_2d @ lora_b) @ lora_a
        expected_dx = (exact_base if step == 0 else approx_base) + lora_term
        assert_close_rel(got[0].reshape(-1, 128), expected_dx, 1e-12, f"step {step} dX")


def test_approximate_steps_change_gradients_by_a_bounded_amount():
    ids = tokens(1)
    torch.manual_seed(1)
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ, init_lora_weights=False)
    lora = get_peft_model(tiny_llama(), lora_config)
    torch.manual_seed(1)
    ce = get_peft_model(tiny_llama(), ce_config(ce_ratio=0.5, ce_recompute_every=100))
    train_backward(lora, ids)
    expected = lora_grads(lora)
    train_backward(ce, ids)  # step 0: exact
    for name, grad in lora_grads(ce).items():
        assert_close_rel(grad, expected[name], 1e-5, name)
    ce.zero_grad()
    train_backward(ce, ids)  # step 1: approximate below the top layer
    actual = lora_grads(ce)
    total = sum((actual[n] - g).norm() ** 2 for n, g in expected.items()) ** 0.5
    ref = sum(g.norm() ** 2 for g in expected.values()) ** 0.5
    assert 1e-4 < total / ref < 0.5


def test_data_parallel_replicas_are_refused_by_name():
    """nn.DataParallel (the Trainer's choice on several GPUs without torchrun) runs replicas that share each layer's
    CE-LoRA state; their forward is refused with the fix, not run against one state. The replica is made as
    DataParallel makes it, which needs no GPU."""
    model = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, target_modules=["v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 3, 256, requires_grad=True)
    layer(x)  # the original module runs
    replica = layer._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DataParallel.*torchrun"):
        replica(x)


def test_base_layers_with_accelerate_hooks_take_loras_path():
    """A base layer with an accelerate hook (offloading moves its weight in the hook) runs LoRA's own forward, so
    that the hook sees the call; its neighbours without one keep CE-LoRA's path."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, target_modules=["v_proj", "o_proj"]))
    attention = model.base_model.model.model.layers[0].self_attn
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    add_hook_to_module(attention.v_proj.get_base_layer(), Counting())
    model.train()
    model(input_ids=tokens(0), labels=tokens(0)).loss.backward()
    assert calls == [attention.v_proj.get_base_layer()]
    assert attention.v_proj.ce_state["default"].steps == 0 and attention.o_proj.ce_state["default"].steps == 1


def test_eval_and_no_grad_forward_do_not_count_steps():
    model = get_peft_model(tiny_llama(), ce_config(ce_ratio=0.5))
    ids = tokens(2)
    with torch.no_grad():
        model.train()
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids, labels=ids).loss.backward()  # eval mode: LoRA's exact backward
    assert all(s.steps == 0 for s in ce_states(model))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_counts_backward_passes_not_forwards(use_reentrant):
    torch.manual_seed(3)
    plain = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, ce_recompute_every=2))
    torch.manual_seed(3)
    ckpt = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, ce_recompute_every=2))
    ckpt.base_model.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    for model in (plain, ckpt):  # every projection's input then needs a gradient: all layers use CE-LoRA
        model.enable_input_require_grads()
    for step in range(3):
        ids = tokens(10 + step)
        for model in (plain, ckpt):
            model.zero_grad()
            train_backward(model, ids)
        expected, actual = lora_grads(plain), lora_grads(ckpt)
        for name, grad in expected.items():
            assert_close_rel(actual[name], grad, 1e-5, f"step {step} {name}")
    states = ce_states(ckpt)
    assert len(states) == 5  # q, o, gate, up, down; k/v (128 outputs) would keep every tile: exact
    assert [s.steps for s in states] == [3] * len(states)
    assert [s.selections for s in states] == [2] * len(states)


@pytest.mark.parametrize(
    "device, dtype, tolerance",
    [
        ("cpu", torch.float32, 1e-5),
        pytest.param("cuda", torch.float32, 1e-5, marks=pytest.mark.gpu),  # the Triton pack (fused path)
        # PEFT's fp32 adapters on a bf16 model: the lora_branch kernels too. Inductor rounds the bf16 GELU and loss
        # differently from eager, which may swap a near-tie kept channel: a looser bound, the same schedule.
        pytest.param("cuda", torch.bfloat16, 5e-2, marks=pytest.mark.gpu),
    ],
)
def test_torch_compile_matches_eager(device, dtype, tolerance):
    """``torch.compile`` must not freeze the per-step Python state (the backward counter, the reselection, the plan)
    into a traced graph: compiled and eager steps follow the same exact/approximate schedule and gradients."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(6)
        base = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
        config = ce_config(r=4, lora_alpha=8, target_modules=["0", "2"], ce_ratio=0.25, ce_recompute_every=2)
        config.task_type = None  # a plain module, not a causal LM
        model = get_peft_model(base.to(device, dtype), config).train()
        forward = torch.compile(model) if compiled else model
        grads = []
        for step in range(5):
            x = torch.randn(64, 128, generator=torch.Generator().manual_seed(step)).to(device, dtype)
            x.requires_grad_(True)
            forward(x).float().square().sum().backward()
            grads.append([x.grad.clone(), *lora_grads(model).values()])
            model.zero_grad()
        runs[compiled] = grads, [(s.steps, s.selections) for s in ce_states(model)]
    (eager, eager_counts), (compiled, compiled_counts) = runs[False], runs[True]
    assert eager_counts == compiled_counts == [(5, 3), (5, 3)]
    for step, (expected, actual) in enumerate(zip(eager, compiled)):
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_close_rel(a.float(), e.float(), tolerance, f"step {step} gradient {i}")


def test_gradient_accumulation_sums_micro_batch_gradients():
    torch.manual_seed(4)
    acc = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, ce_recompute_every=1000))
    torch.manual_seed(4)
    single = get_peft_model(tiny_llama(layers=1), ce_config(ce_ratio=0.5, ce_recompute_every=1000))
    batches = [tokens(20 + i) for i in range(3)]
    for ids in batches:
        train_backward(acc, ids)  # gradients accumulate in .grad
    expected = {}
    for ids in batches:
        single.zero_grad()
        train_backward(single, ids)
        for name, grad in lora_grads(single).items():
            expected[name] = expected.get(name, 0) + grad
    for name, grad in lora_grads(acc).items():
        assert_close_rel(grad, expected[name], 1e-5, name)


def test_bf16_backward_matches_float64_reference():
    w = decaying_matrix(512, 256, seed=8)
    dy = torch.randn(128, 512, dtype=torch.float64)
    dy16, w16 = dy.bfloat16(), w.bfloat16()
    state = CEChannelState(CEOptions(0.5, 14, 100, "activation_aware"), 512)
    state.grad_input(dy16, w16)
    approx, _ = state.grad_input(dy16, w16)
    assert approx.dtype == torch.bfloat16 and state.selections == 1
    b0, a0 = state.b0.double(), state.a0.double()
    expected = naive_ce_grad_input(dy16.double(), w16.double(), b0, a0, state.plan.index)
    assert (expected - dy16.double() @ w16.double()).norm() > 0.05 * expected.norm()  # really approximate
    assert_close_rel(approx, expected, 2e-2, "bf16 dX")


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_layer_follows_loras_adapter_dtype(autocast_adapter_dtype):
    """A bf16 layer at ratio 1: LoRA's branch and gradients in the adapters' dtype, as PEFT's LoRA does.

    PEFT's default (``autocast_adapter_dtype=True``) keeps the adapters in fp32 and runs the branch on an
    fp32 copy of ``x``: ``A`` and ``B``'s gradients must then match PEFT's to fp32 accuracy, which a
    branch computed in bf16 misses by ~1e-3. CE-LoRA saves ``x`` as it came (widening is exact), not the copy.
    """
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=gen).bfloat16().requires_grad_()
    dy = torch.randn(64, 384, generator=gen).bfloat16()
    results = []
    for config in (
        LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False),
        CELoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False, ce_ratio=1.0),
    ):
        torch.manual_seed(4)
        base = torch.nn.Sequential(torch.nn.Linear(256, 384)).bfloat16().requires_grad_(False)
        model = get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype).train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(x)
        layer = model.base_model.model[0]
        params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        grads = torch.autograd.grad(out, (x, *params), dy)
        results.append((out, grads, params[0].dtype, saved))
    (lora_out, lora_grads_, lora_dtype, _), (ce_out, ce_grads, ce_dtype, ce_saved) = results
    assert ce_dtype == lora_dtype == (torch.float32 if autocast_adapter_dtype else torch.bfloat16)
    assert ce_out.dtype == torch.bfloat16
    assert_close_rel(ce_out, lora_out, 1e-2, "out")
    assert_close_rel(ce_grads[0], lora_grads_[0], 1e-2, "dX")
    rtol = 1e-5 if autocast_adapter_dtype else 2e-2
    for name, got, expected in zip(("dA", "dB"), ce_grads[1:], lora_grads_[1:]):
        assert got.dtype == expected.dtype == lora_dtype
        assert_close_rel(got, expected, rtol, name)
    assert not [t for t in ce_saved if t.shape == (64, 256) and t.dtype == torch.float32], "an fp32 copy of x"


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
# bf16 at ratio 0.5 is left to the GPU tests of the pack: Triton's interpreter computes bf16 dots wrongly (the pack's
# dY B0 columns come out at 1e11 on CPU, right on a GPU)
@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 0.5)])
def test_fp32_branch_kernels_follow_lora(dtype, ratio, monkeypatch):
    """PEFT's default fp32 adapters on a 16-bit layer with the branch's Triton kernels (no fp32 copies of ``x``, ``dY``
    or the output): output and ``A``/``B`` gradients as PEFT LoRA's and as the torch sequence's; ``dX`` as the torch
    sequence's at any ratio, and as PEFT's at ratio 1."""
    from kimi_hf.kernels.lora_branch import triton_kernels

    launched = []
    for op in ("lora_down_fwd", "lora_up_add_fwd", "lora_weight_grad_fwd"):  # counted: a fallback would match torch
        kernel = getattr(triton_kernels, op)
        monkeypatch.setattr(triton_kernels, op, lambda *args, _op=op, _kernel=kernel: launched.append(_op) or
                            _kernel(*args))  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 96, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(2, 40, 160, generator=gen).to(device, dtype)
    results = {}
    for name, config, backend in (
        ("peft", LoraConfig(r=8, lora_alpha=24, target_modules=["0"], init_lora_weights=False), None),
        ("torch", CELoraConfig(r=8, lora_alpha=24, target_modules=["0"], init_lora_weights=False, ce_ratio=ratio),
         "torch"),
        ("triton", CELoraConfig(r=8, lora_alpha=24, target_modules=["0"], init_lora_weights=False, ce_ratio=ratio),
         "triton"),
    ):  # fmt: skip
        torch.manual_seed(8)
        base = torch.nn.Sequential(torch.nn.Linear(96, 160)).to(device, dtype).requires_grad_(False)
        model = get_peft_model(base, config).train()  # autocast_adapter_dtype=True: fp32 adapters
        layer = model.base_model.model[0]
        for state in getattr(layer, "ce_state", {}).values():
            state.backend = backend
        params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        assert params[0].dtype == torch.float32
        for _ in range(2):  # at ratio 0.5 the second backward is approximate
            out = model(x)
            grads = torch.autograd.grad(out, (x, *params), dy)
        results[name] = (out, *grads)
    assert type(results["triton"][0].grad_fn).__name__ == "_CELoraLinearFunctionBackward"  # the fused Function ran
    # per step: x A^T and the output in forward; dY s B, LoRA's dX, dA and dB in backward
    assert sorted(set(launched)) == ["lora_down_fwd", "lora_up_add_fwd", "lora_weight_grad_fwd"]
    assert len(launched) == 2 * 6, launched
    triton_run, torch_run, peft_run = results["triton"], results["torch"], results["peft"]
    for name, got, from_torch, from_peft in zip(("out", "dX", "dA", "dB"), triton_run, torch_run, peft_run):
        assert got.dtype == from_peft.dtype and got.shape == from_peft.shape, name
        half = got.dtype == dtype  # out and dX; the fp32 gradients of A and B to fp32 accuracy
        assert_close_rel(got, from_torch, 1e-2 if half else 1e-6, f"{name} against torch")
        if name != "dX" or ratio == 1.0:
            assert_close_rel(got, from_peft, 1e-2 if half else 1e-5, f"{name} against PEFT")


@pytest.mark.parametrize("bias", [True, False])
def test_fused_layer_under_autocast_matches_lora(bias):
    """fp32 model and adapters under autocast (the Trainer's ``bf16=True``): the fused layer computes in bf16 as PEFT
    LoRA does, bias included. Its base GEMM (an in-place addmm_, which autocast does not cast) casts x, W and b."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 64, generator=gen).requires_grad_()
    dy = torch.randn(2, 16, 96, generator=gen).bfloat16()
    results = []
    for config in (
        LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False),
        CELoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False, ce_ratio=1.0),
    ):
        torch.manual_seed(6)
        base = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=bias)).requires_grad_(False)
        model = get_peft_model(base, config).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        layer = model.base_model.model[0]
        grads = torch.autograd.grad(out, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight), dy)
        results.append((out, grads))
    (lora_out, lora_grads), (ce_out, ce_grads) = results
    assert type(ce_out.grad_fn).__name__ == "_CELoraLinearFunctionBackward"  # the fused path ran
    assert ce_out.dtype == lora_out.dtype == torch.bfloat16 and ce_out.shape == lora_out.shape == (2, 16, 96)
    assert_close_rel(ce_out, lora_out, 1e-2, "out")
    for name, got, expected in zip(("dX", "dA", "dB"), ce_grads, lora_grads):
        assert got.dtype == expected.dtype
        assert_close_rel(got, expected, 2e-2, name)


def test_fused_layer_refuses_mismatched_dtypes_as_lora_does():
    """fp32 ``x`` into a bf16 base layer with fp32 adapters, no autocast: PEFT LoRA's ``nn.Linear`` raises, and so
    does the fused layer (its base GEMM casts only under autocast; no silent copy of W in another dtype)."""
    x = torch.randn(4, 64)
    for config in (LoraConfig(r=8, target_modules=["0"]), CELoraConfig(r=8, target_modules=["0"], ce_ratio=1.0)):
        base = torch.nn.Sequential(torch.nn.Linear(64, 96)).bfloat16().requires_grad_(False)
        model = get_peft_model(base, config).train()
        with pytest.raises(RuntimeError, match="dtype"):
            model(x)


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_ce_model(seed: int = 5, **kwargs) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), ce_config(**kwargs))
    train_backward(model, tokens(30))
    return model


def test_save_load_and_auto_class_round_trip(tmp_path):
    model = trained_ce_model(ce_ratio={"v_proj": 0.4, "down_proj": 0.5}, ce_score="weight_norm")
    ids = tokens(31)
    expected = outputs(model, ids)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CE_LORA"
    assert saved["ce_ratio"] == {"v_proj": 0.4, "down_proj": 0.5} and saved["ce_score"] == "weight_norm"
    assert saved["ce_recompute_every"] == 200

    loaded = PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    config = loaded.peft_config["default"]
    assert isinstance(config, CELoraConfig) and config.ce_ratio == {"v_proj": 0.4, "down_proj": 0.5}
    assert_close_rel(outputs(loaded, ids), expected, 1e-6, "PeftModel.from_pretrained")
    v_proj = loaded.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(v_proj, CELinear) and v_proj.ce_state["default"].options.ratio == 0.4

    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert_close_rel(outputs(auto, ids), expected, 1e-6, "AutoPeftModelForCausalLM")
    # factors are never saved: only LoRA's tensors are in the adapter file
    from safetensors.torch import load_file

    keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_fan_in_fan_out_is_switched_off_on_linear_targets_and_merging_keeps_outputs():
    """As PEFT's LoRA: an ``nn.Linear`` weight is ``[out, in]``, so ``fan_in_fan_out=True`` is corrected (with a
    warning); merging then keeps the outputs, for square and non-square targets."""
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(tiny_llama(), ce_config(target_modules=["o_proj", "up_proj"], fan_in_fan_out=True))
    assert not model.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    ids = tokens(35)
    expected = outputs(model, ids)
    model.merge_adapter()
    assert_close_rel(outputs(model, ids), expected, 1e-5, "merged with fan_in_fan_out=True asked")


def test_targets_left_to_lora_are_named_in_a_warning():
    """A GPT-2 ``Conv1D`` target gets LoRA's exact backward and a warning naming it; an embedding (no input gradient
    to approximate) gets none."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.warns(UserWarning) as caught:
        model = get_peft_model(base, CELoraConfig(r=4, target_modules=["c_attn", "wte"], ce_ratio=0.5,
                                                  fan_in_fan_out=True))  # fmt: skip
    messages = [str(w.message) for w in caught if "CE-LoRA approximates" in str(w.message)]
    assert messages == ["CE-LoRA approximates the backward of nn.Linear targets only: transformer.h.0.attn.c_attn "
                        "(Conv1D) gets LoRA's exact backward"]  # fmt: skip
    assert not any(isinstance(m, CELinear) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # a typo, or the default's Llama names on a model that names its projections otherwise
        ({"ce_ratio": {"v_porj": 0.5}}, r"ce_ratio=\{'v_porj': 0.5\} matches none of its 14 nn.Linear targets "
                                        r"\(e.g. model.layers.0.self_attn.q_proj\)"),
        # v_proj is 128 wide: 71 kept channels + a 16-wide factorisation round up to the whole 128
        ({"target_modules": ["q_proj", "v_proj"]}, r"the 2 layers ce_ratio matches are too narrow .* "
                                                   r"\(e.g. model.layers.0.self_attn.v_proj\)"),
        ({"ce_ratio": 0.5, "ce_svd_rank": 512}, "the 14 layers ce_ratio matches are too narrow"),
    ],
)
def test_adapter_that_approximates_nothing_is_named_in_a_warning(kwargs, message):
    """A ratio below 1 that leaves every targeted layer exact trained as plain LoRA without a word."""
    with pytest.warns(UserWarning, match="CE-LoRA adapter 'default' approximates no layer's backward") as caught:
        get_peft_model(tiny_llama(), ce_config(**kwargs))
    assert any(re.search(message, str(w.message)) for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize("kwargs", [{}, {"ce_ratio": 1.0}, {"ce_ratio": {"v_proj": 1.0}}])
def test_no_warning_where_some_layer_is_approximated_or_none_was_asked(kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_llama(), ce_config(**kwargs))
    assert not [w for w in caught if "approximates no layer" in str(w.message)]


def test_ce_ratio_keys_matching_no_target_are_named_in_a_warning():
    """As PEFT warns for ``rank_pattern``: a misspelt key beside a matching one left down_proj exact without a word.
    Not for the paper's default (it names projections a model need not target) nor when every key matches."""
    with pytest.warns(UserWarning, match=r"the ce_ratio keys \['down_porj'\] match none of its targets"):
        model = get_peft_model(tiny_llama(), ce_config(ce_ratio={"v_proj": 0.5, "down_porj": 0.5}))
    assert model.base_model.model.model.layers[0].mlp.down_proj.ce_state["default"].options.ratio == 1.0
    for kwargs in ({"target_modules": ["q_proj", "v_proj"]}, {"ce_ratio": {"v_proj": 0.5, "down_proj": 0.5}}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_peft_model(tiny_llama(), ce_config(**kwargs))
        assert not [w for w in caught if "ce_ratio keys" in str(w.message)], kwargs


def test_pissa_adapter_converts_to_lora_on_save(tmp_path):
    """``save_pretrained(path_initial_model_for_weight_conversion=...)`` (PiSSA/OLoRA): PEFT resets the initial
    adapter's ``init_weights`` for methods other than LoRA, which CE-LoRA maps onto ``init_lora_weights``."""
    model = get_peft_model(tiny_llama(), ce_config(target_modules=["q_proj"], init_lora_weights="pissa"))
    config = model.peft_config["default"]
    config.init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    config.init_lora_weights = "pissa"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    ids = tokens(36)
    expected = outputs(model, ids)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    converted = PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted")
    assert converted.peft_config["default"].r == 2 * config.r  # the conversion stacks the two adapters
    assert_close_rel(outputs(converted, ids), expected, 1e-5, "converted PiSSA adapter on the original base")


def test_eva_rank_redistribution_resizes_the_ce_options():
    """EVA (``initialize_lora_eva_weights``) re-creates adapters at new ranks through ``update_layer``; the CE options
    kept the old rank (LoRA's slots in the packed backward, the 7r/8 factorisation), and the first approximate
    backward failed with a shape mismatch."""
    from peft import EvaConfig, initialize_lora_eva_weights

    torch.manual_seed(11)
    config = ce_config(init_lora_weights="eva", eva_config=EvaConfig(rho=2.0), ce_ratio=0.5)
    model = get_peft_model(tiny_llama(layers=1), config, low_cpu_mem_usage=True)
    batches = [{"input_ids": tokens(40 + i), "attention_mask": torch.ones(2, 16, dtype=torch.long)} for i in range(4)]
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    layers = [m for m in model.modules() if isinstance(m, CELinear)]
    assert any(m.r["default"] != 8 for m in layers), "EVA kept every rank: nothing to test"
    for layer in layers:
        rank, options = layer.r["default"], layer.ce_state["default"].options
        assert (options.lora_rank, options.svd_rank) == (rank, max(1, 7 * rank // 8))
    model.enable_input_require_grads()
    for _ in range(2):  # step 0 exact, step 1 approximate (the one that failed)
        model.zero_grad()
        train_backward(model, tokens(45))
    assert all(s.steps == 2 for s in ce_states(model)) and ce_states(model)
    assert all(torch.isfinite(g).all() for g in lora_grads(model).values())


def test_merge_and_unload_keeps_outputs():
    model = trained_ce_model(ce_ratio=0.5)
    ids = tokens(32)
    expected = outputs(model, ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, CELinear) for m in merged.modules())
    assert_close_rel(outputs(merged, ids), expected, 1e-5, "merged")


def test_multiple_adapters_and_set_adapter():
    torch.manual_seed(6)
    model = get_peft_model(tiny_llama(), ce_config(ce_ratio=0.5), adapter_name="first")
    torch.manual_seed(7)
    model.add_adapter("second", ce_config(ce_ratio=0.25, target_modules=["v_proj", "down_proj"]))
    ids = tokens(33)
    out_first = outputs(model, ids)
    model.set_adapter("second")
    out_second = outputs(model, ids)
    assert not torch.allclose(out_first, out_second)
    v_proj = model.base_model.model.model.layers[1].self_attn.v_proj  # layer 0's input needs no gradient
    assert v_proj.ce_state["second"].options.ratio == 0.25 and v_proj.ce_state["first"].options.ratio == 0.5

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # trains "second" only
    assert v_proj.ce_state["second"].steps == 1 and v_proj.ce_state["first"].steps == 0
    grads = lora_grads(model)
    assert grads and all(".second." in n for n in grads)

    model.set_adapter("first")
    assert_close_rel(outputs(model, ids), out_first, 1e-6, "back to first")
    model.delete_adapter("second")
    assert "second" not in v_proj.ce_state


def test_export_loads_in_stock_peft_without_kimi_hf(tmp_path):
    model = trained_ce_model(ce_ratio=0.5, lora_dropout=0.0)
    ids = tokens(34)
    expected = outputs(model, ids)
    base_dir, ce_dir, from_model, from_dir = (tmp_path / n for n in ("base", "ce", "lora_model", "lora_dir"))
    tiny_llama().save_pretrained(base_dir)
    model.save_pretrained(ce_dir)
    export_as_lora(model, from_model)
    export_as_lora(ce_dir, from_dir)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
for adapter in sys.argv[1:]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), adapter).eval()
    assert type(model.peft_config["default"]).__name__ == "LoraConfig"
    with torch.no_grad():
        torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, adapter + "/logits.pt")
assert "kimi_hf" not in sys.modules
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(from_model), str(from_dir)], check=True, env=env, cwd=tmp_path, timeout=300
    )
    for adapter in (from_model, from_dir):
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert_close_rel(torch.load(adapter / "logits.pt"), expected, 1e-6, f"exported {adapter.name}")
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            assert f.metadata() == {"format": "pt"}  # as PEFT's save_pretrained writes it


def test_export_reads_and_writes_safetensors_only_and_refuses_other_sources(tmp_path):
    """A CE-LoRA folder saved with ``safe_serialization=False`` is refused, by file (its pickled .bin used to be
    copied as is, next to any stale safetensors file, which PEFT then loaded); a wrong source type is named and
    no folder is made for it."""
    model = trained_ce_model(ce_ratio=0.5, lora_dropout=0.0)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="only a pickled adapter_model.bin: save it with safe_serialization=True"):
        export_as_lora(tmp_path / "bin", tmp_path / "out")
    for bad in (tiny_llama(), 3):
        with pytest.raises(TypeError, match="a PeftModel or an adapter directory"):
            export_as_lora(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not (tmp_path / "out").exists()


def test_export_names_a_missing_adapter_and_refuses_a_name_with_a_directory(tmp_path):
    """A missing adapter was reported as 'not a CE-LoRA adapter (config NoneType)'; with a directory, adapter_name
    was ignored, so asking for adapter 'second' of a folder exported the folder's default adapter instead."""
    model = trained_ce_model(ce_ratio=0.5, lora_dropout=0.0)
    model.add_adapter("second", ce_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"no adapter 'third' in this model \(its adapters: \['default', 'second'\]\)"):
        export_as_lora(model, tmp_path / "never", adapter_name="third")
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="for a directory pass that adapter's folder .*saved/second"):
        export_as_lora(tmp_path / "saved", tmp_path / "never", adapter_name="second")
    assert not (tmp_path / "never").exists()
    export_as_lora(tmp_path / "saved" / "second", tmp_path / "second_lora")
    exported = json.loads((tmp_path / "second_lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["target_modules"] == ["q_proj"]


def test_register_is_idempotent_and_get_peft_model_dispatches():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    from kimi_hf.peft import CELoraModel, register_ce_lora

    register_ce_lora()
    register_ce_lora()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["CE_LORA"] is CELoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CE_LORA] is CELoraModel
    assert list(PeftType).count(PeftType.CE_LORA) == 1
    model = get_peft_model(tiny_llama(layers=1), ce_config())
    assert isinstance(model.base_model, CELoraModel)


def with_decaying_spectra(model: torch.nn.Module) -> torch.nn.Module:
    """Give every hidden projection a decaying spectrum, as trained weights have (random ones do not)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.out_features != model.config.vocab_size:
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_((u * (s[0] / (1 + torch.arange(len(s))) ** 0.8)) @ vh)
    return model


def test_toy_fine_tune_reaches_loras_loss():
    """Same init, data and budget: CE-LoRA (ratio 0.5, reselect every 10 steps) ends within 5% of LoRA's loss."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 96, (8, 12), generator=gen)
    data = torch.cat([base, base], dim=1)  # copy task: the second half repeats the first
    final = {}
    for name, config in [
        ("lora", LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ)),
        ("ce", CELoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJ, ce_ratio=0.5, ce_recompute_every=10)),
    ]:
        torch.manual_seed(8)
        model = get_peft_model(with_decaying_spectra(tiny_llama(layers=1)), config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(30):
            opt.zero_grad()
            loss = train_backward(model, data)
            opt.step()
        final[name] = loss.item()
    assert final["lora"] < 0.7 * math.log(96), final  # it learned something
    assert abs(final["ce"] - final["lora"]) <= 0.05 * final["lora"], final
