"""AttnResForCausalLM: config validation, checkpointing, save/load (incl. remote code), cached generation."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import kimi_hf  # noqa: F401  (registers the Auto classes)
from kimi_hf.models.attn_res import AttnResConfig, AttnResForCausalLM, AttnResModel, register_auto


def _config(**overrides) -> AttnResConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        residual="block",
        attn_res_block_size=4,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return AttnResConfig(**kwargs)


def _model(seed: int = 0, **overrides) -> AttnResForCausalLM:
    torch.manual_seed(seed)
    model = AttnResForCausalLM(_config(**overrides))
    if model.config.residual != "standard":
        with torch.no_grad():  # move off the zero init so that the depth mixing matters
            model.model.attn_res.queries.normal_()
    return model


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"residual": "dense"}, "residual must be one of .* got 'dense'"),
        ({"attn_res_block_size": 0}, "attn_res_block_size .* got 0"),
        ({"attn_res_block_size": 7}, r"attn_res_block_size must be an integer in \[1, 6\].* got 7"),
        ({"num_key_value_heads": 3}, "num_key_value_heads \\(3\\)"),
        ({"hidden_size": -4}, "hidden_size must be a positive integer, got -4"),
        ({"attn_res_backend": "cuda"}, "attn_res_backend .* got 'cuda'"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"attn_res_eps": None}, "attn_res_eps must be a finite number > 0, got None"),
        ({"rope_theta": "1e4"}, "rope_theta must be a finite number > 0, got '1e4'"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a finite number > 0, got 0.0"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number > 0, got inf"),
        ({"attn_res_two_phase": "no"}, "attn_res_two_phase must be True or False, got 'no'"),
        ({"attention_dropout": 1.0}, r"attention_dropout must be a number in \[0, 1\), got 1.0"),
        ({"initializer_range": -0.02}, "initializer_range must be a finite number > 0, got -0.02"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "only the default RoPE is implemented"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "only the default RoPE is implemented"),
        ({"rope_parameters": {"rope_theta": 5e5}, "rope_theta": 1e4}, "rope_theta 10000.0 and rope_parameters'"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),  # the model would have run SiLU
        ({"attn_res_eps": -1.0}, "attn_res_eps must be a finite number > 0, got -1.0"),  # NaN logits
        ({"attn_res_block_size": 100}, r"attn_res_block_size must be an integer in \[1, 6\].* got 100"),
    ],
)
def test_fields_set_after_the_config_checks_are_checked(tmp_path, override, match):
    """``from_pretrained(path, **overrides)`` and attribute assignments set fields after the config's own checks:
    building a model and saving a config check them again (the model was built, or the config written, with the
    bad value)."""
    _model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        AttnResForCausalLM.from_pretrained(tmp_path, **override)
    config = _config()
    for name, value in override.items():
        setattr(config, name, value)
    with pytest.raises(ValueError, match=match):
        AttnResForCausalLM(config)
    with pytest.raises(ValueError, match=match):
        config.save_pretrained(tmp_path / "edited")


def test_block_size_only_checked_in_block_mode():
    assert _config(residual="full", attn_res_block_size=None).num_sublayers == 6


def test_rope_theta_from_rope_parameters(tmp_path):
    """transformers 5 states theta in rope_parameters: the model uses it, and it survives a save/load."""
    config = _config(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert config.rope_theta == 5e5
    model = AttnResForCausalLM(config)
    assert torch.allclose(model.model.rotary_emb.inv_freq, _model(rope_theta=5e5).model.rotary_emb.inv_freq)
    config.save_pretrained(tmp_path)
    assert AttnResConfig.from_pretrained(tmp_path).rope_theta == 5e5
    assert _config().rope_theta == 10000.0


def test_output_attentions_eager_and_refused_elsewhere():
    """Eager attention returns every layer's weights (causal, rows summing to 1, and the same logits as sdpa);
    an implementation that cannot return them is refused, not answered with None."""
    model = _model(residual="block").eval()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        sdpa_logits = model(ids).logits
        with pytest.raises(ValueError, match="output_attentions needs the eager attention.*'sdpa'"):
            model(ids, output_attentions=True)
        model.set_attn_implementation("eager")  # switching at runtime takes effect
        assert model.config._attn_implementation == "eager"
        out = model(ids, output_attentions=True)
    assert_close_rel(out.logits, sdpa_logits, 1e-5, "eager vs sdpa logits")
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, 6, 6)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert weights.triu(1).abs().max() == 0
    generated = model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True,
                               return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    assert all(t is not None for step in generated.attentions for t in step)


@pytest.mark.parametrize("residual", ["standard", "full", "block"])
def test_loss_and_outputs(residual):
    model = _model(residual=residual)
    ids = torch.randint(0, 97, (2, 7))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 7, 97) and torch.isfinite(out.loss)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 97)
    out.loss.backward()
    if residual != "standard":
        assert model.model.attn_res.queries.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layers,block_size", [(2, 3), (6, 4)])
def test_gradient_checkpointing_gives_same_grads(backend, layers, block_size, monkeypatch):
    """Also with blocks of 4 sublayers over 2 and 3 stored sources, whose readers defer their gradients into them on
    the Triton backend (``fused.DeferredGrads``; ``DEFER_MIN_READERS`` lowered to 1 for it), in the re-run forward
    too."""
    from kimi_hf.kernels.attn_res import fused

    monkeypatch.setattr(fused, "DEFER_MIN_READERS", 1)
    model = _model(attn_res_backend=backend, num_hidden_layers=layers, attn_res_block_size=block_size)
    model.train()
    ids = torch.randint(0, 97, (1, 5))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for name, g in plain.items():
        assert_close_rel(checkpointed[name], g, 1e-5, name)


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {}, {"preserve_rng_state": False}])
def test_reentrant_checkpointing_is_refused(kwargs):
    """Reentrant checkpointing would drop the gradients carried by the residual state; torch runs it also when
    ``use_reentrant`` is not given (e.g. ``{}``, peft's ``prepare_model_for_kbit_training`` default): those were let
    through, and only 5 of the 32 parameters got gradients."""
    model = _model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with pytest.raises(ValueError, match="use_reentrant=.* is not supported.*non-reentrant"):
        model(torch.randint(0, 97, (1, 4)))


def _greedy_cached_and_recomputed(
    model: AttnResForCausalLM, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations ``[B, T + new_tokens]`` of ``prompt [B, T]``: by ``generate`` with the cache, and by
    recomputing the whole sequence for each token."""
    # No end-of-sequence token: a random model that draws it would have generate() pad the rest of its row (seen on
    # the H200: token 2 then the pad 0), while the recomputation goes on.
    model.generation_config.eos_token_id = None
    generated = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return generated, ids


def test_cached_greedy_generation_equals_recompute():
    model = _model(residual="block", attn_res_block_size=4).eval()
    generated, recomputed = _greedy_cached_and_recomputed(model, torch.randint(3, 97, (2, 5)), 5)
    assert torch.equal(generated, recomputed)


def test_save_load_round_trip(tmp_path):
    register_auto()
    model = _model().eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert {"modeling_attn_res.py", "configuration_attn_res.py"} <= files
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is AttnResForCausalLM and loaded.config.residual == "block"
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert_close_rel(loaded(ids).logits, model(ids).logits, 1e-6, "logits after reload")


def test_device_map_auto_keeps_the_decoder_on_one_device():
    """Every layer reads the residual state of the earlier ones: device_map="auto" must not split the decoder over
    GPUs (it put the embeddings on GPU 0 and the layers on GPU 1, and the state would not follow them)."""
    from transformers.integrations.accelerate import infer_auto_device_map

    model = _model()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model, max_memory={0: size // 2, 1: size, "cpu": size}, no_split_module_classes=model._no_split_modules
    )
    assert device_map["model"] == 1 and not any(key.startswith("model.") for key in device_map), device_map


@pytest.mark.parametrize(
    "offloaded,weight", [("model.layers.1", "layers.1.input_layernorm.weight"), ("model.attn_res", "attn_res.queries")]
)
def test_offloaded_weights_are_refused_clearly(tmp_path, offloaded, weight):
    """The fused PreNorms and the AttnRes parameters are read outside their modules' forward, so accelerate's
    offload hooks never load them: a clear error naming the weight (it was a meta-device error deep in a kernel)."""
    _model().save_pretrained(tmp_path / "model")
    layers = [f"model.layers.{i}" for i in range(3)]
    modules = ["model.embed_tokens", *layers, "model.attn_res", "model.norm", "lm_head"]
    device_map = {name: "disk" if name == offloaded else "cpu" for name in modules}
    model = AttnResForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "o")
    with pytest.raises(ValueError, match=rf"{weight} is on the meta device \(offloaded by device_map\)"):
        model(torch.randint(0, 97, (1, 4)))


