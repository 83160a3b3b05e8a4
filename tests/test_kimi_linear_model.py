"""KimiLinearModel / KimiLinearForCausalLM on CPU: shapes, gradients, loss, outputs, dtypes, training,
gradient checkpointing, MoE routing, and padding/packing/attention-implementation equivalences."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel
from kimi_linear_utils import TINY_VOCAB, random_ids, routers, single_thread, tiny_config, tiny_model  # noqa: F401

from kimi_hf import KimiLinearForCausalLM, KimiLinearModel
from kimi_hf.models.kimi_linear import KimiLinearCache
from kimi_hf.models.kimi_linear.modeling_kimi_linear import CACHE_FIELD, KimiLinearSparseMoE

MOE_LAYERS = [1, 2, 3]  # of the tiny config: layer 0 dense


def _expected_load(router_logits: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert loads of one sigmoid router (one group): top-k of sigmoid(logits) + bias."""
    ids = (router_logits.sigmoid() + bias).topk(top_k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=bias.numel()).float()


# ---------------------------------------------------------------------------------------------- shapes, grads
def test_base_model_forward_backward_shapes():
    torch.manual_seed(0)
    model = KimiLinearModel(tiny_config()).train()
    ids = random_ids(2, 9)
    out = model(ids)
    assert out.last_hidden_state.shape == (2, 9, 32)
    out.last_hidden_state.square().mean().backward()
    assert model.embed_tokens.weight.grad.shape == (TINY_VOCAB, 32)


def test_every_parameter_gets_a_gradient():
    model = tiny_model(seed=6).train()
    ids = random_ids(2, 24, seed=6)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.logits.shape == (2, 24, TINY_VOCAB)
    # The test is only meaningful if every routed expert received tokens.
    for logits, router in zip(out.router_logits, routers(model)):
        load = _expected_load(logits, router.e_score_correction_bias, 2)
        assert (load > 0).all(), f"pick another seed: an expert got no token ({load.tolist()})"
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.self_attn.A_log" in names and "model.layers.1.block_sparse_moe.gate.weight" in names


def test_labels_loss_is_the_shifted_cross_entropy():
    model = tiny_model(seed=2)
    ids = random_ids(2, 11, seed=2)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, TINY_VOCAB).float(), labels[:, 1:].reshape(-1))
    assert_close_rel(out.loss, manual, 1e-6, "loss")


def test_logits_to_keep():
    model = tiny_model(seed=3)
    ids = random_ids(2, 10, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        last3 = model(ids, logits_to_keep=3).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 4, 9])).logits
    assert last3.shape == (2, 3, TINY_VOCAB)
    assert_close_rel(last3, full[:, -3:], 1e-6, "logits_to_keep=3")
    assert_close_rel(picked, full[:, [0, 4, 9]], 1e-6, "logits_to_keep=tensor")


def test_output_hidden_states_and_router_logits():
    model = tiny_model(seed=4)
    ids = random_ids(2, 6, seed=4)
    captured = []
    # The residual stream after the last layer (standard residuals, inference path: the state's running sum and
    # the last output, which the final norm adds).
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.append(out[0].partial + out[0].pending)
    )
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True, output_router_logits=True)
    hook.remove()
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    assert_close_rel(hs[0], model.model.embed_tokens(ids), 0, "hidden_states[0] (embeddings)")
    assert_close_rel(hs[-1], out.last_hidden_state, 0, "hidden_states[-1]")
    # The last one is the final norm of the last layer's output.
    (pre_norm,) = captured
    x = pre_norm.double()
    manual = model.model.norm.weight.double() * x / (x.square().mean(-1, keepdim=True) + 1e-5).sqrt()
    assert_close_rel(hs[-1], manual, 1e-6, "hidden_states[-1] is normed")
    assert not torch.allclose(hs[-1], pre_norm)
    assert len(out.router_logits) == len(MOE_LAYERS)
    for logits in out.router_logits:
        assert logits.shape == (2 * 6, model.config.num_experts) and logits.dtype == torch.float32


def test_output_attentions_of_the_mla_layers():
    """Eager attention returns one weight tensor per MLA layer (KDA has no attention matrix): causal, rows summing
    to 1, the same logits as sdpa; asked under sdpa it is refused, not answered with None."""
    model = tiny_model(seed=5).eval()
    ids = random_ids(2, 6, seed=5)
    with torch.no_grad():
        sdpa_logits = model(ids).logits
        with pytest.raises(ValueError, match="output_attentions needs the eager attention.*'sdpa'"):
            model(ids, output_attentions=True)
        model.set_attn_implementation("eager")
        out = model(ids, output_attentions=True)
    assert_close_rel(out.logits, sdpa_logits, 1e-5, "eager vs sdpa logits")
    mla_layers = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert len(out.attentions) == len(mla_layers) > 0
    for weights in out.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, 6, 6)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        assert weights.triu(1).abs().max() == 0


