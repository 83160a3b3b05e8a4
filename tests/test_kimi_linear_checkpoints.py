"""Checkpoints: our save/load round trip, the official state-dict names and config layout, and
interoperability with transformers' native ``kimi_linear`` and with remote-code loading.

The native class is run in a subprocess with fla blocked (``sys.modules["fla"] = None``): with fla
installed it would pick fla's Triton kernels, which fail on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close_rel
from kimi_linear_utils import (  # noqa: F401 (single_thread: autouse fixture)
    random_ids,
    run_python,
    single_thread,
    tiny_config,
    tiny_config_dict,
    tiny_model,
    write_config_json,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel

from kimi_hf import KimiLinearForCausalLM, KimiLinearModel

FP32_NAMES = ("A_log", "dt_bias", "gate.weight", "e_score_correction_bias")


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official Kimi Linear checkpoint with its shape, written out from REFERENCE.md
    (independently of the model code) for a config.json dict."""
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    lac = cfg["linear_attn_config"]
    heads, head_dim, conv = lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]
    inner = heads * head_dim
    mla_heads, nope, rope, v = (
        cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    )  # fmt: skip
    rank, moe_inter = cfg["kv_lora_rank"], cfg["moe_intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)
    }  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        a = p + "self_attn."
        if i + 1 in lac["kda_layers"]:
            for name in ("q", "k", "v"):
                shapes[a + f"{name}_proj.weight"] = (inner, hidden)
                shapes[a + f"{name}_conv1d.weight"] = (inner, 1, conv)
            shapes.update({
                a + "f_a_proj.weight": (head_dim, hidden), a + "f_b_proj.weight": (inner, head_dim),
                a + "g_a_proj.weight": (head_dim, hidden), a + "g_b_proj.weight": (inner, head_dim),
                a + "dt_bias": (inner,), a + "A_log": (1, 1, heads, 1), a + "b_proj.weight": (heads, hidden),
                a + "o_norm.weight": (head_dim,), a + "o_proj.weight": (hidden, inner),
            })  # fmt: skip
        else:
            shapes.update({
                a + "q_proj.weight": (mla_heads * (nope + rope), hidden),
                a + "kv_a_proj_with_mqa.weight": (rank + rope, hidden),
                a + "kv_a_layernorm.weight": (rank,),
                a + "kv_b_proj.weight": (mla_heads * (nope + v), rank),
                a + "o_proj.weight": (hidden, mla_heads * v),
            })  # fmt: skip
        if i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0:
            m = p + "block_sparse_moe."
            shapes[m + "gate.weight"] = (cfg["num_experts"], hidden)
            shapes[m + "gate.e_score_correction_bias"] = (cfg["num_experts"],)
            for j in range(cfg["num_experts"]):
                shapes[m + f"experts.{j}.w1.weight"] = (moe_inter, hidden)
                shapes[m + f"experts.{j}.w3.weight"] = (moe_inter, hidden)
                shapes[m + f"experts.{j}.w2.weight"] = (hidden, moe_inter)
            shared = moe_inter * cfg["num_shared_experts"]
            shapes[m + "shared_experts.gate_proj.weight"] = (shared, hidden)
            shapes[m + "shared_experts.up_proj.weight"] = (shared, hidden)
            shapes[m + "shared_experts.down_proj.weight"] = (hidden, shared)
        else:
            inter = cfg["intermediate_size"]
            shapes.update({
                p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            })  # fmt: skip
    return shapes


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    tensors = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model of ours saved with save_pretrained, its input ids and logits."""
    path = tmp_path_factory.mktemp("ours")
    model = tiny_model(seed=31)
    model.save_pretrained(path)
    ids = random_ids(2, 9, seed=31)
    torch.save(ids, path / "ids.pt")
    logits = _logits(model, ids)
    return path, ids, logits


# ---------------------------------------------------------------------------------------------- ours
def test_save_load_round_trip_gives_identical_logits(saved):
    path, ids, logits = saved
    loaded = KimiLinearForCausalLM.from_pretrained(path).eval()
    assert torch.equal(_logits(loaded, ids), logits)
    tensors = _read_safetensors(path)
    state = loaded.state_dict()
    assert sorted(state) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t), name


def test_from_pretrained_output_loading_info(saved):
    path, _, _ = saved
    out = KimiLinearForCausalLM.from_pretrained(path, output_loading_info=True)
    assert isinstance(out, tuple) and len(out) == 2
    model, info = out
    assert isinstance(model, KimiLinearForCausalLM)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_saved_keys_are_exactly_the_official_names(saved):
    path, _, _ = saved
    tensors = _read_safetensors(path)
    expected = official_shapes(tiny_config_dict())
    assert sorted(tensors) == sorted(expected)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    kda = "model.layers.0.self_attn."
    assert tuple(tensors[kda + "q_conv1d.weight"].shape) == (32, 1, 4)
    assert tensors[kda + "A_log"].dtype == torch.float32 and tuple(tensors[kda + "A_log"].shape) == (1, 1, 2, 1)
    assert tensors[kda + "dt_bias"].dtype == torch.float32
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in tensors
    assert "model.layers.3.block_sparse_moe.gate.e_score_correction_bias" in tensors
    assert "model.layers.2.block_sparse_moe.shared_experts.down_proj.weight" in tensors


def test_saved_files_and_config_json(saved):
    path, _, _ = saved
    files = {p.name for p in path.iterdir()}
    assert "model.safetensors" in files or "model.safetensors.index.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files - {"ids.pt"})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "kimi_linear"
    assert cfg["architectures"] == ["KimiLinearForCausalLM"]
    assert cfg["linear_attn_config"]["kda_layers"] == [1, 3]
    assert cfg["linear_attn_config"]["full_attn_layers"] == [2, 4]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}  # as the official one
    for ref in cfg["auto_map"].values():
        assert (path / (ref.split(".")[0] + ".py")).exists(), f"auto_map points to a missing file: {ref}"
    # every official field is written (readers with other defaults must see our values)
    fields = ("num_experts", "moe_layer_freq", "first_k_dense_replace", "use_grouped_topk", "mla_use_nope")
    for key in fields:
        assert key in cfg, key


def test_auto_model_loads_the_base_model_of_a_saved_causal_lm(saved):
    path, ids, _ = saved
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(base).__name__ == "KimiLinearModel"
    ours = KimiLinearForCausalLM.from_pretrained(path).model
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, ours(ids).last_hidden_state)


def test_tied_embeddings_are_tied_saved_once_and_reloaded_tied(tmp_path):
    """``tie_word_embeddings=True`` (False in every public checkpoint) ties the LM head to the embeddings."""
    model = tiny_model(seed=33, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in _read_safetensors(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_bf16_load_keeps_the_fp32_parameters_and_resaves_them_fp32(saved, tmp_path):
    path, _, _ = saved
    model = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in params.items():
        expected = torch.float32 if name.endswith(FP32_NAMES) or ".gate.weight" in name else torch.bfloat16
        assert tensor.dtype == expected, f"{name}: {tensor.dtype}"
    # The mixed-dtype model (fp32 gate parameters, bf16 activations) runs and stays close to fp32.
    path, ids, logits = saved
    out = _logits(model.eval(), ids)
    assert out.dtype == torch.bfloat16
    assert_close_rel(out.float(), logits, 5e-2, "bf16-loaded logits")
    model.save_pretrained(tmp_path)
    tensors = _read_safetensors(tmp_path)
    assert tensors["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_hand_written_official_checkpoint_loads(tmp_path):
    """A checkpoint laid out as the public ones (official names, bf16 with fp32 A_log/dt_bias, 48B-style
    config.json with the official auto_map), written without our model code."""
    cfg = tiny_config_dict(torch_dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in official_shapes(cfg).items():
        fp32 = name.endswith(("A_log", "dt_bias", "e_score_correction_bias"))
        t = 0.1 * torch.randn(shape, generator=gen)
        tensors[name] = t if fp32 else t.to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    write_config_json(tmp_path, cfg)
    model = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    state = model.state_dict()
    assert sorted(state) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t.float()), name
    assert model.config.layer_types == tiny_config().layer_types
    logits = _logits(model.eval(), random_ids(1, 5))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- native, remote
FOREIGN_SCRIPT = """
import sys
sys.modules["fla"] = None  # fla's Triton kernels fail on CPU: force the native class's torch path
import json, torch
torch.set_num_threads(1)
import transformers
ours, out = sys.argv[1:]
ids = torch.load(ours + "/ids.pt")

