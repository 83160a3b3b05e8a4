"""Kimi Linear on CUDA: each Triton op the model dispatches to gives the torch reference's logits and
gradients inside the model, the grouped-GEMM MoE equals the expert loop, CUDA-graph decoding with the static
cache equals eager decoding, and the model gives the logits of transformers' native class."""

import functools

import pytest
import torch
from helpers import assert_close_rel, tiny_kimi_linear_config

import kimi_hf.models.kimi_linear.modeling_kimi_linear as modeling
from kimi_hf import KimiLinearForCausalLM, KimiLinearStaticCache

pytestmark = pytest.mark.gpu

OPS = ("chunk_kda", "fused_recurrent_kda", "causal_conv1d", "causal_conv1d_update_group", "gated_rms_norm")


def _run(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("op", OPS)
def test_triton_op_matches_torch_inside_the_model(op, monkeypatch):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config()).cuda()
    ids = torch.randint(3, 256, (2, 150), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding: the varlen path
    for name in OPS:
        monkeypatch.setattr(modeling, name, functools.partial(getattr(modeling, name), backend="torch"))
    ref_logits, ref_grads = _run(model, ids, mask)
    monkeypatch.setattr(modeling, op, functools.partial(getattr(modeling, op).func, backend="triton"))
    logits, grads = _run(model, ids, mask)
    keep = mask.bool()
    assert_close_rel(logits[keep], ref_logits[keep], 1e-4, f"logits with Triton {op}")
    for name, g in ref_grads.items():
        assert_close_rel(grads[name], g, 1e-3, f"grad {name} with Triton {op}")


def test_grouped_mm_moe_matches_the_expert_loop(monkeypatch):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config()).cuda().to(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 64), device="cuda")
    monkeypatch.setattr(modeling.KimiLinearSparseMoE, "use_grouped_mm", False)
    ref_logits, ref_grads = _run(model, ids, None)
    monkeypatch.setattr(modeling.KimiLinearSparseMoE, "use_grouped_mm", True)
    logits, grads = _run(model, ids, None)
    assert_close_rel(logits, ref_logits, 2e-2, "logits")
    for name, g in ref_grads.items():
        assert_close_rel(grads[name], g, 5e-2, f"grad {name}")


