"""GraphedLossStep: a captured forward + backward replays the eager step (GPU), and refuses what it cannot capture."""

import pytest
import torch
from helpers import assert_close_rel
from peft import get_peft_model

import kimi_hf.models.kimi_linear.modeling_kimi_linear as modeling
from kimi_hf import CELoraConfig, GraphedLossStep, KimiLinearConfig, KimiLinearForCausalLM


def _config(**overrides) -> KimiLinearConfig:
    return KimiLinearConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_experts=8,
        num_experts_per_token=2, moe_intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2, "head_dim": 64},
        **overrides,
    )  # fmt: skip


def _batch(device="cpu", seed=0):
    ids = torch.randint(3, 256, (2, 64), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def test_refuses_cpu_models_and_bad_arguments():
    model = KimiLinearForCausalLM(_config())
    with pytest.raises(ValueError, match=r"one CUDA device, got \['cpu'\]"):
        GraphedLossStep(model, _batch())
    with pytest.raises(ValueError, match="warmup_steps must be >= 1, got 0"):
        GraphedLossStep(model, _batch(), warmup_steps=0)
    with pytest.raises(ValueError, match="example_batch must map names to tensors"):
        GraphedLossStep(model, {"input_ids": [1, 2]})


def test_refuses_python_side_state_it_cannot_replay():
    with pytest.raises(ValueError, match="router_bias_update_rate=0.01"):
        GraphedLossStep(KimiLinearForCausalLM(_config(router_bias_update_rate=0.01)), _batch())
    peft_model = get_peft_model(KimiLinearForCausalLM(_config()), CELoraConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="CE-LoRA adapters reselect"):
        GraphedLossStep(peft_model, _batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replays_equal_eager_steps():
    """bf16 Kimi Linear (KDA, MLA, grouped-GEMM MoE): loss and every gradient of two different batches equal the
    eager step's; gradients are handed back after the user set them to None; a batch of another shape is refused."""
    if not modeling._grouped_mm_ok(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("the capturable (grouped-GEMM) MoE needs a Hopper or newer GPU")
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(_config()).cuda().to(torch.bfloat16).train()
    step = GraphedLossStep(model, _batch("cuda", seed=0))
    for seed in (1, 2):
        batch = _batch("cuda", seed=seed)
        model.zero_grad(set_to_none=True)
        eager_loss = model(**batch).loss
        eager_loss.backward()
        eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        loss = step(batch).clone()
        assert_close_rel(loss, eager_loss.detach(), 1e-3, f"loss of batch {seed}")
        for name, g in eager.items():
            got = dict(model.named_parameters())[name].grad
            assert got is not None, f"no gradient for {name} after the replay"
            assert_close_rel(got, g, 2e-2, f"grad {name} of batch {seed}")
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] is torch.int64 \(2, 32\)"):
        step({"input_ids": batch["input_ids"][:, :32], "labels": batch["labels"][:, :32]})
