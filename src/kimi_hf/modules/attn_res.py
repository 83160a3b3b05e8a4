"""Attention Residuals (arXiv 2603.15031) as a drop-in replacement of the residual stream of any decoder.

Every attention sublayer and every MLP/MoE sublayer is one "layer" (L = 2 * num_hidden_layers sublayers).
Sources: v_0 = token embedding, v_i = raw output of sublayer i. With ``mode="block"`` and S sublayers per
block, b_0 = embedding and b_n = sum of the raw outputs of block n; sublayer l of block n reads

    h_l = sum_i softmax_i(w_l . RMSNorm_l(v_i)) v_i   over v in [b_0 .. b_{n-1}] (+ partial sum of block n)

with a zero-initialised pseudo-query w_l [D] and a gain-only RMSNorm per sublayer (no 1/sqrt(D)). The final
output aggregates all block representations with its own pseudo-query and norm. ``mode="full"`` is block
size 1; ``mode="standard"`` is the usual residual stream (same loop, no parameters).

Usage in any decoder loop (each sublayer keeps its own PreNorm: out = f(norm(h))):

    attn_res = AttentionResiduals(hidden_size, num_sublayers=2 * num_layers, mode="block", block_size=8)
    state = attn_res.begin(inputs_embeds)                 # [B, T, D]
    for layer in layers:
        h = attn_res.sublayer_input(state)                # input of the attention sublayer
        state = attn_res.add_sublayer_output(state, layer.attn(layer.attn_norm(h)))
        h = attn_res.sublayer_input(state)                # input of the MLP sublayer
        state = attn_res.add_sublayer_output(state, layer.mlp(layer.mlp_norm(h)))
    hidden = final_norm(attn_res.final_output(state))     # then the LM head

From token ids, ``state, inputs_embeds = attn_res.begin_from_ids(embed_tokens, input_ids)`` does the embedding
lookup and ``begin`` in one; on the inference path it gathers the embeddings straight into the source store.

Weight-only RMSNorms (transformers' ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``) can be fused instead
of called, which on the Triton path also avoids storing h (recomputed in backward):

        x = attn_res.sublayer_input(state, layer.attn_norm.weight, layer.attn_norm.variance_epsilon)
        state = attn_res.add_sublayer_output(state, layer.attn(x))
    hidden = attn_res.final_output(state, final_norm.weight, final_norm.variance_epsilon)

``AttnResState`` is immutable (each call returns a new one), so a decoder layer that takes a state and
returns a state can be re-run by non-reentrant gradient checkpointing (reentrant checkpointing only
tracks tensor arguments: not supported), and an older state can be read again. One exception: on the Triton
backend, states branched from one state (two candidate outputs of one sublayer) must not both end a block: they
write the same slot of the forward's shared source store.

In your own ``PreTrainedModel``, initialise it in ``_init_weights`` (transformers' default leaves unknown modules
alone, so ``from_pretrained`` of a checkpoint without AttnRes would keep uninitialised memory in its parameters):

    if isinstance(module, AttentionResiduals):
        module.reset_parameters()

Under ``torch.no_grad()`` with ``two_phase=True`` (the default) the inference path runs, chosen once by
``begin``: at the first sublayer of a block, phase 1 scores all of the block's pseudo-queries against the
completed blocks in one pass (the last block's, the final aggregation's query too); each sublayer then merges its
running partial sum by online softmax (exact). A sublayer's output is not added when it is recorded but by the next
read, in the same kernel: the partial sum's update by phase 2, a finished block's store by the next block's phase 1
(standard mode: the addition by the next PreNorm). So every sublayer costs one launch on the Triton backend, in all
three modes. The first block's phase 1, over the embedding alone, scores no query: its output is the embedding,
whose score each phase 2 takes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from kimi_hf.kernels import resolve_backend
from kimi_hf.kernels.attn_res import (
    SourceBank,
    add_prenorm,
    append_source,
    append_source_phase1,
    depth_attention,
    depth_attention_phase1,
    depth_attention_phase2,
    depth_attention_phase2_add,
    new_source_bank,
    prenorm,
)

RESIDUAL_MODES = ("standard", "full", "block")


@dataclass(frozen=True)
class AttnResState:
    """Residual state between sublayers of one forward pass (immutable; build it with ``begin``).

    Attributes:
        sublayer: index of the next sublayer to run (0..L).
        partial: standard mode: the residual stream; block mode: the partial sum of the running block
            (None at the start of a block).
        bank: completed sources (embedding + finished blocks); None in standard mode.
        pending: inference path only: the output of the last sublayer (at sublayer 0 the embedding), not yet
            added to ``partial`` or stored in ``bank``: the next read does it in its own kernel.
        cache: inference path only, shared by the states of one forward: the running block's phase 1
            ("phase1": (the block's first sublayer, its bank, out, lse)) and, per sublayer read, the partial sum and
            bank with ``pending`` folded in (taken by ``add_sublayer_output``, so that each lives only as long as the
            eager path's would), under the (partial, pending, bank) they were folded from: states are immutable, so
            an older state read again, or two states branched from one, must not get another state's entries.
        rows: when gradients are needed, (pseudo-queries, key-norm gains) unbound once into per-sublayer
            rows [D]: one backward node gathers all their gradients (indexing each sublayer's row would
            cost a zero-filled [L + 1, D] gradient and an accumulation per sublayer).
    """

    sublayer: int
    partial: torch.Tensor | None
    bank: SourceBank | None = None
    pending: torch.Tensor | None = None
    cache: dict | None = field(default=None, compare=False, repr=False)
    rows: tuple | None = field(default=None, compare=False, repr=False)

    @property
    def inference(self) -> bool:
        """Whether this forward runs the inference path (outputs are added by the next read)."""
        return self.cache is not None


def _in_bank_dtype(state: AttnResState, output: torch.Tensor) -> torch.Tensor:
    """The first output of a block as its running sum: in the bank's dtype where that is wider (fp32 sources, bf16
    outputs under autocast), so that the block's sum is not rounded to the outputs' dtype."""
    return output.to(torch.promote_types(state.bank.dtype, output.dtype))


def _fold_key(state: AttnResState) -> tuple:
    """What an inference read folds (compared by identity): the partial sum, the pending output and the bank."""
    return (state.partial, state.pending, state.bank)


def _cached_fold(state: AttnResState, index: int) -> tuple | None:
    """(partial sum, bank) cached by an earlier read of sublayer ``index`` of this very state, else None."""
    entry = state.cache.get(index)
    if entry is None or any(a is not b for a, b in zip(entry[0], _fold_key(state))):
        return None
    return entry[1:]


def _plain_embedding(module: nn.Module) -> bool:
    """Whether ``module(ids)`` is exactly ``module.weight[ids]``: an ``nn.Embedding`` itself (not a subclass or a
    wrapper such as PEFT's), with no ``max_norm`` (which renormalises the weight's rows in place), whose forward
    nothing intercepts: no hooks of its own or global ones, no forward set on the instance (accelerate's device and
    offload hooks replace it so)."""
    from torch.nn.modules import module as torch_module

    return (
        type(module) is nn.Embedding
        and module.max_norm is None
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
        and "forward" not in vars(module)
    )


class AttentionResiduals(nn.Module):
    """Pseudo-queries and key norms of all sublayers of one decoder, plus the bookkeeping of the sources.

    Parameters (block/full modes): ``queries`` [L + 1, D] (zeros) and ``norm_weight`` [L + 1, D] (ones);
    row L belongs to the final aggregation.

    Args:
        hidden_size: D.
        num_sublayers: L (attention + MLP sublayers).
        mode: "standard", "full" or "block".
        block_size: sublayers per block (mode "block"); the last block takes the remainder.
        eps: epsilon of the key RMSNorm.
        two_phase: run the inference path when no gradient is needed (two-phase depth attention, and each
            sublayer's output added by the next read's kernel; standard mode: addition fused into the PreNorm).
        backend: kernel backend ("triton", "torch" or None = :func:`kimi_hf.kernels.resolve_backend`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_sublayers: int,
        mode: str = "block",
        block_size: int | None = 8,
        eps: float = 1e-6,
        two_phase: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in RESIDUAL_MODES:
            raise ValueError(f"unknown residual mode {mode!r}: expected one of {RESIDUAL_MODES}")
        if num_sublayers < 1:
            raise ValueError(f"num_sublayers must be >= 1, got {num_sublayers}")
        if mode == "full":
            block_size = 1
        # (a bool is an int to isinstance: block_size=True would silently mean Full AttnRes)
        valid = isinstance(block_size, int) and not isinstance(block_size, bool)
        if mode == "block" and (not valid or not 1 <= block_size <= num_sublayers):
            raise ValueError(
                f"block_size must be an int in [1, num_sublayers = {num_sublayers}] (sublayers per block; "
                f"{num_sublayers} is one block), got {block_size!r}"
            )
        self.hidden_size = hidden_size
        self.num_sublayers = num_sublayers
        self.mode = mode
        self.block_size = block_size if mode != "standard" else None
        self.eps = eps
        self.two_phase = two_phase
        self.backend = backend
        if mode != "standard":
            self.num_blocks = -(-num_sublayers // block_size)
            self.queries = nn.Parameter(torch.zeros(num_sublayers + 1, hidden_size))
            self.norm_weight = nn.Parameter(torch.ones(num_sublayers + 1, hidden_size))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_sublayers={self.num_sublayers}, block_size={self.block_size}, eps={self.eps}"

    def reset_parameters(self) -> None:
        """Paper initialisation: zero pseudo-queries (uniform average over the sources), unit key-norm gains."""
        if self.mode != "standard":
            nn.init.zeros_(self.queries)
            nn.init.ones_(self.norm_weight)

    def _inference(self) -> bool:
        """Whether a forward begun now runs the inference path."""
        return self.two_phase and not torch.is_grad_enabled()

    def begin(self, embeddings: torch.Tensor) -> AttnResState:
        """State before sublayer 0; ``embeddings`` [B, T, D] is v_0.

        Chooses the path of the whole forward: the inference path when ``two_phase`` is set and no gradient is
        needed (``torch.no_grad()``), else the differentiable one.
        """
        if embeddings.shape[-1] != self.hidden_size:
            raise ValueError(f"embeddings have size {embeddings.shape[-1]}, expected hidden size {self.hidden_size}")
        bank = None
        if self.mode != "standard":
            bank = new_source_bank(self.num_blocks + 1, embeddings, self.eps, self.backend)
        if self._inference():
            return AttnResState(sublayer=0, partial=None, bank=bank, pending=embeddings, cache={})
        if self.mode == "standard":
            return AttnResState(sublayer=0, partial=embeddings)
        rows = None
        if torch.is_grad_enabled() and (self.queries.requires_grad or self.norm_weight.requires_grad):
            rows = (self.queries.unbind(0), self.norm_weight.unbind(0))
        return AttnResState(sublayer=0, partial=None, bank=append_source(bank, embeddings), rows=rows)

    def begin_from_ids(self, embed_tokens: nn.Module, input_ids: torch.Tensor) -> tuple[AttnResState, torch.Tensor]:
        """``begin(embed_tokens(input_ids))``, and those embeddings [B, T, D].

        On the inference path of a Triton source bank, a plain ``nn.Embedding`` (``_plain_embedding``) gathers
        its rows straight into the bank's slot of v_0, which the first block boundary then reads in place instead
        of storing a copy: one [B, T, D] write less per forward. The embeddings returned are that slot's view.
        """
        direct = self.mode != "standard" and self._inference() and _plain_embedding(embed_tokens)
        weight = embed_tokens.weight if direct else None
        if not (
            direct
            and weight.shape[-1] == self.hidden_size
            and input_ids.device == weight.device
            and resolve_backend(self.backend, weight) == "triton"  # (the bank's: begin's embeddings have its device)
        ):
            embeddings = embed_tokens(input_ids)
            return self.begin(embeddings), embeddings
        like = weight.new_empty(()).expand(*input_ids.shape, weight.shape[-1])  # (no memory: a shape, a dtype)
        bank = new_source_bank(self.num_blocks + 1, like, self.eps, self.backend)
        slot = bank.storage.store[0]
        torch.index_select(weight, 0, input_ids.reshape(-1), out=slot)
        embeddings = slot.view(like.shape)
        return AttnResState(sublayer=0, partial=None, bank=bank, pending=embeddings, cache={}), embeddings

    def _query_gain(self, state: AttnResState, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-query and key-norm gain [D] of sublayer ``index`` (L: the final aggregation)."""
        if state.rows is not None:
            return state.rows[0][index], state.rows[1][index]
        return self.queries[index], self.norm_weight[index]

    def _check_running(self, state: AttnResState) -> int:
        if not 0 <= state.sublayer < self.num_sublayers:
            raise ValueError(f"all {self.num_sublayers} sublayers have run (state at sublayer {state.sublayer})")
        return state.sublayer

    def sublayer_input(
        self, state: AttnResState, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6
    ) -> torch.Tensor:
        """h_l [B, T, D], the input of the next sublayer.

        With ``norm_weight`` [D] (the sublayer's weight-only RMSNorm) it returns the PreNorm of h_l,
        ``norm_weight * (h * rsqrt(mean(h^2) + norm_eps)).to(h.dtype)``: on the Triton training path the norm
        is fused and h_l is recomputed in backward instead of stored (saves one [B, T, D] per sublayer).
        In standard mode the norm is :func:`~kimi_hf.kernels.attn_res.prenorm` (one Triton kernel on that
        backend), so that the baseline gets a fused PreNorm too.
        """
        sub = self._check_running(state)
        if state.inference:
            return self._inference_read(state, sub, norm_weight, norm_eps)
        if self.mode == "standard":
            h = state.partial
            return prenorm(h, norm_weight, norm_eps, self.backend) if norm_weight is not None else h
        return depth_attention(state.bank, *self._query_gain(state, sub), state.partial, norm_weight, norm_eps)

    def _inference_read(
        self, state: AttnResState, index: int, norm_weight: torch.Tensor | None, norm_eps: float
    ) -> torch.Tensor:
        """Inference: the input of sublayer ``index`` (L: the final aggregation), with ``state.pending`` folded
        into the partial sum or the bank by the same kernel; the folded state goes to ``state.cache[index]``.
        A second read of one state (e.g. ``output_hidden_states`` before the layer's own) reuses the fold."""
        # The inference kernels are not differentiable; without this check, a forward begun under no_grad whose
        # upper sublayers run with gradients (frozen lower layers) failed inside a kernel op saying to use no_grad.
        # (Standard mode without a fused norm is a plain, differentiable addition.)
        if torch.is_grad_enabled() and (self.mode != "standard" or norm_weight is not None):
            params = (self.queries, self.norm_weight) if self.mode != "standard" else ()
            if any(t is not None and t.requires_grad for t in (state.partial, state.pending, norm_weight, *params)):
                what = f"sublayer {index}" if index < self.num_sublayers else "the final output"
                raise ValueError(
                    f"{what} needs gradients, but this forward's begin() ran under torch.no_grad(), which "
                    "chose the inference-only two-phase path for the whole forward: call begin() with gradients "
                    "enabled (or set two_phase=False)"
                )
        folded = _cached_fold(state, index)
        if self.mode == "standard":
            if folded is not None or state.partial is None:
                h = folded[0] if folded is not None else state.pending
                x = prenorm(h, norm_weight, norm_eps, self.backend) if norm_weight is not None else h
            elif norm_weight is not None:
                h, x = add_prenorm(state.partial, state.pending, norm_weight, norm_eps, self.backend)
            else:
                h = x = state.partial + state.pending
            state.cache[index] = (_fold_key(state), h, None)
            return x
        query, gain = self.queries[index], self.norm_weight[index]
        start = self._block_start(index)  # first query of this read's phase 1
        pos = index - start
        boundary = pos == 0
        if boundary and folded is None:  # a block boundary: the finished block (or v_0) is stored
            stop = self._phase1_stop(start)
            summands = (state.pending, None) if state.partial is None else (state.partial, state.pending)
            # With the PreNorm fused, query 0's raw output is not written (a repeated read recomputes it, below)
            first_out = norm_weight is None
            # Over v_0 alone no query is scored: each one's lse is v_0's own score, which its phase 2 computes
            scores = state.bank.num_sources > 0
            bank, out, lse, x = append_source_phase1(
                state.bank, *summands, self.queries[start:stop], self.norm_weight[start:stop], norm_weight, norm_eps,
                first_out, scores=scores,
            )  # fmt: skip
            if not first_out:
                out = (None, *out.unbind(0))  # indexed by query as the full out is
            if not scores:
                lse = (None,) * (stop - start)
            cached = state.cache.get("phase1")
            if cached is None or cached[0] <= start:  # an older state's re-read keeps the running block's
                state.cache["phase1"] = (start, bank, out, lse)  # the running block's: replaced at the next boundary
            state.cache[index] = (_fold_key(state), None, bank)
            return x if norm_weight is not None else out[0]
        out, lse = self._phase1(state, start, folded[1] if folded is not None else state.bank)
        if boundary:
            # a repeated read of a block's first sublayer: its input is query 0's output
            if out[0] is None:
                out, lse = depth_attention_phase1(folded[1], query[None], gain[None])
            return depth_attention_phase2(
                out[0], lse[0], None, query, gain, self.eps, self.backend, norm_weight, norm_eps
            )
        # The final aggregation merges the last block's sum without keeping it: no read follows (nothing is cached
        # for it, so a repeated read of the final output runs it again)
        final = index == self.num_sublayers
        if folded is not None or state.partial is None:
            # a repeated read, or the block's second sublayer, whose partial sum is the first one's output
            partial = folded[0] if folded is not None else _in_bank_dtype(state, state.pending)
            x = depth_attention_phase2(
                out[pos], lse[pos], partial, query, gain, self.eps, self.backend, norm_weight, norm_eps
            )
        else:
            x, partial = depth_attention_phase2_add(
                out[pos], lse[pos], state.partial, state.pending, query, gain, self.eps, self.backend,
                norm_weight, norm_eps, keep_sum=not final,
            )  # fmt: skip
        if not final:
            state.cache[index] = (_fold_key(state), partial, state.bank)
        return x

    def _block_start(self, index: int) -> int:
        """First sublayer of the block of sublayer ``index``; the final aggregation (L) belongs to the last block,
        whose phase 1 scores its query too (``_phase1_stop``): it then merges that block's sum in phase 2 instead
        of storing it and reading all the sources again."""
        return min(index, self.num_sublayers - 1) // self.block_size * self.block_size

    def _phase1_stop(self, start: int) -> int:
        """End (exclusive) of the pseudo-query rows phase 1 scores for the block starting at sublayer ``start``:
        the last block's include the final aggregation's (row L)."""
        stop = min(start + self.block_size, self.num_sublayers)
        return stop + 1 if stop == self.num_sublayers else stop

    def _phase1(self, state: AttnResState, start: int, bank: SourceBank) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 1 (out [Q, B, T, D], lse [Q, B, T]) of the block starting at sublayer ``start``, whose completed
        sources are ``bank``: the cached one of the running block, or, for an older state of this forward read
        again after a later block began (states are immutable, so that must give its first answer) or a state of
        another branch, recomputed without replacing the cache (it holds one block's, which the running one needs).
        The cached out may be a tuple of per-query [B, T, D] whose query 0 is None (not written: the block boundary
        returned only its PreNorm), and the first block's lse a tuple of None (not scored: phase 2 scores v_0)."""
        cached = state.cache.get("phase1")
        if cached is not None and cached[0] == start and cached[1] is bank:
            return cached[2], cached[3]
        stop = self._phase1_stop(start)
        return depth_attention_phase1(bank, self.queries[start:stop], self.norm_weight[start:stop])

    def add_sublayer_output(self, state: AttnResState, output: torch.Tensor) -> AttnResState:
        """Record the raw output [B, T, D] of the sublayer that just ran; returns the next state."""
        sub = self._check_running(state)
        # Checked here, where the culprit is known: a broadcastable output ([B, 1, D], [D]) would otherwise be summed
        # into the residual stream or a block's partial sum silently, and another one fail in a later read.
        if state.bank is not None:
            expected = state.bank.shape
        else:  # standard mode: the stream (on the inference path at sublayer 0, the still pending embeddings)
            expected = (state.partial if state.partial is not None else state.pending).shape
        if tuple(output.shape) != tuple(expected):
            raise ValueError(
                f"sublayer {sub}'s output has shape {tuple(output.shape)}, expected the embeddings' {tuple(expected)}"
            )
        if state.inference:
            if _cached_fold(state, sub) is None:  # the sublayer never read its input: fold the pending output now
                self._inference_read(state, sub, None, 1e-6)
            partial, bank = state.cache.pop(sub)[1:]
            return replace(state, sublayer=sub + 1, partial=partial, bank=bank, pending=output)
        if self.mode == "standard":
            return replace(state, sublayer=sub + 1, partial=state.partial + output)
        ends_block = (sub + 1) % self.block_size == 0 or sub + 1 == self.num_sublayers
        if not ends_block:
            partial = _in_bank_dtype(state, output) if state.partial is None else state.partial + output
            return replace(state, sublayer=sub + 1, partial=partial)
        if state.partial is None:
            bank = append_source(state.bank, output)
        else:
            bank = append_source(state.bank, state.partial, output)
        return replace(state, sublayer=sub + 1, partial=None, bank=bank)

    def final_output(
        self, state: AttnResState, norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6
    ) -> torch.Tensor:
        """Aggregate of all block representations [B, T, D]; needs all L sublayers run.

        With ``norm_weight`` the final norm is applied (fused on the Triton path), as in ``sublayer_input``.
        """
        if state.sublayer != self.num_sublayers:
            raise ValueError(f"final_output needs all {self.num_sublayers} sublayers run, state is at {state.sublayer}")
        if state.inference:
            return self._inference_read(state, self.num_sublayers, norm_weight, norm_eps)
        if self.mode == "standard":
            h = state.partial
            return prenorm(h, norm_weight, norm_eps, self.backend) if norm_weight is not None else h
        last = self.num_sublayers
        return depth_attention(state.bank, *self._query_gain(state, last), None, norm_weight, norm_eps)
