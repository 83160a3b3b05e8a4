"""AttentionResiduals module: paper semantics (init, Full = block size 1, one block), two-phase, errors."""

import re

import pytest
import torch
from helpers import assert_close_rel

from kimi_hf.kernels.attn_res import naive_depth_attention
from kimi_hf.modules import AttentionResiduals

D = 32


def _sublayers(n: int, seed: int = 0) -> list[torch.nn.Module]:
    """Stand-ins for attention/MLP sublayers: a norm then a random non-linear map."""
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.RMSNorm(D), torch.nn.Linear(D, D), torch.nn.Tanh()) for _ in range(n)]


def _run(attn_res: AttentionResiduals, fns, x: torch.Tensor) -> torch.Tensor:
    state = attn_res.begin(x)
    for f in fns:
        state = attn_res.add_sublayer_output(state, f(attn_res.sublayer_input(state)))
    return attn_res.final_output(state)


def _randomise(attn_res: AttentionResiduals, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn_res.queries.copy_(torch.randn(attn_res.queries.shape, generator=g))
        attn_res.norm_weight.copy_(1 + 0.3 * torch.randn(attn_res.norm_weight.shape, generator=g))


def _full_reference(x, fns, queries, gains):
    """Full AttnRes written out: every sublayer attends over the embedding and all earlier raw outputs."""
    sources = [x]
    for l, f in enumerate(fns):
        sources.append(f(naive_depth_attention(sources, queries[l], gains[l])))
    return naive_depth_attention(sources, queries[-1], gains[-1])


def test_init_is_uniform_average():
    attn_res = AttentionResiduals(D, num_sublayers=4, mode="block", block_size=2)
    assert torch.equal(attn_res.queries, torch.zeros(5, D)) and torch.equal(attn_res.norm_weight, torch.ones(5, D))
    x = torch.randn(2, 3, D)
    outs = [torch.randn(2, 3, D) for _ in range(4)]
    state = attn_res.begin(x)
    state = attn_res.add_sublayer_output(state, outs[0])
    assert_close_rel(attn_res.sublayer_input(state), (x + outs[0]) / 2, 1e-6, "sources [b0, partial]")
    state = attn_res.add_sublayer_output(state, outs[1])
    b1 = outs[0] + outs[1]
    assert_close_rel(attn_res.sublayer_input(state), (x + b1) / 2, 1e-6, "sources [b0, b1]")
    state = attn_res.add_sublayer_output(state, outs[2])
    assert_close_rel(attn_res.sublayer_input(state), (x + b1 + outs[2]) / 3, 1e-6, "sources [b0, b1, partial]")
    state = attn_res.add_sublayer_output(state, outs[3])
    assert_close_rel(attn_res.final_output(state), (x + b1 + outs[2] + outs[3]) / 3, 1e-6, "final")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_size_one_is_full_attn_res(backend):
    fns = _sublayers(5)
    attn_res = AttentionResiduals(D, num_sublayers=5, mode="block", block_size=1, backend=backend)
    _randomise(attn_res)
    x = torch.randn(2, 3, D)
    ref = _full_reference(x, fns, attn_res.queries, attn_res.norm_weight)
    assert_close_rel(_run(attn_res, fns, x), ref, 1e-5, "block size 1 vs Full")
    full = AttentionResiduals(D, num_sublayers=5, mode="full", backend=backend)
    full.load_state_dict(attn_res.state_dict())
    assert_close_rel(_run(full, fns, x), ref, 1e-5, "mode full")


def test_one_block_is_residual_with_embedding_apart():
    """N = 1: sublayer l sees softmax over [embedding, sum of earlier outputs] (hand-written two-source mix)."""
    fns = _sublayers(4, seed=3)
    attn_res = AttentionResiduals(D, num_sublayers=4, mode="block", block_size=4)
    _randomise(attn_res, seed=4)
    q, g, eps = attn_res.queries, attn_res.norm_weight, attn_res.eps

    def score(v, l):
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g[l]) @ q[l]

    def mix(x, stream, l):
        a = torch.sigmoid(score(x, l) - score(stream, l)).unsqueeze(-1)
        return a * x + (1 - a) * stream

    x = torch.randn(2, 3, D)
    stream = fns[0](x)  # the first sublayer sees only the embedding
    for l in range(1, 4):
        stream = stream + fns[l](mix(x, stream, l))
    expected = mix(x, stream, 4)
    assert_close_rel(_run(attn_res, fns, x), expected, 1e-5, "one block")


