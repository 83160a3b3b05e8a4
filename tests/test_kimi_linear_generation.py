"""Generation with KimiLinearCache: cached vs uncached generate(), left-padded batches, the cache's
contents (compressed MLA latent, KDA states) and step-by-step decoding against the full forward; the same
for KimiLinearStaticCache's eager path (its CUDA graphs are tested in test_kimi_linear_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from helpers import assert_close_rel
from kimi_linear_utils import random_ids, single_thread, tiny_model  # noqa: F401 (single_thread: autouse fixture)

from kimi_hf import KimiLinearCache, KimiLinearStaticCache
from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=21)
    # No early stop: every run makes NEW_TOKENS tokens, so that runs can be compared token for token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def _generate(model, ids, use_cache, seed=0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=use_cache, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 0, "temperature": 1.0},
        {"do_sample": True, "num_return_sequences": 3},
        {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
    ],
    ids=["greedy", "sampling", "num_return_sequences", "beam-search"],
)
def test_cached_generate_equals_uncached(model, kwargs):
    ids = random_ids(2, 7, seed=1)
    cached = _generate(model, ids, True, **kwargs)
    uncached = _generate(model, ids, False, **kwargs)
    rows = 2 * kwargs.get("num_return_sequences", 1)
    assert cached.shape == (rows, 7 + NEW_TOKENS)
    assert torch.equal(cached, uncached)
    static = _generate(model, ids, True, **{CACHE_FIELD: KimiLinearStaticCache(model.config, 7 + NEW_TOKENS)}, **kwargs)
    assert torch.equal(static, cached)


def test_generate_returns_the_hidden_states_of_every_step(model):
    """``output_hidden_states`` reaches the model through generate(): one tuple per step (the prompt, then one
    token each), every layer's input and the final norm's output, equal to the full forward's."""
    ids = random_ids(2, 7, seed=3)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_hidden_states=True)  # fmt: skip
        full = model(out.sequences[:, :-1], output_hidden_states=True).hidden_states
    assert len(out.hidden_states) == 3
    assert [step[0].shape[1] for step in out.hidden_states] == [7, 1, 1]
    for step, states in enumerate(out.hidden_states):
        assert len(states) == model.config.num_hidden_layers + 1
        span = slice(0, 7) if step == 0 else slice(6 + step, 7 + step)
        for layer, (got, ref) in enumerate(zip(states, full)):
            assert_close_rel(got, ref[:, span], 1e-5, f"step {step} layer {layer}")


def test_left_padded_batch_generates_each_row_as_alone(model):
    lengths = (9, 4, 6)
    seqs = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    total = max(lengths)
    ids = torch.full((len(seqs), total), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, total - len(s) :] = s
        mask[row, total - len(s) :] = 1
    for use_cache in (True, False, "static"):
        static = {CACHE_FIELD: KimiLinearStaticCache(model.config, total + NEW_TOKENS)} if use_cache == "static" else {}
        batched = _generate(model, ids, bool(use_cache), attention_mask=mask, do_sample=False, **static)
        for row, s in enumerate(seqs):
            alone = _generate(model, s[None], True, do_sample=False)
            assert torch.equal(batched[row, total:], alone[0, len(s) :]), f"row {row} (use_cache={use_cache})"


