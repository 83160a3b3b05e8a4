"""Routing and routed experts for a few tokens (decoding), in Triton kernels or torch.

The training and prefill path of the model sorts (token, expert) pairs and runs grouped GEMMs; for the
handful of tokens of a decode step that costs more in launches and host synchronisation than it saves.
``moe_route`` picks each token's experts in one launch; ``moe_experts`` reads each chosen expert's weights once,
for all tokens that chose it, skips the others (gate/up, down, and a launch that sums each token's chosen
experts), and never synchronises with the host, so a decode step that uses them can be captured in a CUDA graph.
The Triton paths are inference only (no autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import resolve_backend
from .._grid import cdiv, next_power_of_2
from .naive import naive_moe_experts, naive_moe_route
from .triton_kernels import (
    moe_act_kernel, moe_combine_kernel, moe_down_kernel, moe_gate_up_kernel, moe_route_kernel,
)  # fmt: skip

__all__ = [
    "MAX_TOKENS",
    "ROUTER_ACTIVATIONS",
    "TRITON_DTYPES",
    "ExpertTable",
    "moe_experts",
    "moe_route",
    "naive_moe_experts",
    "naive_moe_route",
]

MAX_TOKENS = 64  # the kernels hold all tokens as the rows of one tile
# Tiles: intermediate columns per gate/up program and hidden columns per step; output columns per down program
# and intermediate columns per step. Timed in the ~1B model's decode on the H200 (BENCHMARKS.md, session 5);
# a sweep of the op alone is host-bound at one token, and at 32 tokens found gate/up 20% faster with 256
# hidden columns per step (not adopted: unmeasured at one token, where decoding spends its time).
GATE_UP_BLOCK_I = 16
GATE_UP_BLOCK_H = 128
GATE_UP_WARPS = 4
# Slices of the hidden dimension per gate/up program group, for steps of at most GATE_UP_SPLIT_MAX_TOKENS tokens
# (more tokens: unsliced). Slices give a few-token step more programs (at one token only 4 of 16 experts have
# work: 256 programs at 16 columns); a third kernel then sums the slices' fp32 partial sums (ACT_BLOCK_I columns
# per program). The op alone in a CUDA graph on the H200 (session 6; 16 experts top-4, hidden 2048, I 1024, bf16;
# BENCHMARKS.md): 1 token 80.8 -> 67.7 us with 4 slices, 4 tokens 145.6 -> 140.4 us, 32 tokens 170.6 -> 189.0 us.
GATE_UP_SPLIT = 4
GATE_UP_SPLIT_MAX_TOKENS = 4
ACT_BLOCK_I = 32
DOWN_BLOCK_D = 64
DOWN_BLOCK_I = 128
DOWN_WARPS = 4
COMBINE_BLOCK_D = 1024  # columns per program of the sum over a token's chosen experts (not timed)


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton path takes


class ExpertTable:
    """One MoE layer's record of its experts' weights: whether they were checked against the inputs, and the
    ``[3, E]`` int64 device table of their addresses (w1, w3, w2) that the kernels read.

    The per-weight checks and the table are redone only when a weight's address (or x's hidden size, dtype or
    device) changes, e.g. after ``model.to``: a decode step then spends no host time on them. A weight replaced
    by a view of another shape or stride at the same address is therefore not checked again: use a new table.
    Building the table copies to the device, which a CUDA-graph capture does not allow: use the layer once
    before capturing (a warm-up step does). Keep one per MoE layer.
    """

    def __init__(self) -> None:
        self._checked: tuple | None = None
        self._table: torch.Tensor | None = None
        self.contiguous = False

    def check(
        self, x: torch.Tensor, w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor], w2: Sequence[torch.Tensor]
    ) -> None:
        """Raise ValueError naming the first weight whose shape, dtype or device does not fit ``x [N, hidden]``."""
        addresses = tuple(w.data_ptr() for group in (w1, w3, w2) for w in group)
        key = (addresses, x.shape[1], x.dtype, x.device)
        if key != self._checked:
            self.contiguous = _check_weights(x, w1, w3, w2)
            self._checked, self._table = key, None

    def pointers(self) -> torch.Tensor:
        """The address table of the weights last passed to :meth:`check`."""
        if self._table is None:
            addresses, _, _, device = self._checked
            self._table = torch.tensor(addresses, dtype=torch.int64).view(3, -1).to(device)
        return self._table


def _check_inputs(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Shapes of :func:`moe_experts`' token arguments (raises ValueError naming the bad one)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, hidden], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if expert_ids.dim() != 2 or expert_ids.shape[0] != n or expert_ids.is_floating_point():
        raise ValueError(f"expert_ids must be an integer [N, k] tensor with N={n}, got {expert_ids.dtype} "
                         f"{tuple(expert_ids.shape)}")  # fmt: skip
    if tuple(weights.shape) != tuple(expert_ids.shape):
        raise ValueError(f"weights must have expert_ids' shape {tuple(expert_ids.shape)}, got {tuple(weights.shape)}")
    if expert_ids.shape[1] == 0:
        raise ValueError("expert_ids must choose at least one expert per token, got k = 0")


def _check_weights(
    x: torch.Tensor, w1: Sequence[torch.Tensor], w3: Sequence[torch.Tensor], w2: Sequence[torch.Tensor]
) -> bool:
    """Shapes, dtypes and devices of the experts' weights against ``x [N, hidden]`` (raises ValueError naming the
    bad one); returns whether all are contiguous."""
    if not len(w1) == len(w3) == len(w2) > 0:
        raise ValueError(f"w1, w3 and w2 must hold one weight per expert, got {len(w1)}, {len(w3)} and {len(w2)}")
    hidden, inter = x.shape[1], w1[0].shape[0]
    for name, group, shape in (("w1", w1, (inter, hidden)), ("w3", w3, (inter, hidden)), ("w2", w2, (hidden, inter))):
        for e, w in enumerate(group):
            if tuple(w.shape) != shape or w.dtype != x.dtype or w.device != x.device:
                raise ValueError(f"{name}[{e}] must be {shape} {x.dtype} on {x.device} (x's hidden size, dtype and "
                                 f"device; the intermediate size of w1[0]), got {tuple(w.shape)} {w.dtype} on "
                                 f"{w.device}")  # fmt: skip
    return all(w.is_contiguous() for group in (w1, w3, w2) for w in group)


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    table: ExpertTable | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * w2[e] (silu(w1[e] x_n) * (w3[e] x_n)), e = expert_ids[n, j].

    Args:
        x: ``[N, hidden]``, N <= ``MAX_TOKENS`` on the Triton path.
        expert_ids: ``[N, k]`` integer, values in ``[0, E)`` (not checked, which would need a host
            synchronisation: an id outside that range adds nothing).
        weights: ``[N, k]`` mixing weights.
        w1, w3: the E experts' gate and up weights, each ``[I, hidden]``; w2: their down weights
            ``[hidden, I]``; x's dtype and device.
        table: the layer's :class:`ExpertTable` (so the weights are checked and their address table built once
            while they stay where they are); None uses a new one.
        backend: ``"triton"``, ``"torch"`` or None (see :func:`kimi_hf.kernels.resolve_backend`).

    Returns:
        ``[N, hidden]`` in x's dtype. The Triton path is inference-only; the torch path is differentiable.
    """
    _check_inputs(x, expert_ids, weights)
    table = table or ExpertTable()
    table.check(x, w1, w3, w2)
    if resolve_backend(backend, x) == "torch":
        return naive_moe_experts(x, expert_ids, weights, w1, w3, w2)
    n, hidden = x.shape
    if n > MAX_TOKENS:
        raise ValueError(f"the Triton moe_experts takes at most {MAX_TOKENS} tokens, got {n}")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton moe_experts takes {TRITON_DTYPES}, got {x.dtype}: use backend='torch'")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, *w1, *w3, *w2)):
        raise ValueError("moe_experts is inference-only: call it under torch.no_grad()")
    num_experts, inter, topk = len(w1), w1[0].shape[0], expert_ids.shape[1]
    if not table.contiguous:
        raise ValueError("moe_experts reads the expert weights in place: they must be contiguous")
    ptrs = table.pointers()
    x, expert_ids, weights = x.contiguous(), expert_ids.contiguous(), weights.contiguous()
    BN = max(16, next_power_of_2(n))
    BJ = next_power_of_2(topk)
    ieee = "ieee" if x.dtype == torch.float32 else "tf32"
    wanted = GATE_UP_SPLIT if n <= GATE_UP_SPLIT_MAX_TOKENS else 1
    split = max(1, min(wanted, cdiv(hidden, GATE_UP_BLOCK_H)))
    per_split = cdiv(cdiv(hidden, split), GATE_UP_BLOCK_H) * GATE_UP_BLOCK_H
    act = x.new_empty(num_experts, n, inter)
    if split > 1:  # the slices' fp32 partial sums
        gate = x.new_empty(split, num_experts, n, inter, dtype=torch.float32)
        up = torch.empty_like(gate)
    else:  # the gate/up kernel writes act itself
        gate = up = act
    moe_gate_up_kernel[(num_experts, cdiv(inter, GATE_UP_BLOCK_I), split)](
        x, expert_ids, weights, ptrs, act, gate, up, n, num_experts, hidden, inter, per_split,
        TOPK=topk, BN=BN, BJ=BJ, BI=GATE_UP_BLOCK_I, BH=GATE_UP_BLOCK_H, SPLIT=split, IEEE=ieee,
        num_warps=GATE_UP_WARPS,
    )  # fmt: skip
    if split > 1:
        moe_act_kernel[(num_experts, cdiv(inter, ACT_BLOCK_I))](
            gate, up, expert_ids, weights, act, n, num_experts, inter,
            TOPK=topk, BN=BN, BJ=BJ, BI=ACT_BLOCK_I, SPLIT=split,
        )  # fmt: skip
    partial = x.new_empty(num_experts, n, hidden, dtype=torch.float32)
    moe_down_kernel[(num_experts, cdiv(hidden, DOWN_BLOCK_D))](
        act, expert_ids, weights, ptrs, partial, n, num_experts, hidden, inter,
        TOPK=topk, BN=BN, BJ=BJ, BD=DOWN_BLOCK_D, BI=DOWN_BLOCK_I, IEEE=ieee, num_warps=DOWN_WARPS,
    )  # fmt: skip
    # The chosen experts' partial sums in one launch (a sum over all E and a cast took two, and read every expert's)
    out = torch.empty_like(x)
    moe_combine_kernel[(n, cdiv(hidden, COMBINE_BLOCK_D))](
        partial, expert_ids, out, n, num_experts, hidden, TOPK=topk, BJ=BJ, BD=COMBINE_BLOCK_D,
    )  # fmt: skip
    return out