def test_standard_mode_is_plain_residual():
    fns = _sublayers(3)
    x = torch.randn(2, 3, D)
    expected = x
    for f in fns:
        expected = expected + f(expected)
    assert_close_rel(_run(AttentionResiduals(D, 3, mode="standard"), fns, x), expected, 1e-6, "standard")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_standard_mode_prenorm_is_rms_norm_of_stream(backend):
    """Standard mode's fused PreNorm (the Triton kernel on that backend) equals RMSNorm of the stream, with grads."""
    from kimi_hf.kernels.attn_res import rms_norm

    attn_res = AttentionResiduals(D, num_sublayers=2, mode="standard", backend=backend)
    weight = (1 + 0.2 * torch.randn(D)).requires_grad_()
    x = torch.randn(2, 3, D, requires_grad=True)
    state = attn_res.begin(x)
    fused = attn_res.sublayer_input(state, weight, 1e-5)
    expected = rms_norm(x, weight, 1e-5)
    assert_close_rel(fused, expected, 1e-5, "sublayer")
    state = attn_res.add_sublayer_output(state, torch.tanh(fused))
    state = attn_res.add_sublayer_output(state, torch.tanh(attn_res.sublayer_input(state, weight, 1e-5)))
    out = attn_res.final_output(state, weight, 1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, weight))
    x_ref, w_ref = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    stream = x_ref
    for _ in range(2):
        stream = stream + torch.tanh(rms_norm(stream, w_ref, 1e-5))
    ref_grads = torch.autograd.grad(rms_norm(stream, w_ref, 1e-5).square().sum(), (x_ref, w_ref))
    for a, e, name in zip(grads, ref_grads, ("d_x", "d_weight")):
        assert_close_rel(a, e, 1e-5, name)


@pytest.mark.parametrize(
    "backend,block_size", [("torch", 1), ("torch", 3), ("torch", 7), ("triton", 3), ("triton", 7)]
)
def test_two_phase_inference_matches_training_path(backend, block_size):
    """Blocks of 3 over 7 sublayers end with a block of one (the final aggregation merges its output alone); one
    block of 7 has the final aggregation merge over v_0 alone, which phase 1 did not score."""
    fns = _sublayers(7, seed=5)
    attn_res = AttentionResiduals(D, num_sublayers=7, mode="block", block_size=block_size, backend=backend)
    _randomise(attn_res, seed=6)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        two_phase = _run(attn_res, fns, x)
        attn_res.two_phase = False
        one_pass = _run(attn_res, fns, x)
    assert_close_rel(two_phase, one_pass, 1e-5, "two-phase vs one-pass")