def test_cache_holds_the_compressed_latent_and_kda_states(model):
    cfg = model.config
    ids = random_ids(3, 5, seed=2)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        assert isinstance(cache, KimiLinearCache)
        assert cache.get_seq_length() == 5
        out = model(random_ids(3, 1, seed=3), use_cache=True, **{CACHE_FIELD: cache})
    assert getattr(out, CACHE_FIELD) is cache and cache.get_seq_length() == 6
    inner = cfg.linear_num_heads * cfg.linear_head_dim
    for i, kind in enumerate(cfg.layer_types):
        if kind == "full_attention":
            assert tuple(cache.latents[i].shape) == (3, 6, cfg.kv_lora_rank)
            assert tuple(cache.rope_keys[i].shape) == (3, 6, cfg.qk_rope_head_dim)
            assert cache.conv_states[i] is None and cache.recurrent_states[i] is None
        else:
            assert [tuple(s.shape) for s in cache.conv_states[i]] == [(3, inner, cfg.linear_conv_kernel_size)] * 3
            state = cache.recurrent_states[i]
            assert tuple(state.shape) == (3, cfg.linear_num_heads, cfg.linear_head_dim, cfg.linear_head_dim)
            assert state.dtype == torch.float32
            assert cache.latents[i] is None


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "ones-mask"])
@pytest.mark.parametrize(
    "chunks", [(5, 1, 1, 1, 1, 1), (1,) * 8, (5, 4, 1, 3)], ids=["prefill+steps", "steps", "chunks"]
)
def test_decoding_with_the_cache_matches_the_full_forward(model, chunks, with_mask, static):
    """ "chunks" feeds several tokens at once after a cache (chunked prefill, assisted decoding): the MLA
    layers must then align the causal mask to the end of the keys (the static cache: to its positions)."""
    ids = random_ids(2, sum(chunks), seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = KimiLinearStaticCache(model.config, max_cache_len=sum(chunks) + 3) if static else None
        pieces, start = [], 0
        for n in chunks:
            mask = {"attention_mask": torch.ones(2, start + n, dtype=torch.long)} if with_mask else {}
            out = model(ids[:, start : start + n], use_cache=True, **mask, **{CACHE_FIELD: cache})
            cache = getattr(out, CACHE_FIELD)
            pieces.append(out.logits)
            start += n
    assert_close_rel(torch.cat(pieces, dim=1), full, 1e-5, f"cached logits, chunks {chunks}")


def test_decode_steps_on_the_triton_kernels_match_the_full_forward(model, monkeypatch):
    """The decode path CUDA takes, run on CPU under Triton's interpreter (fp32): the MoE's one-launch routing with the
    shared expert riding the decode experts, the grouped conv update, the KDA decode kernel taking beta logits, the
    MLA latent norm's kernel; against the torch path's full forward."""
    from kimi_hf.models.kimi_linear.modeling_kimi_linear import KimiLinearSparseMoE

    ids = random_ids(2, 8, seed=9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        monkeypatch.setattr(KimiLinearSparseMoE, "_use_decode_experts", lambda self, x: x.shape[0] <= 64)
        monkeypatch.setenv("KIMI_HF_KERNEL_BACKEND", "triton")
        out = model(ids[:, :5], use_cache=True)
        pieces, cache = [out.logits], getattr(out, CACHE_FIELD)
        for t in range(5, 8):
            out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache})
            pieces.append(out.logits)
    assert_close_rel(torch.cat(pieces, dim=1), full, 1e-5, "logits of the Triton decode steps")


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_padded_decoding_with_the_cache_matches_the_full_forward(model, static):
    ids = random_ids(2, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    cache = {CACHE_FIELD: KimiLinearStaticCache(model.config, max_cache_len=16)} if static else {}
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True, **cache)
        pieces, cache = [out.logits], getattr(out, CACHE_FIELD)
        for t in range(6, 10):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **{CACHE_FIELD: cache})
            pieces.append(out.logits)
    steps = torch.cat(pieces, dim=1)
    assert_close_rel(steps[0], full[0], 1e-5, "unpadded row")
    assert_close_rel(steps[1, 4:], full[1, 4:], 1e-5, "padded row, real tokens")


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_latent_space_attention_of_decode_steps_equals_the_expanded_form(model, chunk, static, monkeypatch):
    """Decode-sized steps over a long cache attend with the up-projections absorbed (forced here from 1 cached
    position): the logits equal the full forward's, with left padding in one row and steps of one or three tokens
    (an explicit causal mask across the folded heads), with the growing and the static cache; a spy checks that the
    latent path ran."""
    from kimi_hf.models.kimi_linear import modeling_kimi_linear as modeling

    monkeypatch.setattr(modeling, "MLA_ABSORB_MIN_KEYS", 1)
    calls = []
    latent_attention = modeling.KimiMLAAttention._latent_attention
    monkeypatch.setattr(modeling.KimiMLAAttention, "_latent_attention",
                        lambda self, *a: calls.append(1) or latent_attention(self, *a))  # fmt: skip
    ids = random_ids(2, 12, seed=15)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = {CACHE_FIELD: KimiLinearStaticCache(model.config, max_cache_len=16)} if static else {}
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True, **cache)
        pieces, cache = [out.logits], getattr(out, CACHE_FIELD)
        for t in range(6, 12, chunk):
            out = model(ids[:, t : t + chunk], attention_mask=mask[:, : t + chunk], use_cache=True,
                        **{CACHE_FIELD: cache})  # fmt: skip
            pieces.append(out.logits)
    assert calls, "the latent-space path did not run"
    steps = torch.cat(pieces, dim=1)
    assert_close_rel(steps[0], full[0], 1e-5, "unpadded row")
    assert_close_rel(steps[1, 3:], full[1, 3:], 1e-5, "padded row, real tokens")


