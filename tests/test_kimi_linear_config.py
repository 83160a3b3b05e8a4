"""KimiLinearConfig: the official 48B config.json, the tiny scaled-down copy, validation, native-style configs."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from kimi_linear_utils import (  # noqa: F401 (single_thread: autouse fixture)
    OFFICIAL_48B_CONFIG,
    OFFICIAL_48B_MLA_LAYERS,
    random_ids,
    single_thread,
    tiny_config,
    tiny_config_dict,
)

from kimi_hf import KimiLinearConfig, KimiLinearForCausalLM


def _official(**overrides) -> KimiLinearConfig:
    cfg = copy.deepcopy(OFFICIAL_48B_CONFIG)
    cfg.update(overrides)
    return KimiLinearConfig(**cfg)


def test_official_48b_config_parses():
    config = _official()
    assert config.model_type == "kimi_linear"
    assert config.vocab_size == 163840 and config.hidden_size == 2304 and config.num_hidden_layers == 27
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (163584, 163586, 163839)
    assert config.layer_types == [
        "full_attention" if i in OFFICIAL_48B_MLA_LAYERS else "linear_attention" for i in range(27)
    ]
    assert config.full_attn_layers == OFFICIAL_48B_MLA_LAYERS
    assert config.kda_layers == [i for i in range(27) if i not in OFFICIAL_48B_MLA_LAYERS]
    assert (config.linear_num_heads, config.linear_head_dim, config.linear_conv_kernel_size) == (32, 128, 4)
    assert config.qk_head_dim == 192
    assert [config.is_moe_layer(i) for i in range(27)] == [False] + [True] * 26
    # attribute_map aliases used by generic transformers code
    assert config.num_experts_per_tok == 8 and config.num_local_experts == 256
    assert config.max_position_embeddings == 1048576


def test_official_config_round_trip_keeps_the_official_layout():
    config = _official()
    out = config.to_dict()
    assert out["model_type"] == "kimi_linear"
    lac = out["linear_attn_config"]
    assert lac["full_attn_layers"] == [4, 8, 12, 16, 20, 24, 27]
    assert lac["kda_layers"] == OFFICIAL_48B_CONFIG["linear_attn_config"]["kda_layers"]
    assert (lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]) == (32, 128, 4)
    for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim", "mla_use_nope", "num_experts", "num_experts_per_token", "num_shared_experts",
        "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq", "moe_router_activation_func",
        "moe_renormalize", "routed_scaling_factor", "use_grouped_topk", "num_expert_group", "topk_group",
        "bos_token_id", "eos_token_id", "pad_token_id", "model_max_length", "tie_word_embeddings",
    ):  # fmt: skip
        assert out[key] == OFFICIAL_48B_CONFIG[key], key
    # No derived (native-style, 0-indexed) views written next to the official fields.
    assert "layer_types" not in out and "mlp_layer_types" not in out
    again = KimiLinearConfig.from_dict(out)
    assert again.layer_types == config.layer_types
    assert again.to_dict()["linear_attn_config"] == lac


def test_config_does_not_alias_the_callers_linear_attn_config():
    raw = copy.deepcopy(OFFICIAL_48B_CONFIG)
    config = KimiLinearConfig(**raw)
    raw["linear_attn_config"]["kda_layers"].append(4)
    raw["linear_attn_config"]["full_attn_layers"].remove(4)
    assert config.full_attn_layers == OFFICIAL_48B_MLA_LAYERS
    assert 4 not in config.linear_attn_config["kda_layers"]


def test_tiny_copy_of_the_official_structure_builds_and_runs():
    config = tiny_config()
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(config).eval()
    layers = model.model.layers
    assert [type(layer.self_attn).__name__ for layer in layers] == [
        "KimiDeltaAttention", "KimiMLAAttention", "KimiDeltaAttention", "KimiMLAAttention"
    ]  # fmt: skip
    assert hasattr(layers[0], "mlp") and not hasattr(layers[0], "block_sparse_moe")
    assert all(hasattr(layer, "block_sparse_moe") and not hasattr(layer, "mlp") for layer in layers[1:])
    with torch.no_grad():
        logits = model(random_ids(2, 7)).logits
    assert logits.shape == (2, 7, config.vocab_size) and torch.isfinite(logits).all()


def test_moe_layer_frequency():
    config = tiny_config(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    assert [config.is_moe_layer(i) for i in range(4)] == [False, False, True, False]


def _lac(**changes):
    lac = dict(tiny_config_dict()["linear_attn_config"])
    lac.update(changes)
    return lac


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"linear_attn_config": _lac(kda_layers=[1, 2, 3])}, ["2", "kda_layers", "full_attn_layers"]),
        ({"linear_attn_config": _lac(kda_layers=[1])}, ["[3]", "neither"]),
        ({"linear_attn_config": _lac(kda_layers=[0, 1, 3])}, ["0", "kda_layers"]),
        ({"linear_attn_config": _lac(full_attn_layers=[2, 4, 5])}, ["5", "full_attn_layers"]),
        ({"linear_attn_config": _lac(num_heads=0)}, ["num_heads", "0"]),
        ({"hidden_size": 0}, ["hidden_size", "0"]),
        ({"num_experts": -4}, ["num_experts", "-4"]),
        ({"kv_lora_rank": 0}, ["kv_lora_rank", "0"]),
        ({"num_experts_per_token": 5}, ["num_experts_per_token", "5", "4"]),
        ({"moe_router_activation_func": "relu"}, ["moe_router_activation_func", "relu"]),
        ({"num_key_value_heads": 1}, ["num_key_value_heads", "1"]),
        ({"num_expert_group": 2, "topk_group": 3}, ["topk_group", "3"]),
        ({"num_expert_group": 3, "topk_group": 1}, ["num_experts", "num_expert_group", "3"]),
        ({"mla_use_nope": False}, ["mla_use_nope"]),
        ({"residual": "dense"}, ["residual", "dense"]),
        ({"residual": "block", "attn_res_block_size": 0}, ["attn_res_block_size", "0"]),
        ({"residual": "block", "attn_res_block_size": 9}, ["attn_res_block_size", "9"]),
        ({"router_bias_update_rate": -0.1}, ["router_bias_update_rate", "-0.1"]),
        ({"router_bias_update_rate": float("nan")}, ["router_bias_update_rate", "nan"]),
        ({"hidden_act": "swish_x"}, ["hidden_act", "swish_x", "silu"]),
        # the 48B model's eos id kept with a small vocabulary: generate never stopped (pad and bos were refused)
        ({"eos_token_id": 163586}, ["eos_token_id", "163586", "vocab_size=64"]),
        ({"eos_token_id": [2, 64]}, ["eos_token_id", "[2, 64]"]),
        # NaN gave NaN logits, a string an unrelated TypeError in the first MoE forward
        ({"routed_scaling_factor": float("nan")}, ["routed_scaling_factor", "nan"]),
        ({"routed_scaling_factor": "2.446"}, ["routed_scaling_factor", "'2.446'"]),
        # these failed with TypeErrors naming no field ("... is not iterable")
        ({"linear_attn_config": [1, 3]}, ["linear_attn_config must be a dict", "[1, 3]"]),
        ({"linear_attn_config": _lac(kda_layers=None)}, ["'kda_layers'", "must be a list", "None"]),
        ({"num_hidden_layers": "4"}, ["num_hidden_layers", "'4'"]),
        # no rotary embedding anywhere: the scaling was accepted and did nothing
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_scaling", "'linear'", "no rotary"]),
        ({"moe_layer_freq": 0}, ["moe_layer_freq", "0"]),  # a ZeroDivisionError while laying out the MoE layers
    ],
    ids=[
        "overlapping-layers", "missing-layer", "layer-0", "layer-n+1", "kda-heads", "hidden", "experts", "kv-lora",
        "topk>experts", "router-fn", "kv-heads", "topk_group>groups", "experts%groups", "rotary-mla",
        "residual-mode", "block-size-0", "block-size>sublayers", "bias-rate", "bias-rate-nan", "activation",
        "eos-outside-vocab", "eos-list-outside-vocab", "routed-scaling-nan", "routed-scaling-str", "lac-not-dict",
        "kda-layers-none", "layers-str", "rope-scaling", "moe-freq-0",
    ],
)  # fmt: skip
def test_validation_errors_name_field_and_value(overrides, words):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_valid_grouped_topk_and_block_residual_are_accepted():
    config = tiny_config(num_experts=8, num_expert_group=4, topk_group=2, num_experts_per_token=3)
    assert config.num_expert_group == 4
    config = tiny_config(residual="block", attn_res_block_size=8)
    assert config.to_dict()["model_type"] == "kimi_linear_attn_res"
    assert tiny_config(eos_token_id=[2, 3]).eos_token_id == [2, 3]  # several end tokens, each in the vocabulary
    assert tiny_config(rope_scaling={"rope_type": "default"}).to_dict()["rope_parameters"]["rope_type"] == "default"


def _native_style(**changes) -> dict:
    """The tiny config as transformers' native ``kimi_linear`` writes it: derived views next to the fields."""
    cfg = tiny_config_dict()
    for key in ("architectures", "auto_map", "model_type", "torch_dtype"):
        cfg.pop(key)
    cfg.pop("linear_attn_config")
    cfg.update(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        linear_num_heads=2,
        linear_head_dim=16,
        linear_conv_kernel_dim=4,
        qk_head_dim=12,
    )
    cfg.update(changes)
    return cfg