# 1. transformers' native class reads our checkpoint.
model = transformers.KimiLinearForCausalLM.from_pretrained(ours).eval()
with torch.no_grad():
    torch.save(model(ids).logits, out + "/native_reads_ours.pt")

# 2. A checkpoint written by the native class itself.
cfg = json.load(open(ours + "/config.json"))
for key in ("auto_map", "architectures", "transformers_version", "_name_or_path"):
    cfg.pop(key, None)
torch.manual_seed(5)
native = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**cfg)).eval()
with torch.no_grad():
    for name, t in list(native.named_parameters()) + list(native.named_buffers()):
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.copy_(1 + 0.2 * torch.randn_like(t))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.05 * torch.randn_like(t))
native.save_pretrained(out + "/native_ckpt")
with torch.no_grad():
    torch.save(native(ids).logits, out + "/native_logits.pt")
print("native ok", type(native).__module__)

# 3. Remote code: the Auto class follows auto_map to the modeling files saved next to the weights.
assert "kimi_hf" not in sys.modules
remote = transformers.AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(remote(ids).logits, out + "/remote_logits.pt")
print("remote ok", type(remote).__module__, type(remote).__name__)
"""


@pytest.fixture(scope="module")
def foreign_run(saved, tmp_path_factory):
    """One fresh interpreter that never imports kimi_hf itself (one start-up instead of two): the native
    class reads our checkpoint and writes one of its own; then remote code loads ours."""
    path, _, _ = saved
    out = tmp_path_factory.mktemp("foreign")
    stdout = run_python(FOREIGN_SCRIPT, str(path), str(out), timeout=300)
    assert "native ok transformers.models.kimi_linear" in stdout
    assert "remote ok transformers_modules." in stdout and stdout.rstrip().endswith("KimiLinearForCausalLM")
    return out


def test_native_transformers_reads_our_checkpoint(saved, foreign_run):
    _, _, logits = saved
    assert_close_rel(torch.load(foreign_run / "native_reads_ours.pt"), logits, 1e-5, "native logits on our checkpoint")


def test_we_read_a_native_checkpoint_and_resave_official_names(saved, foreign_run, tmp_path):
    _, ids, _ = saved
    native_path = foreign_run / "native_ckpt"
    model = KimiLinearForCausalLM.from_pretrained(native_path)
    model.save_pretrained(tmp_path)
    tensors = _read_safetensors(tmp_path)
    assert sorted(tensors) == sorted(official_shapes(tiny_config_dict()))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "kimi_linear" and cfg["linear_attn_config"]["kda_layers"] == [1, 3]
    # The re-saved tensors are the loaded ones: the native names were mapped, not re-initialised.
    again = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, ids), _logits(model.eval(), ids))
    state = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(state[name], t), name


def test_native_checkpoint_gives_the_native_logits_in_ours(saved, foreign_run):
    _, ids, _ = saved
    model = KimiLinearForCausalLM.from_pretrained(foreign_run / "native_ckpt").eval()
    assert_close_rel(_logits(model, ids), torch.load(foreign_run / "native_logits.pt"), 1e-5, "our logits, native ckpt")


def test_base_model_reads_a_native_checkpoint(saved, foreign_run):
    """KimiLinearModel.from_pretrained maps the native class's dense-MLP names too (it left that MLP random)."""
    _, ids, _ = saved
    base = KimiLinearModel.from_pretrained(foreign_run / "native_ckpt").eval()
    full = KimiLinearForCausalLM.from_pretrained(foreign_run / "native_ckpt").eval()
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, full.model(ids).last_hidden_state)