def test_placement_is_checked_once_per_device():
    """The placement check walks 2L+3 weights (tens of microseconds of a decode step's host time): once per device,
    again after the model is moved or cast."""
    model = _model()
    ids = torch.randint(0, 97, (1, 4))
    model(ids)
    assert model.model._placement_checked_on == torch.device("cpu")
    model.to(torch.float64)
    assert model.model._placement_checked_on is None
    model(ids)
    assert model.model._placement_checked_on == torch.device("cpu")


def test_saved_base_model_names_its_causal_lm_in_auto_map(tmp_path):
    """A saved AttnResModel lists the causal LM too (transformers writes only the saved class's entry), as a saved
    AttnResForCausalLM lists the base model, and an inherited entry for another class is not carried over."""
    register_auto()
    config = _config()
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_other.OtherForSequenceClassification"}
    AttnResModel(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_attn_res.AttnResConfig",
        "AutoModel": "modeling_attn_res.AttnResModel",
        "AutoModelForCausalLM": "modeling_attn_res.AttnResForCausalLM",
    }


def test_remote_code_load_in_fresh_process(tmp_path):
    register_auto()
    model = _model().eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers import AutoModel
        # AutoModel first: before any remote code has imported (and registered) kimi_hf, only auto_map leads to it
        base = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        assert type(base).__name__ == "AttnResModel", type(base)
        # (the remote code imported kimi_hf, whose registered class transformers may now take: the same code)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(model).__name__ == "AttnResForCausalLM", type(model)
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            err = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
            hidden = base(ref["ids"]).last_hidden_state - model.model(ref["ids"]).last_hidden_state
            err = max(err, hidden.abs().max().item())
        print("MAXERR", err)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("MAXERR")[-1])
    assert err < 1e-6, err