def test_generate_from_inputs_embeds_equals_generate_from_ids(model):
    """With ``inputs_embeds`` the prompt never enters ``input_ids`` (which then holds only the generated
    tokens), so the tokens to feed cannot be found by slicing ``input_ids`` at the cache length."""
    ids = random_ids(2, 6, seed=6)
    mask = torch.ones_like(ids)
    from_ids = _generate(model, ids, True, attention_mask=mask, do_sample=False)
    embeds = model.get_input_embeddings()(ids)
    torch.manual_seed(0)
    with torch.no_grad():
        from_embeds = model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )  # fmt: skip
    assert torch.equal(from_embeds[:, -NEW_TOKENS:], from_ids[:, -NEW_TOKENS:])


def test_cached_step_with_autograd_on_matches_the_full_forward_and_backpropagates(model):
    """Outside torch.no_grad a one-token step with a cache takes the differentiable chunked path."""
    ids = random_ids(2, 10, seed=5)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = getattr(model(ids[:, :9], use_cache=True), CACHE_FIELD)
    step = model(ids[:, 9:], use_cache=True, **{CACHE_FIELD: cache}).logits[:, -1]
    assert_close_rel(step, full, 1e-5, "cached step with autograd on")
    step.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_static_cache_is_reused_after_reset_and_keeps_its_buffers(model):
    ids = random_ids(2, 5, seed=7)
    expected = _generate(model, ids, True, do_sample=False)
    cache = KimiLinearStaticCache(model.config, max_cache_len=5 + NEW_TOKENS)
    first = _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})

    def addresses():
        tensors = [cache.key_mask, *cache.recurrent_states, *cache.latents]
        return [t.data_ptr() for t in tensors if t is not None]

    buffers = addresses()
    cache.reset()
    second = _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert addresses() == buffers
    # A new batch size after reset() re-allocates; without reset() it is refused.
    cache.reset()
    third = _generate(model, ids[:1], True, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(third, expected[:1]) and cache.key_mask.shape[0] == 1
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad():
        model(ids[:, :1], use_cache=True, **{CACHE_FIELD: cache})


def test_static_cache_follows_the_models_dtype_after_reset():
    """``reset()`` then ``model.to(torch.bfloat16)``: the empty cache re-allocates its buffers in the new dtype (as
    for a new batch size or device) and decodes as a fresh cache does; a filled one refuses the new dtype."""
    model = tiny_model(seed=22)
    model.generation_config.eos_token_id = None
    ids = random_ids(1, 5, seed=23)
    cache = KimiLinearStaticCache(model.config, max_cache_len=5 + NEW_TOKENS)
    _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})
    cache.reset()
    model.to(torch.bfloat16)
    again = _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})
    fresh = _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: KimiLinearStaticCache(model.config, 11)})
    assert torch.equal(again, fresh) and cache.latents[1].dtype == torch.bfloat16
    model.float()
    with pytest.raises(ValueError, match="in torch.bfloat16, got batch 1 .* in torch.float32; call reset"):
        with torch.no_grad():
            model(ids[:, :1], use_cache=True, **{CACHE_FIELD: cache})