def _grouped_moe_and_input() -> tuple[modeling.KimiLinearSparseMoE, torch.Tensor]:
    """The tiny config's MoE in bf16, training, and a seeded input ``[1, 200, hidden]`` that needs a gradient; skips
    where the grouped-GEMM experts do not run."""
    if not modeling._grouped_mm_ok(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("the grouped-GEMM experts need a Hopper or newer GPU")
    torch.manual_seed(0)
    moe = modeling.KimiLinearSparseMoE(tiny_kimi_linear_config())
    # The router weight is torch.empty until the model's _init_weights sets it; a bare module must be given values
    # (left as it was, whatever the allocator held, NaN at times, made every gradient NaN in two GPU runs).
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    moe = moe.cuda().to(torch.bfloat16).train()
    x = torch.randn(1, 200, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return moe, x


def test_grouped_mm_moe_trains_without_host_synchronisation():
    """The routed MoE with grouped GEMMs (bf16, Hopper), forward and backward, under CUDA's sync debug mode: no
    operation in it waits for the device (torch.bincount did, once per layer)."""
    moe, x = _grouped_moe_and_input()
    moe(x)[0].sum().backward()  # warm-up: kernels compiled and cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = moe(x)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


def _fill_free_memory_with_nan() -> None:
    """Leave NaN in the blocks the caching allocator hands out next: small ones (under 1 MB, carved from 2 MB
    segments) and a large one, all held at once, then freed."""
    blocks = [torch.empty(n, device="cuda", dtype=torch.bfloat16).fill_(float("nan")) for n in [2**17] * 64 + [2**26]]
    del blocks


def test_grouped_mm_moe_computes_on_no_unwritten_rows():
    """The grouped-GEMM MoE's forward and backward under autograd's anomaly mode, after NaN was left in free memory:
    a row that no kernel wrote (``_grouped_mm`` leaves rows past its last offset unwritten) and that an op then
    computes on returns NaN from that op's backward, which anomaly mode reports; every gradient must be finite."""
    moe, x = _grouped_moe_and_input()
    for _ in range(3):
        _fill_free_memory_with_nan()
        x.grad = None
        moe.zero_grad(set_to_none=True)
        with torch.autograd.detect_anomaly(check_nan=True):
            out, _ = moe(x)
            out.float().sum().backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(x.grad).all(), "input gradient"
        for name, p in moe.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"gradient of {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("residual", ["standard", "block"])
def test_cuda_graph_decoding_equals_eager_decoding(dtype, batch, residual):
    """Same tokens and scores as the static cache's eager path (same kernels); after reset() the graph is
    replayed, not captured again; fp32 scores also match the growing cache's. Batch 3 is left-padded. Block
    AttnRes (3 sublayers per block, the last block shorter) decodes through its fused inference kernels."""
    torch.manual_seed(0)
    overrides = {"residual": "block", "attn_res_block_size": 3} if residual == "block" else {}
    model = KimiLinearForCausalLM(tiny_kimi_linear_config(**overrides)).cuda().to(dtype).eval()
    if residual == "block":  # random pseudo-queries: the mixing is not the uniform average of initialisation
        with torch.no_grad():
            model.model.attn_res.queries.normal_()
    prompt, new = 40, 12
    ids = torch.randint(3, 256, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    mask[1:, :7] = 0

    def generate(cache):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            eos_token_id=None, output_scores=True, return_dict_in_generate=True,
            **({modeling.CACHE_FIELD: cache} if cache is not None else {}),
        )  # fmt: skip
        return out.sequences, torch.stack(out.scores)

    eager_ids, eager_scores = generate(KimiLinearStaticCache(model.config, prompt + new, cuda_graphs=False))
    cache = KimiLinearStaticCache(model.config, prompt + new)
    graph_ids, graph_scores = generate(cache)
    graph = cache._decode_graph.graph
    assert graph is not None, "no CUDA graph was captured"
    assert torch.equal(graph_ids, eager_ids)
    assert_close_rel(graph_scores, eager_scores, 1e-6 if dtype == torch.float32 else 1e-2, "graph vs eager scores")
    cache.reset()
    again_ids, _ = generate(cache)
    assert cache._decode_graph.graph is graph and torch.equal(again_ids, eager_ids)
    if dtype == torch.float32:
        _, dynamic_scores = generate(None)
        assert_close_rel(graph_scores, dynamic_scores, 1e-5, "graph vs growing-cache scores")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_latent_space_decoding_equals_the_expanded_form(dtype, rtol, monkeypatch):
    """MLA's decode steps attending in the latent space (forced from 1 cached position; sdpa over folded heads)
    give the expanded form's scores, with the growing cache and in the static cache's CUDA graph, left-padded."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config()).cuda().to(dtype).eval()
    ids = torch.randint(3, 256, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1:, :7] = 0

    def scores(cache=None):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
            eos_token_id=None, output_scores=True, return_dict_in_generate=True,
            **({modeling.CACHE_FIELD: cache} if cache is not None else {}),
        )  # fmt: skip
        return torch.stack(out.scores)

    expanded = scores()
    monkeypatch.setattr(modeling, "MLA_ABSORB_MIN_KEYS", 1)
    _assert_same_greedy_scores(scores(), expanded, rtol, "latent-space scores, growing cache")
    graph = scores(KimiLinearStaticCache(model.config, 50))
    _assert_same_greedy_scores(graph, expanded, rtol, "latent space, CUDA graph")


def _assert_same_greedy_scores(got, expected, rtol, name):
    """Greedy decoding's scores ``[steps, B, vocab]`` of two computations of one model, each row compared up to the
    first step at which they pick different tokens, and such a step allowed only where the expected scores' top two
    are within ``rtol`` of each other: a tie that rounding may break either way (then the rows go on from different
    tokens). Session 43: a bf16 row whose top two logits were 0.4590 and 0.4570, one bf16 step apart, flipped when
    the KDA kernels' rounding changed, and the scores of the steps after it differed by 50%."""
    for b in range(expected.shape[1]):
        differ = (got[:, b].argmax(-1) != expected[:, b].argmax(-1)).nonzero()
        end = differ[0].item() + 1 if len(differ) else expected.shape[0]
        assert_close_rel(got[:end, b], expected[:end, b], rtol, f"{name}, row {b}")
        if len(differ):
            top = expected[end - 1, b].float().topk(2).values
            assert top[0] - top[1] <= rtol * top[0].abs(), f"{name}, row {b}: another token at step {end - 1}, no tie"


def test_decode_graph_after_a_left_padded_prompt_fed_token_by_token():
    """generate(prefill_chunk_size=1) on a left-padded batch with the static cache's CUDA graph: the padding steps
    run eagerly (dropped), so the tokens equal the growing cache's; the padding id's embedding is not zero."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config()).cuda().eval()
    ids = torch.randint(3, 256, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[mask == 0] = model.config.eos_token_id

    def generate(**kwargs):
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0, eos_token_id=None, prefill_chunk_size=1, **kwargs)  # fmt: skip

    assert torch.equal(generate(cache_implementation="static"), generate())


def test_logits_match_transformers_native_class(tmp_path):
    """fp32 on the same weights, with every expert active: with top-k < experts a random-init router has
    near ties, and rounding differences (fla's kernels vs ours) flip expert choices, which no tolerance
    can tell from a bug. The native class runs fla's kernels where fla is installed."""
    native_cls = pytest.importorskip(
        "transformers.models.kimi_linear", reason="this transformers has no native kimi_linear"
    ).KimiLinearForCausalLM
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config(num_experts_per_token=8)).cuda().eval()
    model.save_pretrained(tmp_path)
    native = native_cls.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    ids = torch.randint(3, 256, (2, 300), device="cuda")
    with torch.no_grad():
        assert_close_rel(model(ids).logits, native(ids).logits, 5e-3, "logits vs transformers' native class")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_decode_experts_match_the_routed_experts(dtype, rtol, monkeypatch):
    """The MoE's small-batch Triton path (decode steps) gives the routed path's logits, prompt and steps alike."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_kimi_linear_config(num_experts_per_token=3)).cuda().to(dtype).eval()
    ids = torch.randint(3, 256, (5, 9), device="cuda")  # 45 tokens: the decode path takes the whole prompt
    with torch.no_grad():
        logits = model(ids).logits
        monkeypatch.setattr(modeling.KimiLinearSparseMoE, "_use_decode_experts", lambda self, x: False)
        ref_logits = model(ids).logits
    assert_close_rel(logits, ref_logits, rtol, "logits with the decode experts")
