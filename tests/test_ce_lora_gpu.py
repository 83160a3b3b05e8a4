"""CE-LoRA on a CUDA GPU: the Triton packing kernel in bf16 at real sizes, and training through it."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from kimi_hf.kernels.ce_lora import (
    ce_grad_input,
    ce_pack_grad_output,
    channel_scores,
    kept_channels,
    low_rank_factors,
    make_plan,
    naive_ce_grad_input,
    residual_row_norms,
    select_channels,
)
from kimi_hf.peft import CELinear, CELoraConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 333)])
@pytest.mark.parametrize("ratio", [0.25, 0.65])
@pytest.mark.parametrize("shares", [0, 1, 5])
def test_triton_pack_bf16_matches_reference(shape, ratio, shares, monkeypatch):
    """bf16 at real sizes, with the channel shares the launcher picks, one, and five per row block (the partial
    products handed between programs of different SMs)."""
    from kimi_hf.kernels.ce_lora import pack

    monkeypatch.setattr(pack, "SHARES", shares)
    _check_bf16_pack(shape, ratio, lora_rank=16)


@pytest.mark.parametrize("config", range(5))
def test_triton_pack_bf16_every_tile_config(config, monkeypatch):
    """Every tile config the autotuner may pick (``pack.CONFIG`` launches it at every shape: 32 and 64 rows, channel
    tiles of 128 and 64, 4 and 8 warps), with the launcher's channel shares."""
    from kimi_hf.kernels.ce_lora import pack

    assert len(pack._CONFIGS) == 5  # a config added to the list is added here too
    monkeypatch.setattr(pack, "CONFIG", config)
    _check_bf16_pack((4096, 4096), 0.5, lora_rank=16)


@pytest.mark.parametrize("lora_rank", [24, 128])
def test_triton_pack_bf16_low_rank_width_not_a_power_of_two(lora_rank):
    """LoRA ranks whose packed low-rank width (SVD rank 7r/8 + r, rounded up to 16) is no power of two: 48 and 240
    wide; the kernel's tiles are rounded up and masked (tl.arange refused them)."""
    _check_bf16_pack((1000, 333), 0.25, lora_rank)


def _check_bf16_pack(shape: tuple[int, int], ratio: float, lora_rank: int) -> None:
    """The Triton pack against the torch one, and dX against float64, for ``W [O, I] = shape`` in bf16."""
    out_features, in_features = shape
    svd_rank = 7 * lora_rank // 8
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda") / in_features**0.5
    dy = torch.randn(2048 + 17, out_features, device="cuda")
    b0, a0 = low_rank_factors(weight, svd_rank)
    keep = kept_channels(out_features, ratio, svd_rank + lora_rank)
    index = select_channels(channel_scores(dy, residual_row_norms(weight, b0, a0), "activation_aware"), keep)
    plan = make_plan(weight, b0, a0, index, torch.bfloat16, lora_rank=lora_rank)
    lora_a = torch.randn(lora_rank, in_features, device="cuda").bfloat16()
    lora_b = torch.randn(out_features, lora_rank, device="cuda").bfloat16()
    lora = (lora_a, lora_b, 0.5)
    dy16 = dy.bfloat16()
    packed = ce_pack_grad_output(dy16, plan, "triton", lora=lora)
    reference = ce_pack_grad_output(dy16, plan, "torch", lora=lora)
    r_pad = plan.b0_pad.shape[1]
    assert torch.equal(packed[:, r_pad:], reference[:, r_pad:])  # the kept columns are copies
    assert_close_rel(packed[:, :r_pad], reference[:, :r_pad], 1e-2, "low-rank block")
    expected = naive_ce_grad_input(dy.double(), weight.double(), b0.double(), a0.double(), index)
    expected += (dy.double() @ (0.5 * lora_b.double())) @ lora_a.double()
    plan.stack[plan.lora_slots].zero_()  # the launch below writes A back
    assert_close_rel(ce_grad_input(dy16, plan, "triton", lora=lora), expected, 2e-2, "dX")
    assert torch.equal(plan.stack[plan.lora_slots], lora_a)