def test_base_model_return_dict_false_gives_a_tuple():
    model = tiny_model(seed=6).eval()
    ids = random_ids(1, 5, seed=6)
    with torch.no_grad():
        as_dict = model.model(ids, use_cache=False)
        as_tuple = model.model(ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and not isinstance(as_tuple, dict)
    assert_close_rel(as_tuple[0], as_dict.last_hidden_state, 0, "last_hidden_state")


@pytest.mark.parametrize("pad_position", [0, 1])
def test_left_padded_single_row_with_position_ids_is_not_read_as_packed(pad_position):
    """A batch of one left-padded row with the usual position_ids (cumsum(mask) - 1, padding at 0 or 1) restarts
    its positions after the padding: the mask, not the positions, decides (it was read as packed sequences)."""
    model = tiny_model(seed=7).eval()
    ids = random_ids(1, 9, seed=7)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, pad_position)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        alone = model(ids[:, 3:])
    assert_close_rel(padded.logits[:, 3:], alone.logits, 1e-5, "real tokens of the padded row")
    assert getattr(padded, CACHE_FIELD) is not None
    # with no padding, restarting positions still mark packed sequences
    packed = model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]]), use_cache=False)
    with torch.no_grad():
        second = model(ids[:, 3:]).logits
    assert_close_rel(packed.logits[:, 3:], second, 1e-5, "second packed sequence")


def test_bf16_forward_is_close_to_fp32():
    model = tiny_model(seed=5)
    ids = random_ids(2, 20, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        out = model.to(torch.bfloat16)(ids).logits
    assert out.dtype == torch.bfloat16
    assert_close_rel(out.float(), ref, 5e-2, "bf16 logits")


def test_tiny_model_overfits_one_batch():
    model = tiny_model(seed=6).train()
    ids = random_ids(2, 16, seed=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, f"loss {first:.3f} -> {loss.item():.3f}"


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kwargs):
    ids = random_ids(2, 12, seed=7)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(seed=7).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            assert model.model.gradient_checkpointing
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    # Unrouted experts have no gradient either way; the same ones.
    assert [n for n, g in ckpt_grads.items() if g is None] == [n for n, g in plain_grads.items() if g is None]
    for a, b in zip(ckpt.router_logits, plain.router_logits):
        assert torch.equal(a.topk(2).indices, b.topk(2).indices), "routing differs under checkpointing"
    assert_close_rel(ckpt.loss, plain.loss, 1e-6, "loss")
    for name, grad in plain_grads.items():
        if grad is not None:
            assert_close_rel(ckpt_grads[name], grad, 1e-5, f"grad {name}")


def test_reentrant_checkpointing_is_refused_clearly():
    model = tiny_model(seed=7).train()
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(ids, labels=ids).loss.backward()


# ---------------------------------------------------------------------------------------------- MoE routing
def _moe(**overrides) -> KimiLinearSparseMoE:
    """An 8-expert MoE over hidden 8 whose router weight is the identity: router logits = the input."""
    config = tiny_config(hidden_size=8, num_experts=8, moe_intermediate_size=4, **overrides)
    torch.manual_seed(0)
    moe = KimiLinearSparseMoE(config).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(8))
        for p in moe.experts.parameters():
            p.normal_()
        for p in moe.shared_experts.parameters():
            p.normal_()
    return moe


def _manual_moe(moe: KimiLinearSparseMoE, x: torch.Tensor, chosen: list[list[int]]) -> torch.Tensor:
    """Loop over tokens: sum over the chosen experts of (unbiased renormalised score * scale) * expert(x) + shared."""
    scale = moe.gate.config.routed_scaling_factor
    rows = []
    for t, experts in enumerate(chosen):
        scores = torch.sigmoid(x[t, experts])
        weights = scores / scores.sum() * scale
        y = sum(w * moe.experts[e](x[t : t + 1])[0] for w, e in zip(weights, experts))
        rows.append(y + moe.shared_experts(x[t : t + 1])[0])
    return torch.stack(rows)


def test_moe_routing_hand_computed_bias_changes_the_choice():
    moe = _moe(num_experts_per_token=2)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]))
    x = torch.tensor(
        [
            # unbiased top-2 would be {0, 1}; biased scores 0.881, 0.231, 0.922, 0.269 -> {2, 0}
            [2.0, 1.0, 0.5, -1.0, -2.0, -2.0, -2.0, -2.0],
            # the bias does not change this one: {5, 6}
            [-3.0, -3.0, -3.0, -3.0, -3.0, 3.0, 2.5, -3.0],
        ]
    )
    logits, weights, ids = moe.gate(x)
    assert_close_rel(logits, x, 1e-7, "router logits")
    assert [sorted(r) for r in ids.tolist()] == [[0, 2], [5, 6]]
    for t in range(2):
        s = torch.sigmoid(x[t, ids[t]])
        assert_close_rel(weights[t], s / s.sum() * 2.446, 1e-6, f"mixing weights of token {t}")
    with torch.no_grad():
        out, _ = moe(x[None])
        assert_close_rel(out[0], _manual_moe(moe, x, [[0, 2], [5, 6]]), 1e-6, "MoE output")


