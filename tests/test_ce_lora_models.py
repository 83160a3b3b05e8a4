"""CE-LoRA on the architectures kimi_hf targets: DeepSeek-V3 (Kimi K2), Kimi K2.5 (text, and images through its
vision tower and projector), Kimi Linear, AttnRes.

Tiny random configs built locally. Each model gets CE-LoRA on its projections wide enough to drop
channels, trains two steps (gradient flows, CE states step, nothing is NaN) and merges back to the same
outputs.
"""

from __future__ import annotations

import kimi_linear_utils
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from kimi_hf.models import attn_res
from kimi_hf.peft import CELinear, CELoraConfig


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny shapes run much faster on one intra-op thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deepseek_v3_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=96, hidden_size=256, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_group=1, topk_group=1,
    )  # fmt: skip


def check_ce_lora_trains(
    model: torch.nn.Module, target_modules: list[str] | str, ids: torch.Tensor, **inputs: torch.Tensor
) -> list[str]:
    """Two training steps and a merge; returns the names of the layers whose backward was approximated."""
    config = CELoraConfig(r=8, lora_alpha=16, target_modules=target_modules, ce_ratio=0.5, init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    peft_model.enable_input_require_grads()
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, CELinear)}
    approximated = [m.ce_state["default"] for m in layers.values() if not m.ce_state["default"].exact]
    assert approximated, "no targeted layer is wide enough to drop channels"
    peft_model.train()
    for _ in range(2):
        peft_model.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids, **inputs).loss
        loss.backward()
        assert torch.isfinite(loss)
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(state.steps == 2 and state.selections == 1 for state in approximated)

    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, **inputs).logits
        merged = peft_model.merge_and_unload()
        actual = merged(input_ids=ids, **inputs).logits
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4)
    return [n for n, m in layers.items() if not m.ce_state["default"].exact]


def test_deepseek_v3_kimi_k2_architecture():
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(deepseek_v3_config())
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # the routed experts are fused parameters in transformers 5: the same targets as PEFT LoRA (they were left out)
    lora = {n for n, _ in get_peft_model(DeepseekV3ForCausalLM(deepseek_v3_config()),
                                         LoraConfig(target_modules=list(targets))).named_modules() if "lora_A" in n}
    ce = {n for n, _ in get_peft_model(DeepseekV3ForCausalLM(deepseek_v3_config()),
                                       CELoraConfig(target_modules=list(targets))).named_modules() if "lora_A" in n}
    assert ce == lora and any(".experts." in n for n in ce), sorted(ce ^ lora)
    check_ce_lora_trains(model, targets, torch.randint(0, 96, (2, 12)))


def test_kimi_k25_text_path():
    # Every transformers in the supported range (5.17 - 5.24) has kimi_k25.
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  pos_emb_height=8, pos_emb_width=8)  # fmt: skip
    config = transformers.Kimi_K25Config(
        text_config=deepseek_v3_config().to_dict(), vision_config=vision, projection_hidden_size=64
    )
    torch.manual_seed(0)
    model = transformers.Kimi_K25ForConditionalGeneration(config)
    # the language model's projections only (the vision tower stays frozen, untouched)
    targets = r".*language_model.*\.(o_proj|q_b_proj|gate_proj|up_proj|down_proj)"
    check_ce_lora_trains(model, targets, torch.randint(0, 96, (2, 12)))


def test_kimi_k25_vision_path():
    """Images through the vision tower and projector into the language model, CE-LoRA on all three."""
    vision = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4,
                  pos_emb_height=8, pos_emb_width=8)  # fmt: skip
    config = transformers.Kimi_K25Config(
        text_config=deepseek_v3_config().to_dict(), vision_config=vision, projection_hidden_size=256,
        image_token_id=95,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Kimi_K25ForConditionalGeneration(config)
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])  # two images of 4 x 4 and 4 x 8 patches: 4 and 8 tokens (2 x 2 merge)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90, (2, 16), generator=gen)
    ids[0, 2:6], ids[1, 3:11] = 95, 95
    # pixels that need a gradient: the vision tower's first layer then computes its input gradient too, as
    # enable_input_require_grads makes the text embeddings' consumers do
    pixels = torch.randn(int(grid.prod(-1).sum()), 3, 14, 14, generator=gen).requires_grad_()
    targets = r".*(vision_tower.*\.(q_proj|k_proj|v_proj|proj|fc1|fc2)|mm_projector\.(in_proj|out_proj)|" \
              r"language_model.*\.(o_proj|q_b_proj|gate_proj|up_proj|down_proj))"  # fmt: skip
    approximated = check_ce_lora_trains(model, targets, ids, pixel_values=pixels, image_grid_thw=grid)
    for part in ("vision_tower", "mm_projector", "language_model"):
        assert any(part in name for name in approximated), f"no approximated layer in {part}: {approximated}"


def test_kimi_linear():
    model = kimi_linear_utils.tiny_model(hidden_size=256, intermediate_size=384)
    ids = kimi_linear_utils.random_ids(2, 12)
    check_ce_lora_trains(model, ["o_proj", "gate_proj", "up_proj", "down_proj", "w2"], ids)


def test_attn_res_model():
    config = attn_res.AttnResConfig(
        vocab_size=96, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, residual="block", attn_res_block_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = attn_res.AttnResForCausalLM(config)
    check_ce_lora_trains(model, ["q_proj", "o_proj", "up_proj", "down_proj"], torch.randint(0, 96, (2, 12)))