@pytest.mark.gpu
def test_gpu_triton_backend_matches_torch_backend_bf16():
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        model = _model(attn_res_backend=backend, hidden_size=256, num_attention_heads=4).cuda().to(torch.bfloat16)
        model.train()
        with torch.no_grad():  # O(1) scores: bf16 rounding of the torch path's scores stays small
            model.model.attn_res.queries.mul_(0.05)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach().float(), model.model.attn_res.queries.grad.float())
        if backend == "triton":
            model.zero_grad()
            model.gradient_checkpointing_enable()
            model(ids, labels=ids).loss.backward()
            assert_close_rel(model.model.attn_res.queries.grad, results["triton"][1], 1e-2, "checkpointed grads")
    assert_close_rel(results["triton"][0], results["torch"][0], 1e-2, "loss")
    assert_close_rel(results["triton"][1], results["torch"][1], 5e-2, "pseudo-query grads")


@pytest.mark.gpu
@pytest.mark.parametrize("residual", ["block", "standard"])
def test_gpu_two_phase_and_cached_generation_fp32(residual):
    """The inference path (Block: two-phase with the additions in its reads; standard: addition fused into the
    PreNorm) against the eager one, then cached greedy generation against recomputation."""
    model = _model(residual=residual, attn_res_backend="triton", hidden_size=128).cuda().eval()
    ids = torch.randint(3, 97, (2, 9), device="cuda")
    with torch.no_grad():
        two_phase = model(ids).logits
        model.model.attn_res.two_phase = False
        one_pass = model(ids).logits
        model.model.attn_res.two_phase = True
    assert_close_rel(two_phase, one_pass, 1e-5, "two-phase vs one-pass logits")
    generated, recomputed = _greedy_cached_and_recomputed(model, ids, 8)
    assert torch.equal(generated, recomputed)