def test_moe_grouped_topk_picks_the_best_groups():
    # 4 groups of 2 experts, keep 2 groups, 3 experts. Group scores (sum of both sigmoid scores):
    # g0 = s(3) + s(-3) = 1, g1 = s(1) + s(0.9) = 1.44, g2 = s(2) + s(-2) = 1, g3 = s(.5) + s(.4) = 1.22.
    # Plain top-3 would take experts 0, 4, 2; grouped top-k keeps groups 1 and 3 -> experts 2, 3, 6.
    moe = _moe(num_experts_per_token=3, num_expert_group=4, topk_group=2)
    x = torch.tensor([[3.0, -3.0, 1.0, 0.9, 2.0, -2.0, 0.5, 0.4]])
    _, weights, ids = moe.gate(x)
    assert sorted(ids[0].tolist()) == [2, 3, 6]
    s = torch.sigmoid(x[0, ids[0]])
    assert_close_rel(weights[0], s / s.sum() * 2.446, 1e-6, "grouped mixing weights")
    with torch.no_grad():
        out, _ = moe(x[None])
        assert_close_rel(out[0], _manual_moe(moe, x, [[2, 3, 6]]), 1e-6, "grouped MoE output")


def test_moe_top1_weight_is_the_scaled_score_and_trains_the_router():
    """With one expert per token the official code does not renormalise (``top_k > 1 and moe_renormalize``): the
    mixing weight is the chosen expert's score times routed_scaling_factor. Renormalised it was the constant
    2.446, other outputs than the official ones, and the router weight got no gradient at all (never learned)."""
    moe = _moe(num_experts_per_token=1).train()
    x = torch.tensor([[2.0, 1.0, 0.5, -1.0, -2.0, -2.0, -2.0, -2.0], [-3.0, -3.0, -3.0, -3.0, -3.0, 3.0, 2.5, -3.0]])
    _, weights, ids = moe.gate(x)
    assert ids.tolist() == [[0], [5]]
    assert_close_rel(weights[:, 0], torch.sigmoid(torch.tensor([2.0, 3.0])) * 2.446, 1e-6, "top-1 mixing weights")
    out, _ = moe(x[None])
    out.square().sum().backward()
    assert moe.gate.weight.grad[[0, 5]].abs().amin(dim=-1).gt(1e-3).all(), "the top-1 router weight got no gradient"


def test_moe_output_matches_a_manual_loop_on_random_tokens():
    moe = _moe(num_experts_per_token=2)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = moe(x)
        _, _, ids = moe.gate(x[0])
        assert_close_rel(out[0], _manual_moe(moe, x[0], ids.tolist()), 1e-6, "MoE output")


def test_moe_gradients_match_a_manual_loop():
    """The routed path's gather-only dispatch and combine (their backwards are gathers too): output, input gradient
    and expert gradients in float64 against the per-token loop, on the same routing."""
    moe = _moe(num_experts_per_token=3).double()
    x = torch.randn(1, 13, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, _, ids = moe.gate(x[0])
    dy = torch.randn(13, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for routed in (True, False):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = moe(xi)[0][0] if routed else _manual_moe(moe, xi[0], ids.tolist())
        out.backward(dy)
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.experts.named_parameters()
                                                if p.grad is not None}))  # fmt: skip
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = results
    assert_close_rel(out, out_ref, 1e-12, "MoE output")
    assert_close_rel(dx, dx_ref, 1e-12, "input gradient (router included)")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close_rel(grads[name], grads_ref[name], 1e-12, f"grad {name}")


