"""GraphedLossStep: a captured forward + backward replays the eager step (GPU), and refuses what it cannot capture."""

import pytest
import torch
from helpers import assert_close_rel, tiny_kimi_linear_config
from peft import get_peft_model

import kimi_hf.models.kimi_linear.modeling_kimi_linear as modeling
from kimi_hf import CELoraConfig, GraphedLossStep, KimiLinearForCausalLM


def _batch(device="cpu", seed=0):
    ids = torch.randint(3, 256, (2, 64), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def test_refuses_cpu_models_and_bad_arguments():
    model = KimiLinearForCausalLM(tiny_kimi_linear_config())
    with pytest.raises(ValueError, match=r"one CUDA device, got \['cpu'\]"):
        GraphedLossStep(model, _batch())
    for steps in (0, 1.5, "3", True):
        with pytest.raises(ValueError, match=f"warmup_steps must be an int >= 1, got {steps!r}"):
            GraphedLossStep(model, _batch(), warmup_steps=steps)
    with pytest.raises(ValueError, match=r"example_batch\['input_ids'\] must be a tensor, got list"):
        GraphedLossStep(model, {"input_ids": [1, 2]})
    for batch in (_batch()["input_ids"], [_batch()["input_ids"]], {}):
        with pytest.raises(ValueError, match="example_batch must map names to tensors"):
            GraphedLossStep(model, batch)


def test_refuses_python_side_state_it_cannot_replay():
    balancing = KimiLinearForCausalLM(tiny_kimi_linear_config(router_bias_update_rate=0.01))
    for model in (balancing, torch.nn.Sequential(balancing)):  # also inside a wrapper
        with pytest.raises(ValueError, match="router_bias_update_rate=0.01"):
            GraphedLossStep(model, _batch())
    ce_lora = CELoraConfig(r=4, target_modules=["o_proj"])
    peft_model = get_peft_model(KimiLinearForCausalLM(tiny_kimi_linear_config()), ce_lora)
    with pytest.raises(ValueError, match="CE-LoRA adapters reselect"):
        GraphedLossStep(peft_model, _batch())


def test_refuses_distributed_training(tmp_path):
    """A model under DDP (one gloo process on CPU here) is refused by name before anything is captured."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(KimiLinearForCausalLM(tiny_kimi_linear_config()))
        with pytest.raises(ValueError, match=r"does not capture distributed training \(DistributedDataParallel\)"):
            GraphedLossStep(model, _batch())
    finally:
        dist.destroy_process_group()


def test_refuses_what_kimi_linear_reads_back_to_the_host(monkeypatch):
    """A mask (all ones too), cu_seqlens, seq_idx, a batch of one's position_ids and the MoE's per-expert loop
    synchronise: CUDA broke the capture off with errors that named none of them (seen on an H100). Only Kimi Linear is
    concerned."""
    refuse = GraphedLossStep._refuse_host_syncs
    model = KimiLinearForCausalLM(tiny_kimi_linear_config())
    ones = torch.ones(2, 64, dtype=torch.long)
    for extra, named in (({"attention_mask": ones}, "attention_mask"), ({"cu_seqlens": ones[0, :2]}, "cu_seqlens"),
                         ({"position_ids": torch.arange(64)[None]}, "position_ids"),
                         ({"seq_idx": torch.zeros(1, 64, dtype=torch.long)}, "seq_idx")):  # fmt: skip
        with pytest.raises(ValueError, match=f"Kimi Linear reads {named} back to the host"):
            refuse(model, {**_batch(), **extra})
    with pytest.raises(ValueError, match=r"MoE would run its experts as a loop \(experts torch.float32 on cpu"):
        refuse(model, _batch())
    monkeypatch.setattr(modeling, "_grouped_mm_ok", lambda x: True)  # as bf16 experts on a Hopper GPU
    refuse(model, {**_batch(), "position_ids": torch.arange(64).expand(2, 64)})  # a batch of two: not read
    monkeypatch.setattr(modeling.KimiLinearSparseMoE, "use_grouped_mm", False)
    with pytest.raises(ValueError, match="use_grouped_mm=False"):
        refuse(model, _batch())
    refuse(torch.nn.Sequential(torch.nn.Linear(2, 2)), {**_batch(), "attention_mask": ones})  # not Kimi Linear


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replays_equal_eager_steps():
    """bf16 Kimi Linear (KDA, MLA, grouped-GEMM MoE): loss and every gradient of two different batches equal the
    eager step's; gradients are handed back after the user set them to None; a batch of another shape is refused."""
    if not modeling._grouped_mm_ok(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("the capturable (grouped-GEMM) MoE needs a Hopper or newer GPU")
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config()).cuda().to(torch.bfloat16).train()
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
    mask = {"attention_mask": torch.ones_like(batch["input_ids"])}
    with pytest.raises(ValueError, match="Kimi Linear reads attention_mask back to the host"):
        GraphedLossStep(model, {**batch, **mask})
    with pytest.raises(ValueError, match="MoE would run its experts as a loop"):
        GraphedLossStep(model.float(), batch)