# Both backends must select the same channels at the first backward for the later approximate ones to agree: with bf16
# adapters the forward runs the same torch ops on both, so dY and the selection are the same. With fp32 adapters
# (PEFT's default) the forward's fp32 branch runs in lora_branch's kernels on one and in torch on the other; their
# rounding differs by a step here and there, a near-tie between two channels' scores can flip, and the gradients of
# the approximate steps then differ by more than rounding (1.2% in an fp16 run under the interpreter, against 0.2% at
# ratio 1). So that case runs at ratio 1: the branch's kernels in a whole model, no selection.
@pytest.mark.parametrize("autocast_adapter_dtype, ratio", [(False, 0.5), (True, 1.0)])
def test_bf16_training_triton_matches_torch_backend(autocast_adapter_dtype, ratio):
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    ids = torch.randint(0, 512, (2, 256), device="cuda")
    grads = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
        ce_config = CELoraConfig(r=16, lora_alpha=32, ce_ratio=ratio, init_lora_weights=False, target_modules=targets)
        model = get_peft_model(model, ce_config, autocast_adapter_dtype=autocast_adapter_dtype)
        states = [m.ce_state["default"] for m in model.modules() if isinstance(m, CELinear)]
        for state in states:
            state.backend = backend
        model.train()
        for _ in range(3):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        if ratio < 1:
            assert {s.steps for s in states if not s.exact} == {0, 3}  # 0: layer 0's q_proj input needs no dX
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        assert_close_rel(grads[0][name], grad, 3e-2, name)


def test_autocast_with_fp32_master_weights():
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    ce_config = CELoraConfig(r=16, ce_ratio=0.5, init_lora_weights=False, target_modules=["o_proj", "down_proj"])
    model = get_peft_model(LlamaForCausalLM(config).cuda(), ce_config)
    model.train()
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)


def test_pack_of_no_rows():
    """An empty batch packs to an empty G (the channel shares divided by the zero row blocks; the interpreter's
    path has no shares, so this is a GPU test) and still writes LoRA's A, which the kernel copies otherwise."""
    w = torch.randn(256, 64, device="cuda")
    b0, a0 = low_rank_factors(w, 6)
    plan = make_plan(w, b0, a0, torch.arange(kept_channels(256, 0.5, 6 + 4), device="cuda"), torch.bfloat16, 4)
    lora_a = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    lora = (lora_a, torch.randn(256, 4, device="cuda", dtype=torch.bfloat16), 2.0)
    packed = ce_pack_grad_output(torch.zeros(0, 256, device="cuda", dtype=torch.bfloat16), plan, "triton", lora=lora)
    assert packed.shape == (0, plan.b0_pad.shape[1] + plan.keep)
    assert torch.equal(plan.stack[plan.lora_slots], lora_a)  # no launch, but A is in the stack all the same


def test_triton_pack_tunes_each_row_bucket():
    """The tile is picked per power-of-two bucket of the row count: the best tile depends on it (the best at 2K rows
    took 1.7x the best time at 16K rows on an H100, session 50), and one pick reused at every row count would keep
    the first one's."""
    from kimi_hf.kernels.ce_lora import pack

    out_features, in_features = 1000, 333
    weight = torch.randn(out_features, in_features, device="cuda") / in_features**0.5
    b0, a0 = low_rank_factors(weight, 14)
    plan = make_plan(weight, b0, a0, torch.arange(0, out_features, 3, device="cuda"), torch.bfloat16)
    for rows in (100, 120, 3000):
        dy = torch.randn(rows, out_features, device="cuda", dtype=torch.bfloat16)
        expected = naive_ce_grad_input(dy.double(), weight.double(), b0.double(), a0.double(), plan.index)
        assert_close_rel(ce_grad_input(dy, plan).double(), expected, 2e-2, f"dX at {rows} rows")
    buckets = sorted(key[3] for key in pack._PICKED if key[:3] == (out_features, plan.keep, plan.b0_pad.shape[1]))
    assert buckets == [128, 4096]