def test_native_style_config_parses_into_the_official_layout():
    config = KimiLinearConfig(**_native_style())
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    lac = config.to_dict()["linear_attn_config"]
    assert lac["kda_layers"] == [1, 3] and lac["full_attn_layers"] == [2, 4]
    assert (lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]) == (2, 16, 4)


def test_native_style_config_written_by_transformers_parses():
    from transformers import KimiLinearConfig as NativeConfig

    native = NativeConfig(**{k: v for k, v in tiny_config_dict().items() if k not in ("auto_map", "architectures")})
    config = KimiLinearConfig.from_dict(native.to_dict())
    assert config.layer_types == tiny_config().layer_types
    assert config.linear_attn_config["kda_layers"] == [1, 3]
    assert (config.linear_num_heads, config.linear_head_dim) == (2, 16)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"mlp_layer_types": ["sparse", "sparse", "sparse", "sparse"]}, "mlp_layer_types"),
        ({"linear_num_heads": 4, "linear_attn_config": _lac()}, "linear_num_heads"),
        ({"qk_head_dim": 16}, "qk_head_dim"),
        ({"layer_types": ["linear_attention", "full_attention", "linear_attention", "mamba"]}, "layer_types"),
        ({"layer_types": ["full_attention"] * 4, "linear_attn_config": _lac()}, "layer_types"),
    ],
    ids=["mlp-types", "linear-heads", "qk-head-dim", "unknown-layer-type", "layer-types-vs-official"],
)
def test_contradictory_native_style_config_raises(changes, field):
    with pytest.raises(ValueError, match=field):
        KimiLinearConfig(**_native_style(**changes))