def test_a_cache_refuses_a_model_of_another_configuration(model):
    """A cache filled by one model, given to a model whose layers or state shapes differ, is refused by name (it
    was used as is: the prompt silently ignored, or an IndexError deep in a layer)."""
    cache = KimiLinearCache(model.config)
    with torch.no_grad():
        model(random_ids(1, 5, seed=24), use_cache=True, **{CACHE_FIELD: cache})
        lac = {**model.config.linear_attn_config, "kda_layers": [2, 4], "full_attn_layers": [1, 3]}
        for other, words in ((tiny_model(linear_attn_config=lac), "layer_types"),
                             (tiny_model(kv_lora_rank=8), "kv_lora_rank 16 in the cache, 8 in the model")):  # fmt: skip
            with pytest.raises(ValueError, match=f"another model configuration: {words}"):
                other(random_ids(1, 1, seed=25), use_cache=True, **{CACHE_FIELD: cache})


def test_static_cache_refuses_to_overflow_and_bad_sizes(model):
    cache = KimiLinearStaticCache(model.config, max_cache_len=6)
    with torch.no_grad():
        model(random_ids(1, 6, seed=8), use_cache=True, **{CACHE_FIELD: cache})
        full = r"max_cache_len=6\) is full: it holds 6 positions and this forward adds 1"
        with pytest.raises(ValueError, match=full):
            model(random_ids(1, 1, seed=9), use_cache=True, **{CACHE_FIELD: cache})
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
            KimiLinearStaticCache(model.config, max_cache_len=bad)


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"num_beams": 2}], ids=["greedy", "beam-search"])
def test_cache_implementation_static_builds_a_static_cache(model, kwargs):
    ids = random_ids(2, 7, seed=12)
    expected = _generate(model, ids, True, **kwargs)
    out = _generate(model, ids, True, cache_implementation="static", return_dict_in_generate=True, **kwargs)
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, KimiLinearStaticCache) and cache.max_cache_len == 7 + NEW_TOKENS - 1
    assert torch.equal(out.sequences, expected)
    with pytest.raises(ValueError, match="cache_implementation"):
        _generate(
            model, ids, True, cache_implementation="static", **{CACHE_FIELD: KimiLinearStaticCache(model.config, 20)}
        )


def test_decode_graph_checks_its_input_and_room_and_follows_the_weights():
    """The host-side checks of a CUDA-graph step run before any CUDA call (a replay runs no forward Python, so
    the step itself must refuse a wrong batch or a full cache); a moved or cast model gets a new graph."""
    model = tiny_model(seed=3)
    cache = KimiLinearStaticCache(model.config, max_cache_len=6)
    with torch.no_grad():
        model(random_ids(2, 6, seed=13), use_cache=True, **{CACHE_FIELD: cache})
    graph = cache.decode_graph(model)
    assert cache.decode_graph(model) is graph
    with pytest.raises(ValueError, match=r"batch size 2: a decode step needs input_ids of shape \(2, 1\)"):
        graph.step(random_ids(1, 1, seed=14))
    with pytest.raises(ValueError, match="is full"):
        graph.step(random_ids(2, 1, seed=14))
    model.to(torch.float64)
    assert cache.decode_graph(model) is not graph


@pytest.mark.parametrize("cache", ["growing", "passed", "static", "cache_implementation"])
def test_chunked_prefill_equals_one_prefill(model, cache):
    """generate(prefill_chunk_size=...) feeds the prompt in chunks: each chunk as given (transformers passes no
    next_sequence_length), into a cache that exists from the first chunk (it failed or fed nothing)."""
    ids = random_ids(2, 11, seed=9)
    kwargs = {"do_sample": False}
    if cache == "passed":
        kwargs[CACHE_FIELD] = KimiLinearCache(model.config)
    elif cache == "static":
        kwargs[CACHE_FIELD] = KimiLinearStaticCache(model.config, 11 + NEW_TOKENS)
    elif cache == "cache_implementation":
        kwargs["cache_implementation"] = "static"
    chunked = _generate(model, ids, True, prefill_chunk_size=4, **kwargs)
    assert torch.equal(chunked, _generate(model, ids, False, do_sample=False))


def test_reusing_a_filled_cache_for_a_new_prompt_is_an_error(model):
    ids = random_ids(2, 7, seed=10)
    for cache in (KimiLinearCache(model.config), KimiLinearStaticCache(model.config, 2 * (7 + NEW_TOKENS))):
        _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})
        with pytest.raises(ValueError, match="already holds 12 positions.*call cache.reset()"):
            _generate(model, ids, True, do_sample=False, **{CACHE_FIELD: cache})