def test_attn_res_classes_save_an_auto_map_of_their_own(tmp_path):
    """The KimiLinearAttnRes* classes (what the Auto classes give for a kimi_linear_attn_res checkpoint) save an
    AutoModel entry whose class takes their config (it named KimiLinearModel, which refuses it)."""
    from transformers import AutoModelForCausalLM

    from kimi_hf import KimiLinearAttnResConfig

    model = AutoModelForCausalLM.from_config(KimiLinearAttnResConfig(**tiny_config_dict(), attn_res_block_size=2))
    assert type(model.model).__name__ == "KimiLinearAttnResModel"
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_kimi_linear.KimiLinearAttnResModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearAttnResForCausalLM"
    assert type(AutoModel.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == "KimiLinearAttnResModel"


def test_remote_code_load_in_a_fresh_process(saved, foreign_run):
    _, _, logits = saved
    assert torch.equal(torch.load(foreign_run / "remote_logits.pt"), logits)


# ---------------------------------------------------------------------------------------------- re-saves, auto_map
def test_resave_writes_the_same_config_json_without_the_loaded_path(saved, tmp_path):
    """save -> load -> save gives the same config.json: the path it was loaded from (``_name_or_path``, a local folder
    here) was written into it, so a published checkpoint named the publisher's directories."""
    path, _, _ = saved
    KimiLinearForCausalLM.from_pretrained(path).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "_name_or_path" not in json.loads(text) and str(path) not in text
    assert text == (path / "config.json").read_text()
    assert (tmp_path / "generation_config.json").read_text() == (path / "generation_config.json").read_text()


def test_base_model_saves_the_causal_lm_entry_and_drops_foreign_ones(tmp_path):
    """A base model whose config came with the official ``auto_map`` (``modeling_kimi.*``, a file not saved here)
    saves entries that name only its own saved files, the causal LM included: the stale one failed to load, and
    without one ``AutoModelForCausalLM(..., trust_remote_code=True)`` fell through to transformers' native class,
    which fails on the remote config."""
    from transformers import AutoModelForCausalLM

    config = KimiLinearModel.config_class.from_dict(tiny_config_dict())
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_kimi.KimiLinearForCausalLM"
    torch.manual_seed(0)
    base = KimiLinearModel(config).eval()
    base.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_kimi_linear.KimiLinearConfig",
        "AutoModel": "modeling_kimi_linear.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi_linear.KimiLinearForCausalLM",
    }
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(lm).__module__.startswith("transformers_modules.") and type(lm).__name__ == "KimiLinearForCausalLM"
    saved_state, loaded_state = base.state_dict(), lm.model.state_dict()
    assert sorted(saved_state) == sorted(loaded_state)
    for name, tensor in saved_state.items():
        assert torch.equal(loaded_state[name], tensor), name


