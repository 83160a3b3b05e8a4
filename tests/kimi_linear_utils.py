"""Shared configs, model factories and subprocess helper of the Kimi Linear tests.

``OFFICIAL_48B_CONFIG`` is the ``config.json`` of ``moonshotai/Kimi-Linear-48B-A3B-*`` as written in
REFERENCE.md section 1 (no download: the values are typed here). ``tiny_config_dict`` keeps its structure
(keys, 1-indexed ``linear_attn_config``, hybrid KDA/MLA pattern, a dense first layer then MoE) at
sizes that run in milliseconds on a CPU.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kimi_hf import KimiLinearConfig, KimiLinearForCausalLM

OFFICIAL_48B_CONFIG: dict[str, Any] = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "model_type": "kimi_linear",
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 72,
    "intermediate_size": 9216,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "model_max_length": 1048576,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "use_cache": True,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
        # Present in some copies of the config; the remote code ignores it.
        "gate_lower_bound": -5.0,
    },
}

# 0-indexed full-attention (MLA) layers of the 48B model.
OFFICIAL_48B_MLA_LAYERS = [3, 7, 11, 15, 19, 23, 26]

TINY_VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes run 10-100x faster on one intra-op thread (no thread start-up and, on a busy 2-core
    machine, no spinning against other processes). Imported by each test module; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """The 48B ``config.json`` scaled down: 4 layers (KDA, MLA, KDA, MLA; 1-indexed lists), layer 0 dense,
    layers 1-3 MoE with 4 experts (top-2) and one shared expert, KDA 2 heads x 16, MLA 2 heads."""
    cfg = copy.deepcopy(OFFICIAL_48B_CONFIG)
    cfg.update(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=48,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        model_max_length=4096,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        num_experts=4,
        num_experts_per_token=2,
        moe_intermediate_size=16,
        routed_scaling_factor=2.446,
        torch_dtype="float32",
    )
    cfg["linear_attn_config"] = {
        "full_attn_layers": [2, 4],
        "kda_layers": [1, 3],
        "num_heads": 2,
        "head_dim": 16,
        "short_conv_kernel_size": 4,
        "gate_lower_bound": -5.0,
    }
    cfg.update(overrides)
    return cfg


def tiny_config(**overrides: Any) -> KimiLinearConfig:
    """A :class:`KimiLinearConfig` from :func:`tiny_config_dict` (keys that only describe a checkpoint dropped)."""
    cfg = tiny_config_dict(**overrides)
    for key in ("architectures", "auto_map", "model_type", "torch_dtype"):
        cfg.pop(key, None)
    return KimiLinearConfig(**cfg)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the norms, conv weights and router bias non-trivial values (init sets ones/zeros), so that a
    test that swaps two of them, or drops one, sees a difference. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen, dtype=torch.float32).to(b.dtype))
    return model


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> KimiLinearForCausalLM:
    """A seeded tiny :class:`KimiLinearForCausalLM` in eval mode with randomized norms and router bias."""
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_config(**overrides))
    randomize_(model, seed + 1)
    return model.to(dtype).eval()


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE routers of a Kimi Linear model (also inside a wrapper: DDP, PEFT), in layer order."""
    from kimi_hf.models.kimi_linear.modeling_kimi_linear import KimiLinearRouter

    return [m for m in model.modules() if isinstance(m, KimiLinearRouter)]


def random_ids(batch: int, seq_len: int, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """``[batch, seq_len]`` token ids that avoid the special ids 0-2 (pad, bos, eos of the tiny config)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq_len), generator=gen)


def write_config_json(path: Path, cfg: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def run_python(code: str, *args: str, timeout: int = 120) -> str:
    """Run ``code`` in a fresh interpreter with ``sys.argv[1:] == args``; return its stdout, or fail
    showing its stderr."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.CalledProcessError as err:
        raise AssertionError(f"subprocess failed (rc {err.returncode}):\n{err.stdout}\n{err.stderr}") from None
    return proc.stdout