@pytest.mark.parametrize(
    "backend,mode,block_size",
    [("torch", "standard", None), ("triton", "standard", None), ("triton", "full", None), ("triton", "block", 3)],
)
def test_inference_path_with_fused_norms_and_reads(backend, mode, block_size):
    """The inference path (outputs added by the next read, block boundaries stored by the next phase 1) against the
    training path, with each sublayer's PreNorm fused, the hidden state read first without it (as
    ``output_hidden_states`` does) and one sublayer whose input is never read."""
    fns = _sublayers(7, seed=8)
    attn_res = AttentionResiduals(D, num_sublayers=7, mode=mode, block_size=block_size, backend=backend)
    if mode != "standard":
        _randomise(attn_res, seed=9)
    weights = [1 + 0.2 * torch.randn(D) for _ in range(8)]
    x = torch.randn(2, 3, D)

    def run(with_hidden_reads: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state, inputs = attn_res.begin(x), []
        for i, f in enumerate(fns):
            if with_hidden_reads:
                inputs.append(attn_res.sublayer_input(state))
            out = f(attn_res.sublayer_input(state, weights[i], 1e-5)) if i != 4 else torch.tanh(x)
            state = attn_res.add_sublayer_output(state, out)
        return attn_res.final_output(state, weights[7], 1e-5), inputs

    with torch.no_grad():
        fused, hidden = run(True)
        assert fused.shape == x.shape
    with torch.enable_grad():
        reference, hidden_ref = run(True)
    assert_close_rel(fused, reference, 1e-5, f"{mode}: final output")
    for i, (a, e) in enumerate(zip(hidden, hidden_ref)):
        assert_close_rel(a, e, 1e-5, f"{mode}: hidden state {i}")
    with torch.no_grad():
        assert_close_rel(run(False)[0], reference, 1e-5, f"{mode}: without the hidden-state reads")


def test_gradients_reach_every_pseudo_query():
    fns = _sublayers(6)
    attn_res = AttentionResiduals(D, num_sublayers=6, mode="block", block_size=4)
    _run(attn_res, fns, torch.randn(2, 3, D)).pow(2).sum().backward()
    # at init every row's gradient is non-zero: each sublayer mixes at least two sources except sublayer 0
    row_norms = attn_res.queries.grad.norm(dim=-1)
    assert row_norms[0] == 0 and bool((row_norms[1:] > 0).all()), row_norms
    assert bool((attn_res.norm_weight.grad.norm(dim=-1)[1:] == 0).all()), "zero queries: gain grads vanish at init"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "blocks"}, "unknown residual mode 'blocks'"),
        ({"mode": "block", "block_size": 0}, "got 0"),
        ({"mode": "block", "block_size": 9}, "got 9"),
        ({"mode": "block", "block_size": None}, "got None"),
        ({"mode": "block", "block_size": True}, r"^block_size must be an int in \[1, num_sublayers = 8\].* got True"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionResiduals(D, num_sublayers=8, **kwargs)


def test_misuse_raises():
    attn_res = AttentionResiduals(D, num_sublayers=2, mode="block", block_size=2)
    state = attn_res.begin(torch.randn(1, 2, D))
    with pytest.raises(ValueError, match="final_output needs all 2 sublayers"):
        attn_res.final_output(state)
    for _ in range(2):
        state = attn_res.add_sublayer_output(state, torch.randn(1, 2, D))
    with pytest.raises(ValueError, match="all 2 sublayers have run"):
        attn_res.sublayer_input(state)
    with pytest.raises(ValueError, match="hidden size 32"):
        attn_res.begin(torch.randn(1, 2, 8))


@pytest.mark.parametrize("backend,grad", [("torch", True), ("torch", False), ("triton", True), ("triton", False)])
def test_fused_prenorm_equals_norm_of_input(backend, grad):
    from kimi_hf.kernels.attn_res import rms_norm

    attn_res = AttentionResiduals(D, num_sublayers=3, mode="block", block_size=2, backend=backend)
    _randomise(attn_res, seed=7)
    weight = 1 + 0.2 * torch.randn(D)
    x = torch.randn(2, 3, D)
    with torch.set_grad_enabled(grad):  # grad off: the two-phase path (begin() chooses it), norm after the merge
        state = attn_res.begin(x)
        for i in range(3):
            fused = attn_res.sublayer_input(state, weight, 1e-5)
            if not grad and i % 2 == 0:  # a block boundary read with its PreNorm keeps query 0 only in that form
                assert state.cache["phase1"][2][0] is None
            # the plain read after the fused one: at a boundary, query 0's output recomputed
            assert_close_rel(fused, rms_norm(attn_res.sublayer_input(state), weight, 1e-5), 1e-5, "sublayer")
            state = attn_res.add_sublayer_output(state, torch.tanh(fused))
        fused = attn_res.final_output(state, weight, 1e-5)
        assert_close_rel(fused, rms_norm(attn_res.final_output(state), weight, 1e-5), 1e-5, "final")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_sources_score_in_fp32_and_block_sums_keep_the_banks_dtype(backend):
    """fp16 sources of size 1e3-1e4 (scores are O(|w| sqrt(D)) after the key norm, but the torch path took the dot
    in fp16 and overflowed to NaN); bf16 outputs over fp32 sources (autocast) summed within a block in fp32 (they
    were rounded to bf16 first), on the training and the two-phase path."""
    torch.manual_seed(0)
    attn_res = AttentionResiduals(D, 4, mode="block", block_size=2, backend=backend).half()
    _randomise(attn_res)
    x = (torch.randn(1, 2, D) * 1e4).clamp(-6e4, 6e4).half()
    outs = [(torch.randn(1, 2, D) * 1e3).half() for _ in range(4)]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            state, inputs = attn_res.begin(x), []
            for out in outs:
                inputs.append(attn_res.sublayer_input(state))
                state = attn_res.add_sublayer_output(state, out)
            inputs.append(attn_res.final_output(state))
        assert all(torch.isfinite(h).all() for h in inputs), f"fp16, grad={grad}"
    attn_res = AttentionResiduals(D, 3, mode="block", block_size=3, backend=backend)  # zero queries: the mean
    x, outs = torch.randn(4, D), [torch.randn(4, D).bfloat16() for _ in range(3)]
    exact = (x.double() + sum(o.double() for o in outs)) / 2
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            state = attn_res.begin(x)
            for out in outs:
                attn_res.sublayer_input(state)
                state = attn_res.add_sublayer_output(state, out)
            final = attn_res.final_output(state)
        assert final.dtype == torch.float32
        assert_close_rel(final, exact, 1e-6, f"block sum of bf16 outputs over fp32 sources, grad={grad}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inference_rereads_of_older_states_give_their_first_answer(backend):
    """States are immutable, so reading an older state again (e.g. collecting hidden states after the loop) must
    give its first answer. The inference path cached only the running block's phase 1 and applied it to an older
    state of another block: a silently wrong input (or an IndexError after the final aggregation's phase 1). The
    final aggregation merges the last block in phase 2 without storing it (no later read needs it), so reading it
    again runs it again."""
    attn_res = AttentionResiduals(D, num_sublayers=6, mode="block", block_size=2, backend=backend)
    _randomise(attn_res, seed=10)
    x, outs = torch.randn(2, 3, D), [torch.randn(2, 3, D) for _ in range(6)]
    with torch.no_grad():
        state, states, inputs = attn_res.begin(x), [], []
        for out in outs:
            states.append(state)
            inputs.append(attn_res.sublayer_input(state))
            state = attn_res.add_sublayer_output(state, out)
        # block 0's second sublayer after block 2 began; block 1's first (re-storing b_1), then block 2's second
        for i in (1, 2, 5):
            assert_close_rel(attn_res.sublayer_input(states[i]), inputs[i], 1e-6, f"re-read of sublayer {i}")
        if backend == "triton":  # the final aggregation reads the last block without storing it: its slot stays NaN
            last_slot = state.bank.storage.store[attn_res.num_blocks]
            last_slot.fill_(float("nan"))
        final = attn_res.final_output(state)
        assert_close_rel(attn_res.sublayer_input(states[3]), inputs[3], 1e-6, "re-read after the final output")
        assert_close_rel(attn_res.final_output(state), final, 1e-6, "final output read again")
        if backend == "triton":
            assert last_slot.isnan().all()
    with torch.enable_grad():
        assert_close_rel(final, _run(attn_res, [lambda h, o=o: o for o in outs], x), 1e-5, "vs the training path")


@pytest.mark.parametrize("mode", ["standard", "block"])
@pytest.mark.parametrize("grad", [True, False])
def test_wrong_shaped_sublayer_output_raises(mode, grad):
    """A sublayer output that broadcasts against the stream ([B, 1, D], [D]) was silently summed into it (standard
    mode; block mode: into a block's partial sum); another shape failed later naming internal tensors."""
    attn_res = AttentionResiduals(D, num_sublayers=4, mode=mode, block_size=4)
    with torch.set_grad_enabled(grad):
        state = attn_res.begin(torch.randn(2, 3, D))
        state = attn_res.add_sublayer_output(state, torch.randn(2, 3, D))
        for bad in (torch.randn(2, 1, D), torch.randn(D), torch.randn(2, 3, 8)):
            attn_res.sublayer_input(state)
            message = f"sublayer 1's output has shape {tuple(bad.shape)}, expected the embeddings' (2, 3, 32)"
            with pytest.raises(ValueError, match=re.escape(message)):
                attn_res.add_sublayer_output(state, bad)


@pytest.mark.parametrize("mode", ["standard", "block"])
def test_gradients_through_a_forward_begun_under_no_grad_raise_clearly(mode):
    """Frozen lower sublayers under no_grad, trainable upper ones: begin() under no_grad chose the inference-only
    path, and the next read failed inside a kernel op telling the user to call it under torch.no_grad()."""
    attn_res = AttentionResiduals(D, num_sublayers=4, mode=mode, block_size=2)
    weight, upper = torch.ones(D), torch.nn.Linear(D, D)
    with torch.no_grad():
        state = attn_res.begin(torch.randn(2, 3, D))
        state = attn_res.add_sublayer_output(state, torch.tanh(attn_res.sublayer_input(state, weight)))
        state = attn_res.add_sublayer_output(state, torch.tanh(attn_res.sublayer_input(state, weight)))
    # block mode: the trainable pseudo-query of sublayer 2; standard mode: sublayer 2's trainable output
    failing = 2 if mode == "block" else 3
    with pytest.raises(ValueError, match=rf"sublayer {failing} needs gradients, but this forward's begin\(\) ran"):
        state = attn_res.add_sublayer_output(state, upper(attn_res.sublayer_input(state, weight)))
        attn_res.sublayer_input(state, weight)


def test_inference_branches_of_one_state_stay_apart():
    """Two states branched from one (two candidate outputs of one sublayer) on the inference path: the reads of the
    second branch reused the first branch's cached fold and phase 1 (both keyed by sublayer index only)."""
    attn_res = AttentionResiduals(D, num_sublayers=4, mode="block", block_size=2)
    _randomise(attn_res, seed=11)
    x, outs, alternative = torch.randn(2, 3, D), [torch.randn(2, 3, D) for _ in range(4)], torch.randn(2, 3, D)

    def branches() -> list[torch.Tensor]:
        state = attn_res.begin(x)
        state = attn_res.add_sublayer_output(state, outs[0])
        ends = [attn_res.add_sublayer_output(state, out) for out in (outs[1], alternative)]  # both end block 0
        reads = [attn_res.sublayer_input(end) for end in ends]  # block 1's first sublayer: phase 1 of each bank
        nexts = [attn_res.add_sublayer_output(end, outs[2]) for end in ends]
        return reads + [attn_res.sublayer_input(state) for state in nexts]  # block 1's second: phase 2

    with torch.no_grad():
        inference = branches()
    for i, (a, e) in enumerate(zip(inference, branches())):
        assert_close_rel(a, e, 1e-5, f"read {i}")


class _LaunchSpy:
    """A Triton kernel stand-in that records each launch's arguments by name and runs the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(dict(zip(self.kernel.arg_names, args), **kwargs))
            return launch(*args, **kwargs)

        return run


class _ScaledEmbedding(torch.nn.Embedding):
    """A subclass whose forward is not ``weight[ids]``: begin_from_ids must call it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(ids)


def test_begin_from_ids_gathers_into_the_source_slot(monkeypatch):
    """On the Triton inference path a plain nn.Embedding gathers straight into v_0's slot, and the first block
    boundary then stores nothing (nor scores any query: its phase 2 reads score v_0); every other case (gradients,
    standard mode, an embedding whose forward is not weight[ids]: a subclass, a hook, max_norm) calls the module.
    Either way the model's inputs and output equal those of begin(embed_tokens(ids))."""
    from kimi_hf.kernels.attn_res import _triton

    spy = _LaunchSpy(_triton.store_scores_kernel)
    monkeypatch.setattr(_triton, "store_scores_kernel", spy)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    outs = [torch.randn(2, 5, D) for _ in range(4)]
    plain, scaled, hooked = torch.nn.Embedding(50, D), _ScaledEmbedding(50, D), torch.nn.Embedding(50, D)
    hooked.register_forward_hook(lambda module, args, out: out + 1)

    def inputs(attn_res, state):
        hs = []
        for out in outs:
            hs.append(attn_res.sublayer_input(state))
            state = attn_res.add_sublayer_output(state, out)
        return hs + [attn_res.final_output(state)]

    for mode in ("block", "standard"):
        attn_res = AttentionResiduals(D, 4, mode=mode, block_size=2, backend="triton")
        if mode == "block":
            _randomise(attn_res)
        for embed, grad in ((plain, False), (plain, True), (scaled, False), (hooked, False)):
            spy.launches.clear()
            with torch.set_grad_enabled(grad):
                state, embeddings = attn_res.begin_from_ids(embed, ids)
                expected = embed(ids)
                assert torch.equal(embeddings, expected)
                got, want = inputs(attn_res, state), inputs(attn_res, attn_res.begin(expected))
            for i, (a, b) in enumerate(zip(got, want)):
                assert_close_rel(a, b, 1e-6, f"{mode}, {type(embed).__name__}, grad={grad}: input {i}")
            direct = mode == "block" and embed is plain and not grad
            in_slot = state.bank is not None and embeddings.data_ptr() == state.bank.storage.store[0].data_ptr()
            assert in_slot == direct, (mode, type(embed).__name__, grad)
            if direct:  # the first boundary read v_0 in its slot and did not store it again
                assert spy.launches and spy.launches[0]["STORE"] is False and spy.launches[0]["n_q"] == 0
    renormed = torch.nn.Embedding(50, D, max_norm=1.0)
    with torch.no_grad():
        state, embeddings = AttentionResiduals(D, 4, block_size=2, backend="triton").begin_from_ids(renormed, ids)
    assert embeddings.norm(dim=-1).max() <= 1.0 + 1e-6 and state.pending is embeddings
