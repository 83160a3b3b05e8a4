"""Small-batch routed experts (decode): reference vs an independent per-token oracle, Triton vs reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel

from kimi_hf.kernels.moe import ExpertTable, moe_experts, moe_route, naive_moe_experts, naive_moe_route


def _oracle(x, expert_ids, weights, w1, w3, w2):
    """Each token through its own chosen experts, one at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        xn = x[n].double().cpu()
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[n, j])
            act = F.silu(w1[e].double().cpu() @ xn) * (w3[e].double().cpu() @ xn)
            out[n] += float(weights[n, j]) * (w2[e].double().cpu() @ act)
    return out


def _inputs(tokens, hidden, inter, experts, topk, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=gen)

    def weight(rows, cols):
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(device, dtype)

    w1 = [weight(inter, hidden) for _ in range(experts)]
    w3 = [weight(inter, hidden) for _ in range(experts)]
    w2 = [weight(hidden, inter) for _ in range(experts)]
    return x.to(device, dtype), ids.to(device), weights.to(device), w1, w3, w2


def test_reference_matches_per_token_oracle():
    args = _inputs(5, 24, 40, 6, 2)
    assert_close_rel(naive_moe_experts(*args), _oracle(*args), 1e-6, "out")


# (tokens, hidden, intermediate, experts, top-k): ragged tiles everywhere, one token (most experts unchosen),
# an odd top-k, and more tokens than experts (every expert chosen by several).
_CASES = [(1, 40, 24, 8, 2), (3, 150, 70, 5, 3), (20, 33, 130, 4, 2)]


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("case", _CASES)
def test_triton_matches_reference_interpreter(case, split, monkeypatch):
    """``split``: slices of the hidden dimension in the gate/up kernel (3 with 32-column steps: a ragged last
    slice, or fewer slices than asked where hidden is small)."""
    import kimi_hf.kernels.moe as moe

    monkeypatch.setattr(moe, "GATE_UP_SPLIT", split)
    monkeypatch.setattr(moe, "GATE_UP_SPLIT_MAX_TOKENS", moe.MAX_TOKENS)
    monkeypatch.setattr(moe, "GATE_UP_BLOCK_H", 32)
    args = _inputs(*case)
    assert_close_rel(moe_experts(*args, backend="triton"), _oracle(*args), 1e-5, "out")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchosen_experts_and_out_of_range_ids_add_nothing(backend):
    """A token's output never depends on experts it did not choose: an expert full of NaN that only token 1 chose
    leaves token 0 finite (the torch path multiplied every expert by a zero weight, and 0 * NaN is NaN); an id
    outside [0, E) adds nothing on either path (the torch path raised from scatter_add_)."""
    x, ids, weights, w1, w3, w2 = _inputs(2, 20, 18, 4, 2)
    ids = torch.tensor([[0, 1], [3, 2]])
    w1 = [*w1[:3], torch.full_like(w1[3], float("nan"))]
    out = moe_experts(x, ids, weights, w1, w3, w2, backend=backend)
    assert_close_rel(out[0], _oracle(x[:1], ids[:1], weights[:1], w1, w3, w2)[0], 1e-5, "token 0")
    assert torch.isnan(out[1]).all()
    w1[3] = w1[2].clone()
    outside = torch.tensor([[0, 7], [-1, 2]])
    kept = torch.tensor([[0, 0], [2, 2]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * weights  # the same, in range
    assert_close_rel(moe_experts(x, outside, weights, w1, w3, w2, backend=backend), _oracle(x, *kept, w1, w3, w2),
                     1e-5, "ids outside [0, E)")  # fmt: skip


def test_table_follows_moved_weights():
    x, ids, weights, w1, w3, w2 = _inputs(2, 20, 18, 3, 2)
    table = ExpertTable()
    first = moe_experts(x, ids, weights, w1, w3, w2, table=table, backend="triton")
    w1 = [w * 2 for w in w1]  # new tensors at new addresses
    second = moe_experts(x, ids, weights, w1, w3, w2, table=table, backend="triton")
    assert_close_rel(second, naive_moe_experts(x, ids, weights, w1, w3, w2), 1e-5, "out after the weights moved")
    assert not torch.allclose(first, second)


def test_bad_inputs_are_named():
    x, ids, weights, w1, w3, w2 = _inputs(2, 20, 18, 3, 2)
    with pytest.raises(ValueError, match=r"w2\[1\]"):
        moe_experts(x, ids, weights, w1, w3, [w2[0], w2[1].t(), w2[2]])
    with pytest.raises(ValueError, match="weights must have"):
        moe_experts(x, ids, weights[:, :1], w1, w3, w2)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        moe_experts(x.repeat(40, 1), ids.repeat(40, 1), weights.repeat(40, 1), w1, w3, w2, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        moe_experts(x, ids, weights, [w.t().contiguous().t() for w in w1], w3, w2, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        moe_experts(x.double(), ids, weights, *([w.double() for w in g] for g in (w1, w3, w2)), backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        moe_experts(x.requires_grad_(), ids, weights, w1, w3, w2, backend="triton")
    with pytest.raises(ValueError, match="at least one expert per token, got k = 0"):
        moe_experts(x, ids[:, :0], weights[:, :0], w1, w3, w2, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_expert_chosen_twice_by_a_token_counts_with_both_weights(backend):
    """Routers never repeat an id in a row, but a caller may: each column counts with its own weight, the expert's
    output computed once (the Triton path sums the expert's partial once, its mixing weights summed)."""
    x, _, weights, w1, w3, w2 = _inputs(3, 40, 24, 6, 3, seed=5)
    ids = torch.tensor([[2, 2, 5], [0, 4, 0], [1, 1, 1]])
    assert_close_rel(moe_experts(x, ids, weights, w1, w3, w2, backend=backend), _oracle(x, ids, weights, w1, w3, w2),
                     1e-5, "out")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_triton_matches_reference_gpu(tokens, dtype, rtol):
    args = _inputs(tokens, 2048, 1024, 16, 4, device="cuda", dtype=dtype, seed=tokens)
    assert_close_rel(moe_experts(*args), _oracle(*args), rtol, "out")


@pytest.mark.gpu
def test_cuda_graph_replays_new_routing():
    x, ids, weights, w1, w3, w2 = _inputs(4, 256, 128, 8, 2, device="cuda", dtype=torch.bfloat16)
    table = ExpertTable()
    moe_experts(x, ids, weights, w1, w3, w2, table=table)  # compile and build the table outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, ids, weights, w1, w3, w2, table=table)
    ids.copy_(ids.flip(0))
    graph.replay()
    assert_close_rel(out, _oracle(x, ids, weights, w1, w3, w2), 2e-2, "out after a replay with new routing")


# (tokens, experts, top-k, activation, bias, renormalize, shared expert): experts not a power of two, top-1,
# top-k = E, softmax, no bias, no renormalisation, with and without a shared expert riding as the last column.
_ROUTE_CASES = [
    (1, 16, 4, "sigmoid", True, True, 16),
    (5, 10, 3, "sigmoid", True, True, None),
    (7, 12, 1, "softmax", False, False, None),
    (3, 6, 6, "softmax", True, True, 6),
]


def _route_oracle(logits, top_k, bias, activation, renormalize, scaling):
    """Each token on its own in float64: sort by biased score, keep the top-k, weigh by the unbiased scores."""
    ids, weights = [], []
    for row in logits.double():
        scores = row.sigmoid() if activation == "sigmoid" else row.softmax(-1)
        choice = scores + (bias.double() if bias is not None else 0)
        order = sorted(range(row.numel()), key=lambda e: -float(choice[e]))[:top_k]
        w = scores[order]
        w = w / (w.sum() + 1e-20) if renormalize else w
        ids.append(order)
        weights.append(w * scaling)
    return torch.tensor(ids), torch.stack(weights)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", _ROUTE_CASES)
def test_route_matches_per_token_oracle(case, backend):
    tokens, experts, top_k, activation, has_bias, renormalize, shared = case
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    logits = torch.randn(tokens, experts, generator=gen) * 3
    bias = torch.randn(experts, generator=gen) * 0.1 if has_bias else None
    ids, weights = moe_route(logits, top_k, bias, activation, renormalize, 2.5, shared, backend=backend)
    want_ids, want_weights = _route_oracle(logits, top_k, bias, activation, renormalize, 2.5)
    assert ids.dtype == torch.int64 and ids.shape == weights.shape == (tokens, top_k + (shared is not None))
    assert torch.equal(ids[:, :top_k], want_ids)
    assert_close_rel(weights[:, :top_k], want_weights, 1e-6, "weights")
    if shared is not None:
        assert torch.equal(ids[:, -1], torch.full((tokens,), shared))
        assert torch.equal(weights[:, -1], torch.ones(tokens))


def test_route_triton_ties_and_nan():
    """Ties go to the lowest id; a NaN score is chosen first, as torch.topk does, so that it reaches the output."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0], [0.5, float("nan"), 2.0, 0.0, 1.0]])
    ids, weights = moe_route(logits, 2, renormalize=False, backend="triton")
    assert ids.tolist() == [[1, 2], [1, 2]]
    assert weights[1, 0].isnan() and weights[1, 1] == torch.tensor(2.0).sigmoid()
    assert torch.equal(naive_moe_route(logits, 2, renormalize=False)[0][1], ids[1])


def test_route_bad_inputs_are_named():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=8\], got 9"):
        moe_route(logits, 9)
    with pytest.raises(ValueError, match="activation must be one of .* got 'relu'"):
        moe_route(logits, 2, activation="relu")
    with pytest.raises(ValueError, match=r"bias must be \[E\] = \(8,\), got shape \(7,\)"):
        moe_route(logits, 2, torch.zeros(7))
    with pytest.raises(ValueError, match="float32 logits, got torch.float64"):
        moe_route(logits.double(), 2, backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        moe_route(logits.requires_grad_(), 2, backend="triton")


def test_route_grouped_top_k_beyond_the_kept_groups_is_refused():
    """With 4 groups of 2 experts and 1 group kept only 2 experts are reachable: a top-3 took a masked expert of a
    dropped group (and its real score as weight) silently."""
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts of the topk_groups=1 kept groups of 2"):
        moe_route(logits, 3, num_groups=4, topk_groups=1, backend="torch")
    ids, _ = moe_route(logits, 4, num_groups=4, topk_groups=2, backend="torch")  # exactly the reachable ones
    assert all(len({e // 2 for e in row}) == 2 for row in ids.tolist())