def test_auto_registration_leaves_the_native_kimi_linear_alone():
    """Importing kimi_hf registers our own model types; `kimi_linear` stays transformers' native class."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import kimi_hf

    assert CONFIG_MAPPING["kimi_linear"].__module__.startswith("transformers.")
    assert CONFIG_MAPPING["kimi_linear_attn_res"] is kimi_hf.KimiLinearAttnResConfig
    assert CONFIG_MAPPING["kimi_attn_res"] is kimi_hf.AttnResConfig
    assert MODEL_FOR_CAUSAL_LM_MAPPING[kimi_hf.KimiLinearAttnResConfig] is kimi_hf.KimiLinearAttnResForCausalLM
    assert MODEL_FOR_CAUSAL_LM_MAPPING[kimi_hf.AttnResConfig] is kimi_hf.AttnResForCausalLM
    config = AutoConfig.for_model("kimi_linear_attn_res", num_hidden_layers=2, hidden_size=64, vocab_size=64,
                                  intermediate_size=64, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=8, v_head_dim=8, num_experts=4, num_experts_per_token=2,
                                  moe_intermediate_size=16, attn_res_block_size=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2,
                                  linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2,
                                                      "head_dim": 16})  # fmt: skip
    assert type(AutoModelForCausalLM.from_config(config)) is kimi_hf.KimiLinearAttnResForCausalLM
    # our KimiLinearConfig shares the native one's class name: the Auto classes must still build ours from it
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is kimi_hf.KimiLinearForCausalLM
    assert type(AutoModel.from_config(tiny_config())) is kimi_hf.KimiLinearModel


def test_special_token_ids_must_fit_the_vocabulary():
    with pytest.raises(ValueError, match="pad_token_id must be None or in \\[0, vocab_size=64\\), got 163839"):
        KimiLinearConfig(vocab_size=64, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="give pad_token_id, bos_token_id and eos_token_id with a smaller vocab"):
        KimiLinearConfig(vocab_size=32000)


def test_the_readmes_small_config_builds():
    """README.md's "small one from scratch" (it failed as written until session 21: the 48B vocabulary's ids)."""
    config = KimiLinearConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=256,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 4, "head_dim": 128},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert 50e6 < sum(p.numel() for p in model.parameters()) < 60e6


def test_native_spellings_and_the_mlp_layer_types_native_reads():
    """The native config's norm_topk_prob / n_group mean ours (they were ignored); with moe_layer_freq != 1,
    mlp_layer_types is written, since the native class reads it and ignores moe_layer_freq (it built other layers
    from a checkpoint of ours)."""
    config = tiny_config(norm_topk_prob=False, n_group=2, topk_group=1, use_grouped_topk=True)
    assert config.moe_renormalize is False and config.num_expert_group == 2
    sparse_every_other = tiny_config(moe_layer_freq=2)
    written = sparse_every_other.to_dict()["mlp_layer_types"]
    assert written == sparse_every_other.mlp_layer_types and written.count("sparse") < len(written) - 1
    native = pytest.importorskip("transformers").KimiLinearConfig
    fields = {k: v for k, v in sparse_every_other.to_dict().items() if k not in ("auto_map", "architectures")}
    assert list(native(**fields).mlp_layer_types) == written


@pytest.mark.parametrize(
    "override, match",
    [
        ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a finite number > 0"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be a finite number > 0"),
        ({"hidden_act": "no_such_act"}, "hidden_act"),
    ],
)
def test_fields_set_after_the_config_checks_are_checked(tmp_path, override, match):
    """``from_pretrained(path, **overrides)`` and attribute assignments set fields after the config's own checks:
    building a model and saving a config check them again (rms_norm_eps=-1 loaded and gave NaN logits)."""
    KimiLinearForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        KimiLinearForCausalLM.from_pretrained(tmp_path, **override)
    config = tiny_config()
    for name, value in override.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=match):
        KimiLinearForCausalLM(config)
    with pytest.raises(ValueError, match=match):
        config.save_pretrained(tmp_path / "edited")


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func='softmax'"),
        ({"num_experts": 8, "num_expert_group": 4, "topk_group": 2, "use_grouped_topk": False},
         "use_grouped_topk=False with num_expert_group=4"),
        ({"num_experts_per_token": 1}, "num_experts_per_token=1 with moe_renormalize=True"),
    ],
)  # fmt: skip
def test_saving_routing_the_native_class_ignores_warns(tmp_path, changes, named):
    """transformers' native class always routes by sigmoid scores in num_expert_group groups: it loads these
    kimi_linear checkpoints silently, with other logits. Saving names the option (AttnRes checkpoints, of their own
    model type, and the official routing do not warn)."""
    with pytest.warns(UserWarning, match=rf"saving a kimi_linear checkpoint with {re.escape(named)}: transformers"):
        tiny_config(**changes).save_pretrained(tmp_path / "ignored")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_config().save_pretrained(tmp_path / "official")
        tiny_config(residual="block", attn_res_block_size=8, **changes).save_pretrained(tmp_path / "attn_res")