def test_safe_serialization_false_is_refused(tmp_path):
    """transformers 5 writes safetensors only and silently ignored ``safe_serialization=False``: refused by name,
    before anything is written; ``True`` (what is done anyway) is accepted."""
    model = tiny_model(seed=2)
    with pytest.raises(ValueError, match="safe_serialization=False.*safetensors only"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin").exists()
    model.save_pretrained(tmp_path / "safe", safe_serialization=True)
    assert {p.suffix for p in (tmp_path / "safe").iterdir()} == {".json", ".py", ".safetensors"}


def test_saving_into_an_earlier_save_leaves_no_stale_weights(tmp_path):
    """A sharded save into a folder holding a single-file save left that file, which from_pretrained read instead of
    the new shards (the earlier weights); a single-file save over a sharded one left an index naming deleted shards."""

    def assert_loads(model: KimiLinearForCausalLM) -> None:
        loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded[name], tensor), name

    first, second = tiny_model(seed=1), tiny_model(seed=2)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size="30KB")
    weights = sorted(p.name for p in tmp_path.iterdir() if ".safetensors" in p.name)
    assert "model.safetensors" not in weights and "model.safetensors.index.json" in weights and len(weights) > 2
    assert_loads(second)
    first.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if ".safetensors" in p.name) == ["model.safetensors"]
    assert_loads(first)