def test_static_cache_refuses_autograd_and_growing_cache_a_new_dtype():
    """The static cache writes in place: a forward that autograd records is refused (its backward failed deep in
    autograd). The growing cache meeting another dtype after its prompt is refused clearly (a matmul failed)."""
    model = tiny_model(seed=22)
    ids = random_ids(1, 5, seed=11)
    with pytest.raises(ValueError, match="KimiLinearStaticCache writes its buffers in place"):
        model(ids, use_cache=True, **{CACHE_FIELD: KimiLinearStaticCache(model.config, 8)})
    cache = KimiLinearCache(model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_FIELD: cache})
        model.to(torch.bfloat16)
        with pytest.raises(ValueError, match="holds states on cpu in torch.float32, got .* torch.bfloat16"):
            model(ids[:, :1], use_cache=True, **{CACHE_FIELD: cache})
    assert KimiLinearCache.is_croppable is False


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_padding_token_fed_alone_leaves_the_kda_states_alone(model, static):
    """A left-padded prompt fed one token at a time: each padding step is dropped as in a multi-token forward
    (it went through the KDA layers as a real token, changing the logits of every later token). The padding id
    is the eos id, whose embedding is not zero (the padding_idx row's would hide the defect); row 0 also has
    padding after real tokens."""
    ids = random_ids(2, 9, seed=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[0, 5] = 0
    ids[mask == 0] = model.config.eos_token_id
    cache = KimiLinearStaticCache(model.config, max_cache_len=9) if static else KimiLinearCache(model.config)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        pieces = [
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{CACHE_FIELD: cache}).logits for t in range(9)
        ]
        steps = torch.cat(pieces, dim=1)
        alone = model(ids[1:, 4:]).logits
    real = mask.bool()
    assert_close_rel(steps[real], full[real], 1e-5, "real tokens, one step each")
    assert_close_rel(steps[1, 4:], alone[0], 1e-5, "padded row against the row alone")
    prompt_ids, prompt_mask = ids[1:].clone(), mask[1:].clone()  # left padding only, as generate() expects
    chunked = _generate(model, prompt_ids, True, attention_mask=prompt_mask, do_sample=False, prefill_chunk_size=1)
    assert torch.equal(chunked[0, 9:], _generate(model, ids[1:, 4:], True, do_sample=False)[0, 5:])


def test_the_decode_graph_replays_only_real_tokens(model):
    """The graph takes its token as real: until a prompt's one-token step is all real, the step's mask is read and a
    padding step runs eagerly (left padding: after the first all-real step every later token is real, so the check
    stops); reset() starts a prompt that checks again. The replay conditions other than the token's are met here
    by a stand-in CUDA input (the decision reads only its device flag and shape)."""
    from types import SimpleNamespace

    cache = KimiLinearStaticCache(model.config, max_cache_len=8)
    cache.seen_tokens = 3
    token = SimpleNamespace(is_cuda=True, shape=(2, 1))
    padded, real = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        replays = lambda mask: model._replays_decode_graph(cache, token, None, True, (None,) * 3, mask)  # noqa: E731
        assert not replays(padded) and cache.steps_may_be_padding
        assert replays(real) and not cache.steps_may_be_padding
        assert replays(padded)  # no longer read: left padding ends before the first real token
        cache.reset()
        assert cache.steps_may_be_padding


@pytest.mark.parametrize("cache", ["growing", "static"])
def test_chunked_prefill_of_a_prompt_padded_to_a_fixed_length(model, cache):
    """Prompts padded to a fixed length (tokenizer padding="max_length") start with columns of padding only: a
    prefill chunk of them holds no real token (the KDA layers failed on zero tokens: 'cannot reshape tensor of 0
    elements')."""
    ids = random_ids(2, 9, seed=13)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    mask[1, 3] = 0
    ids[mask == 0] = model.config.pad_token_id
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    chunked = _generate(model, ids, True, attention_mask=mask, do_sample=False, prefill_chunk_size=2, **kwargs)
    assert torch.equal(chunked, _generate(model, ids, True, attention_mask=mask, do_sample=False))