@pytest.mark.gpu
def test_gpu_standard_residual_triton_prenorm_matches_torch_bf16():
    """The standard residual's Triton PreNorm (the benchmark's baseline) trains like the eager one."""
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        model = _model(residual="standard", attn_res_backend=backend, hidden_size=256, num_attention_heads=4)
        model = model.cuda().to(torch.bfloat16)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = (model.model.embed_tokens.weight.grad, model.model.layers[0].input_layernorm.weight.grad)
        results[backend] = (loss.detach().float(), *(g.float() for g in grads))
    # bf16: the eager norm rounds its intermediate gradients to bf16, the kernel keeps them in fp32
    for a, e, name, rtol in zip(results["triton"], results["torch"], ("loss", "d_embedding", "d_norm_weight"),
                                (1e-2, 5e-2, 5e-2)):  # fmt: skip
        assert_close_rel(a, e, rtol, name)


def _varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, position_ids=None, **kwargs):
    """A flash-attention-like implementation on the CPU: no mask, packed sequences found from ``position_ids``
    [1, T] (each restart at 0 begins one), as transformers' flash attention does; plain causal without them.
    query [B, H, T, Dh], key/value [B, Hkv, T, Dh] -> output [B, T, H, Dh], no weights."""
    starts = [0, query.shape[2]]
    if position_ids is not None:
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()[1:]
        starts = [0, *starts, query.shape[2]]
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=True
            )
            for a, b in zip(starts[:-1], starts[1:])
        ],
        dim=2,
    )
    return out.transpose(1, 2), None


def test_position_ids_reach_the_attention_implementation(monkeypatch):
    """Padding-free packing (``DataCollatorWithFlattening``: one row, position_ids restarting at 0, no mask) with a
    flash-attention-like implementation, which finds the sequences from ``position_ids`` (its mask is None): each
    sequence's logits are its own, as for Llama (the position ids were not passed on: the sequences attended
    across their boundary)."""
    monkeypatch.setitem(AttentionInterface._global_mapping, "varlen_test", _varlen_attention)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "varlen_test", flash_attention_mask)
    model = _model()
    model.set_attn_implementation("varlen_test")
    first, second = torch.randint(3, 97, (1, 5)), torch.randint(3, 97, (1, 4))
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        packed = model(torch.cat([first, second], dim=1), position_ids=position_ids, use_cache=False).logits
        apart = torch.cat([model(first).logits, model(second).logits], dim=1)
    assert_close_rel(packed, apart, 1e-5, "packed vs separate sequences")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [False, True])
def test_packed_sequences_are_separate_with_the_default_cache_setting(implementation, training):
    """Padding-free packing (one row, position_ids restarting at 0, no mask) with use_cache left to the config:
    transformers' masks separate packed sequences only without a cache, so none is made (the default cache let the
    sequences attend across their boundary: wrong logits and loss in training and evaluation alike); asking for a
    cache with packed sequences is an error, as in Kimi Linear."""
    model = _model(attn_implementation=implementation).train(training)
    first, second = torch.randint(3, 97, (1, 5)), torch.randint(3, 97, (1, 4))
    packed, position_ids = torch.cat([first, second], dim=1), torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        apart = torch.cat([model(first).logits, model(second).logits], dim=1)
    out = model(packed, position_ids=position_ids)
    assert_close_rel(out.logits, apart, 1e-5, "packed vs separate sequences")
    assert len(out.to_tuple()) == 1, "no cache returned: only the logits"
    with pytest.raises(ValueError, match="packed sequences .* cannot fill a cache"):
        model(packed, position_ids=position_ids, use_cache=True)


def test_trainer_label_smoothing_shifts_the_labels(tmp_path):
    """The Trainer shifts the labels for its label smoother only for class names in transformers' causal-LM table:
    without an entry there, our causal LMs were smoothed against unshifted labels (each token trained towards itself).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    model = _model()
    args = TrainingArguments(tmp_path, label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    ids = torch.randint(0, 97, (2, 6))
    loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids})
    logits = model(input_ids=ids).logits
    expected = LabelSmoother(epsilon=0.1)({"logits": logits}, ids, shift_labels=True)
    assert_close_rel(loss, expected, 1e-6, "smoothed loss")