ROUTER_ACTIVATIONS = ("sigmoid", "softmax")


def moe_route(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    activation: str = "sigmoid",
    renormalize: bool = True,
    scaling: float = 1.0,
    shared_expert: int | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of a few tokens: on the Triton path one launch, where the torch formula takes about ten (a
    decode step is bound by its launches).

    Args:
        logits: ``[N, E]`` router logits; N <= ``MAX_TOKENS`` and float32 on the Triton path.
        top_k: experts per token, in ``[1, E]``.
        bias: ``[E]`` selection-only correction added to the scores before the top-k (DeepSeek-V3's
            ``e_score_correction_bias``), or None.
        activation: ``"sigmoid"`` or ``"softmax"``, from logits to scores.
        renormalize: divide the chosen scores by their sum (+1e-20).
        scaling: factor on the mixing weights (``routed_scaling_factor``).
        shared_expert: an expert id that every token also takes with weight 1, as a last column: a shared expert
            run by :func:`moe_experts` with the routed ones.
        num_groups, topk_groups: grouped top-k (DeepSeek-V3): with ``num_groups`` > 1 equal groups of experts, only
            the ``topk_groups`` groups with the best sum of their two best biased scores are chosen from (so
            ``top_k`` must be at most ``topk_groups * E / num_groups``). Torch path only.
        backend: ``"triton"``, ``"torch"`` or None (see :func:`kimi_hf.kernels.resolve_backend`).

    Returns:
        expert ids ``[N, k (+1)]`` int64, by decreasing biased score, and mixing weights ``[N, k (+1)]``. Ties go to
        the lowest id on the Triton path (torch.topk does not specify its order). The Triton path is
        inference-only; the torch path (:func:`naive_moe_route`) is differentiable.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got shape {tuple(logits.shape)}")
    n, num_experts = logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E={num_experts}], got {top_k!r}")
    if activation not in ROUTER_ACTIVATIONS:
        raise ValueError(f"activation must be one of {ROUTER_ACTIVATIONS}, got {activation!r}")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"bias must be [E] = ({num_experts},), got shape {tuple(bias.shape)}")
    if num_groups < 1 or num_experts % num_groups or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"grouped top-k needs num_groups dividing E={num_experts} and topk_groups in [1, num_groups], "
                         f"got num_groups={num_groups}, topk_groups={topk_groups}")  # fmt: skip
    reachable = topk_groups * (num_experts // num_groups)
    if top_k > reachable:
        # Past the kept groups' experts topk would pick masked (-inf) ones from dropped groups: arbitrary experts
        # with their real scores as weights, silently (the model's config refuses this; a direct call did not).
        raise ValueError(f"top_k={top_k} exceeds the {reachable} experts of the topk_groups={topk_groups} kept groups "
                         f"of {num_experts // num_groups} (num_groups={num_groups}, E={num_experts})")  # fmt: skip
    if resolve_backend(backend, logits) == "torch":
        return naive_moe_route(
            logits, top_k, bias, activation, renormalize, scaling, shared_expert, num_groups, topk_groups
        )
    if num_groups > 1:
        raise ValueError(f"the Triton moe_route has no grouped top-k, got num_groups={num_groups}: use backend='torch'")
    if n > MAX_TOKENS:
        raise ValueError(f"the Triton moe_route takes at most {MAX_TOKENS} tokens, got {n}")
    if logits.dtype != torch.float32:
        raise ValueError(f"the Triton moe_route takes float32 logits, got {logits.dtype}: use backend='torch'")
    if torch.is_grad_enabled() and logits.requires_grad:
        raise ValueError("the Triton moe_route is inference-only: call it under torch.no_grad()")
    k_out = top_k + (shared_expert is not None)
    logits = logits.contiguous()
    expert_ids = logits.new_empty(n, k_out, dtype=torch.int64)
    weights = logits.new_empty(n, k_out)
    moe_route_kernel[(n,)](
        logits, logits if bias is None else bias.contiguous(), expert_ids, weights, num_experts, float(scaling),
        -1 if shared_expert is None else int(shared_expert),
        TOPK=top_k, K_OUT=k_out, BE=next_power_of_2(num_experts), BJ=next_power_of_2(k_out),
        SOFTMAX=activation == "softmax", HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize),
    )  # fmt: skip
    return expert_ids, weights