@pytest.mark.parametrize("form", ["ids", "chunked", "embeds", "static"])
@pytest.mark.parametrize("layers", ["hybrid", "kda-only"])
def test_continued_generation_from_a_filled_cache_equals_one_generation(model, layers, form):
    """generate() again with the cache of a first call and the whole sequence (ids, chunked prefill, embeddings; the
    growing and the static cache): only the new tokens are fed. A model of KDA layers only reported every layer as
    linear, which transformers reads as "the cache counts no positions": it re-fed the cached prompt into the
    recurrent states and generated other tokens, silently."""
    if form == "chunked" and Version(transformers.__version__) < Version("5.24"):
        pytest.skip("transformers 5.17's chunked prefill feeds the whole sequence from position 0, past a filled cache")
    if layers == "kda-only":
        lac = {**model.config.linear_attn_config, "kda_layers": [1, 2, 3, 4], "full_attn_layers": []}
        model = tiny_model(seed=3, linear_attn_config=lac)
        model.generation_config.eos_token_id = None
    ids = random_ids(2, 7, seed=26)
    expected = _generate(model, ids, False, do_sample=False)
    cache = KimiLinearStaticCache(model.config, 7 + NEW_TOKENS) if form == "static" else KimiLinearCache(model.config)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_FIELD: cache})
        kwargs = {"max_new_tokens": NEW_TOKENS - 3, "do_sample": False, CACHE_FIELD: cache}
        if form == "embeds":
            more = model.generate(inputs_embeds=model.get_input_embeddings()(first), **kwargs)
            second = torch.cat([first, more], dim=1)
        else:
            second = model.generate(first, prefill_chunk_size=2 if form == "chunked" else None, **kwargs)
    assert cache.get_seq_length() == 7 + NEW_TOKENS - 1
    assert torch.equal(second, expected)


def test_a_cache_of_another_batch_size_is_refused_by_name(model):
    """generate() repeats the prompt for num_beams, not a cache passed in (nor does transformers for its own caches):
    the forward names both sizes (a KDA layer failed on the conv state's shape)."""
    ids = random_ids(2, 5, seed=27)
    cache = KimiLinearCache(model.config)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=2, do_sample=False, **{CACHE_FIELD: cache})
        with pytest.raises(ValueError, match="this KimiLinearCache holds 2 rows, got a batch of 4: generate"):
            model.generate(first, max_new_tokens=2, num_beams=2, **{CACHE_FIELD: cache})


def test_cache_implementation_static_honours_max_cache_len(model):
    """``max_cache_len`` in the generation config sizes the static cache that generate() builds, as transformers sizes
    its StaticCache (it was ignored: the returned cache was full, and continuing from it failed)."""
    ids = random_ids(2, 7, seed=28)
    out = _generate(model, ids, True, do_sample=False, cache_implementation="static", max_cache_len=32,
                    return_dict_in_generate=True)  # fmt: skip
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, KimiLinearStaticCache) and cache.max_cache_len == 32
    more = _generate(model, out.sequences, True, do_sample=False, **{CACHE_FIELD: cache})
    longer = model.generate(ids, max_new_tokens=2 * NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(more, longer)


def test_continuing_with_only_the_new_tokens_needs_the_whole_mask(model):
    """Only the new tokens with an attention_mask over past and new positions continue the cached sequence; without
    that mask transformers cuts them at the cache length, and the error says how to continue (it only said to reset
    the cache for a new prompt)."""
    ids = random_ids(2, 7, seed=29)
    cache = KimiLinearCache(model.config)
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_FIELD: cache})
        more = model.generate(first[:, -1:], attention_mask=torch.ones_like(first), max_new_tokens=NEW_TOKENS - 3,
                              do_sample=False, **{CACHE_FIELD: cache})  # fmt: skip
        assert torch.equal(torch.cat([first[:, :-1], more], dim=1), _generate(model, ids, False, do_sample=False))
        with pytest.raises(ValueError, match="or only the new tokens with an attention_mask over all past and new"):
            model.generate(more[:, -1:], max_new_tokens=2, do_sample=False, **{CACHE_FIELD: cache})