def test_pair_gathers_pass_gradcheck():
    from kimi_hf.models.kimi_linear.modeling_kimi_linear import _CombinePairs, _DispatchToPairs, _TakeRows

    gen = torch.Generator().manual_seed(6)
    N, k = 5, 3
    order = torch.randperm(N * k, generator=gen)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(N * k)
    x = torch.randn(N, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(N * k, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _DispatchToPairs.apply(t, order // k, inverse, k), (x,))
    assert torch.autograd.gradcheck(lambda t: _CombinePairs.apply(t, order // k, inverse, k), (y,))
    assert torch.autograd.gradcheck(lambda t: _TakeRows.apply(t, torch.tensor([4, 0, 13, 7])), (y,))


@pytest.mark.parametrize("shared", [1, 2], ids=["shared-rides", "shared-apart"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_experts_match_the_routed_experts(backend, shared, monkeypatch):
    """The inference path for few tokens (kimi_hf.kernels.moe: one routing launch, then the experts without host
    synchronisation, for CUDA graphs; on CUDA it is Triton) equals the routed path, forced here on CPU with the ops'
    torch path or their Triton kernels under the interpreter. One shared expert rides with the routed ones as
    expert E; two (twice an expert's width) run as their own MLP."""
    moe = _moe(num_experts_per_token=3, num_shared_experts=shared)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not moe._use_decode_experts(x[0])  # CPU: the routed path
        routed, routed_logits = moe(x)
        assert moe._shared_expert_rides() == (shared == 1)
        monkeypatch.setattr(KimiLinearSparseMoE, "_use_decode_experts", lambda self, x: True)
        monkeypatch.setenv("KIMI_HF_KERNEL_BACKEND", backend)
        decoded, logits = moe(x)
    assert_close_rel(decoded, routed, 1e-6, "decode experts")
    assert torch.equal(logits, routed_logits)


def test_wrapped_experts_are_called_as_modules(monkeypatch):
    """Experts wrapped by a PEFT adapter are called as modules: the grouped-GEMM and decode paths, which read the
    weights directly (LoRA's ``weight`` is the frozen base weight), are not taken, even where they would be."""
    from peft import LoraConfig, inject_adapter_in_model

    from kimi_hf.models.kimi_linear import modeling_kimi_linear as modeling

    moe = _moe(num_experts_per_token=3)
    assert moe._experts_read_in_place()
    inject_adapter_in_model(LoraConfig(target_modules=["w1", "w2"], r=2, init_lora_weights=False), moe)
    assert not moe._experts_read_in_place()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moe.use_grouped_mm = False
        looped, _ = moe(x)  # each chosen expert called as a module, adapters included
        moe.use_grouped_mm = True
        monkeypatch.setattr(modeling, "_grouped_mm_ok", lambda x: True)
        monkeypatch.setattr(modeling.KimiLinearSparseMoE, "_experts_grouped", None)  # would fail if called
        routed, _ = moe(x)
    assert torch.equal(routed, looped)


def _cpu_grouped_mm_available() -> bool:
    """Whether this torch has torch._grouped_mm with a CPU fp32 kernel (probed on a tiny input)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.zeros(16, 8), torch.zeros(1, 8, 8), offs=torch.tensor([16], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _cpu_grouped_mm_available(), reason="this torch has no CPU kernel for torch._grouped_mm")
def test_grouped_experts_pad_groups_and_match_the_loop():
    """The grouped-GEMM expert path (padded, aligned groups; an empty expert) equals the loop, with gradients.
    Runs torch._grouped_mm on CPU where torch provides it; the CUDA check is tests/test_kimi_linear_gpu.py."""
    moe = _moe(num_experts_per_token=2)
    gen = torch.Generator().manual_seed(3)
    expert_of = torch.tensor([0] * 5 + [2] * 17 + [3] * 1 + [7] * 16)  # experts 1, 4, 5, 6 get no rows
    counts = torch.bincount(expert_of, minlength=moe.num_experts)
    x = torch.randn(expert_of.numel(), 8, generator=gen)
    results = []
    for grouped in (False, True):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = moe._experts_grouped(xi, expert_of, counts) if grouped else moe._experts_loop(xi, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in moe.experts.named_parameters() if p.grad is not None}
        results.append((y.detach(), xi.grad, grads))
    (y_ref, dx_ref, g_ref), (y, dx, g) = results
    assert_close_rel(y, y_ref, 1e-5, "expert outputs")
    assert_close_rel(dx, dx_ref, 1e-5, "input gradient")
    for name in g_ref:
        assert_close_rel(g[name], g_ref[name], 1e-5, f"grad {name}")
    for e in (1, 4, 5, 6):
        assert torch.count_nonzero(g[f"{e}.w1.weight"]) == 0, f"expert {e} had no rows but got a gradient"


def test_eval_routing_never_changes_the_bias():
    model = tiny_model(seed=8, router_bias_update_rate=0.01)
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    with torch.no_grad():
        for seed in range(2):
            model(random_ids(2, 8, seed=seed))
    for b, r in zip(before, routers(model)):
        assert torch.equal(b, r.e_score_correction_bias)


def test_no_grad_forwards_in_train_mode_never_change_the_bias():
    """Balancing follows training forwards: generate() (under no_grad) or an evaluation pass of a model left in train
    mode moved the bias at every step (generate: at every new token) and recorded their loads for the next one."""
    model = tiny_model(seed=8, router_bias_update_rate=0.01).train()
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    ids = random_ids(1, 5, seed=8)
    with torch.no_grad():
        model(ids)
        model(ids)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    for b, r in zip(before, routers(model)):
        assert torch.equal(b, r.e_score_correction_bias) and r._pending_load is None


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_bias_update_applies_at_the_next_forward_not_during_recomputation(kwargs):
    rate = 0.01
    model = tiny_model(seed=9, router_bias_update_rate=rate).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    gates = routers(model)
    bias0 = [r.e_score_correction_bias.clone() for r in gates]
    ids1, ids2 = random_ids(2, 12, seed=1), random_ids(2, 12, seed=2)

    out1 = model(ids1, labels=ids1, output_router_logits=True)
    out1.loss.backward()  # recomputes every layer's forward
    for b, r in zip(bias0, gates):
        assert torch.equal(b, r.e_score_correction_bias), "bias moved during the forward or the recomputation"
    loads = [_expected_load(lg.detach(), b, 2) for lg, b in zip(out1.router_logits, bias0)]
    assert any(not torch.all(ld == ld.mean()) for ld in loads), "pick another seed: perfectly balanced loads"

    model(ids2)  # applies the loads of the first forward
    for b, r, load in zip(bias0, gates, loads):
        expected = b + rate * torch.sign(load.mean() - load)
        assert_close_rel(r.e_score_correction_bias, expected, 1e-7, "updated bias")
        # under-loaded experts go up, over-loaded ones down
        assert torch.all((r.e_score_correction_bias > b) == (load < load.mean()))

    bias1 = [r.e_score_correction_bias.clone() for r in gates]
    model.eval()
    with torch.no_grad():
        model(ids1)  # the pending loads of the second forward are not applied in eval mode
    for b, r in zip(bias1, gates):
        assert torch.equal(b, r.e_score_correction_bias)


def test_padding_does_not_count_in_the_balancing_load():
    """The expert load a training forward leaves for the next bias update counts the real tokens only: a padded
    batch leaves the load of the same tokens packed into one row (it counted the padding too)."""
    ids = random_ids(2, 10, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    loads = []
    for inputs in (dict(input_ids=ids, attention_mask=mask),
                   dict(input_ids=torch.cat([ids[0, 6:], ids[1]])[None], cu_seqlens=torch.tensor([0, 4, 14]))):
        model = tiny_model(seed=9, router_bias_update_rate=0.01).train()  # fresh: a second forward would update
        model(**inputs)
        loads.append([r._pending_load for r in routers(model)])
    for padded, packed in zip(*loads):
        assert torch.equal(padded, packed) and padded.sum() == 14 * model.config.num_experts_per_token


def test_float64_model_decodes_with_its_cache_in_float64():
    """An fp64 model's KDA state is fp64: decoding returns it instead of updating an fp32 state in place (it was
    refused), and beta stays fp64 (it was rounded to fp32)."""
    model = tiny_model(seed=10, dtype=torch.float64).eval()
    ids = random_ids(1, 6, seed=10)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
        full = model(out[:, :-1]).logits[:, -3:]
        cache = getattr(model(out[:, :6], use_cache=True), CACHE_FIELD)
        steps = [model(out[:, 6 + i : 7 + i], **{CACHE_FIELD: cache}, use_cache=True).logits for i in range(3)]
    assert_close_rel(torch.cat(steps, 1)[:, :2], full[:, 1:], 1e-12, "cached fp64 decode vs full forward")


# ---------------------------------------------------------------------------------------------- padding, packing
LENGTHS = (70, 23)  # the first crosses KDA's 64-token chunk boundary
# fp64 models still compute RMSNorm and the router in fp32 (as the official code), so fp64 runs that
# differ only in summation order can disagree at fp32 rounding of those steps: ~1e-9, not 1e-15.
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-7)]


def _alone(model, seqs):
    with torch.no_grad():
        return [model(s[None]).logits[0] for s in seqs]


def _seqs(seed=10):
    return [random_ids(1, n, seed=seed + i)[0] for i, n in enumerate(LENGTHS)]


def _padded(seqs, side: str):
    total = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), total, dtype=torch.long)
    mask = torch.zeros(len(seqs), total, dtype=torch.long)
    spans = []
    for row, s in enumerate(seqs):
        start = total - len(s) if side == "left" else 0
        ids[row, start : start + len(s)] = s
        mask[row, start : start + len(s)] = 1
        spans.append(slice(start, start + len(s)))
    return ids, mask, spans


@pytest.mark.parametrize("dtype, rtol", DTYPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_logits_of_each_sequence_alone(side, dtype, rtol):
    model = tiny_model(seed=11, dtype=dtype)
    seqs = _seqs()
    ids, mask, spans = _padded(seqs, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    for row, (span, ref) in enumerate(zip(spans, _alone(model, seqs))):
        assert_close_rel(logits[row, span], ref, rtol, f"{side}-padded row {row}")


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens", "cu_seq_lens_q"])
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_packed_sequences_equal_separate_runs(how, dtype, rtol):
    """Packed sequences marked by restarting positions, ``cu_seqlens``, or flash-attention's ``cu_seq_lens_q`` (as
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` writes them; they ran as one sequence before)."""
    model = tiny_model(seed=12, dtype=dtype)
    seqs = _seqs(seed=20) + [random_ids(1, 5, seed=30)[0]]
    packed = torch.cat(seqs)[None]
    bounds = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    kwargs = (
        {"position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
        if how == "position_ids"
        else {how: bounds.to(torch.int32)}
    )
    with torch.no_grad():
        logits = model(packed, **kwargs).logits[0]
    for i, ref in enumerate(_alone(model, seqs)):
        assert_close_rel(logits[bounds[i] : bounds[i + 1]], ref, rtol, f"packed sequence {i}")


def test_packed_sequences_build_no_cache_and_refuse_one():
    """Packed sequences have no single continuation: no cache by default in eval, an explicit one is refused, and
    boundaries that go back, or padding in the packed row, are refused by value."""
    model = tiny_model(seed=12).eval()
    ids, position_ids = random_ids(1, 6, seed=40), torch.tensor([[0, 1, 0, 1, 2, 3]])
    with torch.no_grad():
        assert getattr(model(ids, position_ids=position_ids), CACHE_FIELD) is None
        for kwargs in ({"use_cache": True}, {"cache": KimiLinearCache(model.config)}):
            with pytest.raises(ValueError, match="packed sequences .* cannot fill a cache"):
                model(ids, position_ids=position_ids, **kwargs)
        with pytest.raises(ValueError, match=re.escape("without decreasing, got [0, 4, 2, 6]")):
            model(ids, cu_seqlens=torch.tensor([0, 4, 2, 6]))
        # padding in a packed row was silently attended to (the mask was ignored)
        with pytest.raises(ValueError, match=re.escape("(cu_seqlens [0, 4, 6]) cannot be combined with padding")):
            model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]), cu_seqlens=torch.tensor([0, 4, 6]))
        all_real = model(ids, attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 4, 6])).logits
        assert_close_rel(all_real, model(ids, cu_seqlens=torch.tensor([0, 4, 6])).logits, 0, "all-ones mask")


@pytest.mark.parametrize(
    "collator_kwargs",
    [
        {},
        {"position_ids_start": 1},
        {"return_position_ids": False, "return_seq_idx": True},
        {"return_position_ids": False, "return_flash_attn_kwargs": True},
    ],
    ids=["positions", "positions-from-1", "seq_idx-only", "flash-kwargs-only"],
)
def test_flattening_collator_gives_the_loss_of_the_padded_batch(collator_kwargs):
    """Each way ``DataCollatorWithFlattening`` marks its packed sequences gives the loss of the same examples as a
    right-padded batch. Positions restarting at 1 and ``seq_idx`` alone were not read: the sequences ran as one,
    each attending to the ones before it."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model(seed=15).train()
    seqs = [random_ids(1, n, seed=60 + i)[0] for i, n in enumerate((9, 4, 7))]
    packed = DataCollatorWithFlattening(**collator_kwargs)([{"input_ids": s.tolist()} for s in seqs])
    ids, mask, _ = _padded(seqs, "right")
    labels = ids.masked_fill(mask == 0, -100)
    expected = model(ids, attention_mask=mask, labels=labels).loss
    assert_close_rel(model(**packed).loss, expected, 1e-5, f"packed loss ({collator_kwargs})")


def test_base_model_reads_the_flattening_collators_boundaries():
    """``KimiLinearModel`` (no LM head) reads ``cu_seq_lens_q`` and ``seq_idx`` too (it ignored them)."""
    model = tiny_model(seed=16).model
    seqs = [random_ids(1, n, seed=70 + i)[0] for i, n in enumerate((5, 6))]
    with torch.no_grad():
        alone = [model(s[None]).last_hidden_state[0] for s in seqs]
        marks = {
            "cu_seq_lens_q": torch.tensor([0, 5, 11], dtype=torch.int32),
            "seq_idx": torch.tensor([[0] * 5 + [1] * 6], dtype=torch.int32),
        }
        for name, value in marks.items():
            hidden = model(torch.cat(seqs)[None], **{name: value}).last_hidden_state[0]
            assert_close_rel(hidden[5:], alone[1], 1e-5, f"second sequence marked by {name}")
            assert_close_rel(hidden[:5], alone[0], 1e-5, f"first sequence marked by {name}")
        with pytest.raises(ValueError, match=re.escape("expected shape [1, seq_len], got (11,)")):
            model(torch.cat(seqs)[None], seq_idx=marks["seq_idx"][0])


@pytest.mark.parametrize("layout", ["packed", "right-padded"])
def test_packed_and_padded_gradients_equal_separate_runs(layout):
    """Training on a packed or padded batch gives the gradients of the separate sequences (summed)."""
    seqs = [random_ids(1, n, seed=50 + i)[0] for i, n in enumerate((13, 6))]
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(len(s), TINY_VOCAB, generator=gen) for s in seqs]  # a fixed linear "loss" per token

    def grads(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = tiny_model(seed=14).train()
    for s, probe in zip(seqs, probes):
        (model(s[None]).logits[0] * probe).sum().backward()
    expected = grads(model)

    model = tiny_model(seed=14).train()
    if layout == "packed":
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        logits = model(torch.cat(seqs)[None], position_ids=position_ids).logits[0]
        (logits * torch.cat(probes)).sum().backward()
    else:
        ids, mask, spans = _padded(seqs, "right")
        logits = model(ids, attention_mask=mask).logits
        sum((logits[row, span] * probe).sum() for row, (span, probe) in enumerate(zip(spans, probes))).backward()
    got = grads(model)
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        assert_close_rel(got[name], grad, 1e-5, f"{layout} grad {name}")


def test_eager_and_sdpa_agree_on_the_4d_mask_path():
    seqs = _seqs(seed=40)
    ids, mask, spans = _padded(seqs, "left")
    sdpa = tiny_model(seed=13)
    assert sdpa.config._attn_implementation == "sdpa"
    config = tiny_config()
    config._attn_implementation = "eager"
    eager = KimiLinearForCausalLM(config).eval()
    eager.load_state_dict(sdpa.state_dict())
    from_config = KimiLinearForCausalLM._from_config(tiny_config(), attn_implementation="eager").eval()
    from_config.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager" == from_config.config._attn_implementation
    with torch.no_grad():
        ref = sdpa(ids, attention_mask=mask).logits
        for model in (eager, from_config):
            out = model(ids, attention_mask=mask).logits
            for row, span in enumerate(spans):
                assert_close_rel(out[row, span], ref[row, span], 1e-5, f"eager vs sdpa row {row}")
            # and without a mask (plain causal, no 4-D mask built)
            assert_close_rel(model(ids[:1, -20:]).logits, sdpa(ids[:1, -20:]).logits, 1e-5, "eager vs sdpa causal")


@pytest.mark.parametrize(
    "overrides",
    [{}, {"residual": "block", "attn_res_block_size": 3}, {"residual": "full"}],
    ids=["standard", "block-3", "full"],
)
def test_inference_path_equals_eager_residuals(overrides):
    """Under no_grad the residual bookkeeping rides in the reads' kernels (AttnRes: two-phase, additions in phase 2,
    block stores with the next phase 1; standard: addition in the PreNorm): logits and hidden states as the eager
    path's, and cached greedy generation as recomputation."""
    model = tiny_model(seed=6, **overrides)
    if model.config.residual != "standard":
        with torch.no_grad():  # off the zero init, so that the depth mixing matters
            model.model.attn_res.queries.copy_(torch.randn(model.model.attn_res.queries.shape))
    ids = random_ids(2, 7, seed=6)
    with torch.no_grad():
        fused = model(ids, output_hidden_states=True)
        model.model.attn_res.two_phase = False
        eager = model(ids, output_hidden_states=True)
        model.model.attn_res.two_phase = True
    assert_close_rel(fused.logits, eager.logits, 1e-5, "logits")
    for i, (a, e) in enumerate(zip(fused.hidden_states, eager.hidden_states)):
        assert_close_rel(a, e, 1e-5, f"hidden state {i}")
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_balancing_warns_when_the_bias_is_not_fp32(monkeypatch):
    """``model.to(torch.bfloat16)`` casts the correction bias too (only from_pretrained keeps it fp32), and bf16
    cannot hold steps of 1e-3 on a bias near 1: the update says so instead of vanishing silently."""
    import kimi_hf.models.kimi_linear.modeling_kimi_linear as modeling

    messages = []
    monkeypatch.setattr(modeling.logger, "warning_once", messages.append)
    model = tiny_model(seed=9, router_bias_update_rate=1e-3).to(torch.bfloat16).train()
    for seed in range(2):
        model(random_ids(2, 8, seed=seed))
    assert messages and "e_score_correction_bias is torch.bfloat16" in messages[0]


# ---------------------------------------------------------------------------------------------- accelerate placement
def _saved_tiny(tmp_path, **overrides) -> tuple[KimiLinearForCausalLM, str]:
    """A tiny model and the folder it was saved to (for ``from_pretrained(device_map=...)``)."""
    model = tiny_model(seed=3, **overrides)
    model.save_pretrained(tmp_path / "model")
    return model, str(tmp_path / "model")


def _device_map(model: KimiLinearForCausalLM, offloaded: str) -> dict[str, str]:
    """Every top-level block on "cpu" and ``offloaded`` on "disk"; the blocks above it are listed by their children
    (accelerate refuses a map whose entries nest)."""
    names = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(4)], "model.norm", "lm_head"]
    if model.config.residual != "standard":
        names.append("model.attn_res")
    parts = offloaded.split(".")
    for depth in range(3, len(parts)):  # e.g. model.layers.1, then model.layers.1.block_sparse_moe
        parent = ".".join(parts[:depth])
        children = [f"{parent}.{name}" for name, _ in model.get_submodule(parent).named_children()]
        names = [n for n in names if n != parent] + children
    return {**{name: "cpu" for name in names}, offloaded: "disk"}


@pytest.mark.parametrize("residual", ["standard", "block"])
def test_device_map_auto_splits_only_a_standard_decoder(residual):
    """An AttnRes decoder's residual state (the sources of all earlier blocks) cannot follow its layers over
    devices: device_map="auto" keeps it whole (it put the embeddings on GPU 0 and the layers on GPU 1). A
    standard decoder may be split: the model moves its residual stream to each layer's device."""
    from transformers.integrations.accelerate import infer_auto_device_map

    model = tiny_model(residual=residual, attn_res_block_size=2)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model, max_memory={0: size // 2, 1: size, "cpu": size}, no_split_module_classes=model._no_split_modules
    )
    if residual == "standard":
        assert device_map["model.embed_tokens"] == 0 and "model" not in device_map, device_map
    else:
        assert device_map["model"] == 1 and not any(key.startswith("model.") for key in device_map), device_map


@pytest.mark.parametrize(
    "residual,offloaded",
    [
        ("standard", "model.layers.0"),  # KDA + dense MLP: fused PreNorms, conv weights of the decode step
        ("standard", "model.layers.1"),  # MLA + MoE
        ("standard", "model.norm"),  # the final norm, fused into the last residual read
        ("standard", "model.layers.1.block_sparse_moe.experts"),
        ("block", "model.layers.2"),
    ],
)
def test_offloaded_weights_give_the_plain_models_outputs(tmp_path, residual, offloaded):
    """Weights read as tensors outside their module's forward (fused PreNorm gains, KDA's conv weights in the
    decode step) stay on the meta device under accelerate's offload hooks, which load a module's weights only
    around its own forward: a "disk" entry failed with a meta-device error deep in a norm or conv op. Now those
    modules are called where their weights are offloaded: the logits and greedy tokens of the plain model."""
    model, path = _saved_tiny(tmp_path, residual=residual, attn_res_block_size=2)
    device_map = _device_map(model, offloaded)
    placed = KimiLinearForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=tmp_path / "o")
    ids = random_ids(2, 6, seed=3)
    assert_close_rel(placed(ids).logits, model(ids).logits, 1e-6, f"logits with {offloaded} offloaded")
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(placed.generate(ids, max_new_tokens=3, do_sample=False), expected)
    assert not placed.model.graphable  # a decode-step CUDA graph would replay the offload hooks' transient copies


def test_offloaded_attn_res_parameters_are_refused_by_name(tmp_path):
    """The pseudo-queries and key-norm gains are read by every layer, never in a forward of their own module:
    offloaded, a clear error names them (it was "Cannot copy out of meta tensor" from a layer's hook)."""
    model, path = _saved_tiny(tmp_path, residual="block", attn_res_block_size=2)
    placed = KimiLinearForCausalLM.from_pretrained(
        path, device_map=_device_map(model, "model.attn_res"), offload_folder=tmp_path / "o"
    )
    with pytest.raises(ValueError, match=r"attn_res.queries is on the meta device \(offloaded by device_map\)"):
        placed(random_ids(1, 4))


def test_placement_is_checked_once_per_device():
    """The placement check walks every expert's weights: once per device, again after the model is moved or cast
    (a decode step's host time could not afford it at every forward)."""
    model = tiny_model()
    ids = random_ids(1, 4)
    model(ids)
    assert model.model._placement_checked_on == torch.device("cpu")
    model.to(torch.float64)
    assert model.model._placement_checked_on is None
    model(ids)
    assert model.model._placement_checked_on == torch.device("cpu") and model.model.graphable


def test_lora_on_kv_b_proj_reaches_the_latent_attention(monkeypatch):
    """A decode step over a long cache attends in the latent space, reading ``kv_b_proj.weight`` as a tensor: with a
    LoRA adapter on ``kv_b_proj`` that is the frozen base weight, and the adapter was silently dropped from every
    such step (from 4096 cached positions; the threshold is lowered here). A wrapped ``kv_b_proj`` is called."""
    from peft import LoraConfig, get_peft_model

    from kimi_hf.models.kimi_linear import modeling_kimi_linear as modeling

    monkeypatch.setattr(modeling, "MLA_ABSORB_MIN_KEYS", 1)
    model = get_peft_model(
        tiny_model(seed=4), LoraConfig(target_modules=["kv_b_proj"], r=2, init_lora_weights=False)
    ).eval()
    ids = random_ids(1, 6, seed=4)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]  # no cache: the expanded form, adapter called
        prompt = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=getattr(prompt, CACHE_FIELD), use_cache=True).logits[:, -1]
    assert_close_rel(step, full, 1e-5, "decode step with LoRA on kv_b_proj")
