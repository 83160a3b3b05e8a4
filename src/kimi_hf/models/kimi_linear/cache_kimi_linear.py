"""The hybrid generation caches of Kimi Linear.

Per KDA layer a cache holds the short-convolution states of q, k and v (``[B, D, W]`` each: the last W
inputs) and the recurrent state ``[B, H, K, V]`` (fp32); per MLA layer the *compressed* latent
KV: the normalised latent ``[B, S, kv_lora_rank]`` and the shared rope key ``[B, S, qk_rope_head_dim]``
(the official remote code keeps the expanded per-head keys and values instead: 2 * H * 128 numbers
per token against 576 here).

:class:`KimiLinearCache` grows with the sequence. :class:`KimiLinearStaticCache` preallocates the MLA
latents for ``max_cache_len`` positions and keeps every tensor at a fixed address, which is what a CUDA
graph needs: on CUDA it captures the one-token decode step once and replays it for every later token.

The classes implement what ``generate()`` asks of a cache (sequence length, beam reordering, batch
expansion and selection) without depending on ``transformers.Cache``'s constructor, which changed
between the transformers versions we support.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .configuration_kimi_linear import KimiLinearConfig

if TYPE_CHECKING:
    from .modeling_kimi_linear import KimiLinearForCausalLM

ConvStates = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _cache_layout(config: KimiLinearConfig) -> dict[str, object]:
    """What a cache's entries depend on: which layers are KDA or MLA and the shapes of their states."""
    return {
        "layer_types": tuple(config.layer_types),
        "kda heads": config.linear_num_heads,
        "kda head_dim": config.linear_head_dim,
        "conv kernel size": config.linear_conv_kernel_size,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
    }


class KimiLinearCache:
    """Generation cache for :class:`~kimi_hf.KimiLinearForCausalLM` that grows with the sequence.

    Args:
        config: the model's config (decides which layers are KDA and which MLA).

    Layers fill their entries lazily on their first forward; ``seen_tokens`` counts the positions
    (padding included) that went through the model, and is advanced by the model after each forward.
    """

    is_compileable = False
    is_croppable = False  # recurrent states cannot go back to an earlier position (transformers reads this)

    def __init__(self, config: KimiLinearConfig) -> None:
        self.layer_types = config.layer_types
        self.layout = _cache_layout(config)
        self._config = config  # the config it was built for: check_config's common case, without recomputing
        n = config.num_hidden_layers
        self.conv_states: list[ConvStates | None] = [None] * n
        self.recurrent_states: list[torch.Tensor | None] = [None] * n
        self.latents: list[torch.Tensor | None] = [None] * n
        self.rope_keys: list[torch.Tensor | None] = [None] * n
        self.seen_tokens = 0
        self.held: tuple[torch.device, torch.dtype] | None = None  # device and activation dtype of the states

    # ------------------------------------------------------------------ per forward (called by the model)
    def check_config(self, config: KimiLinearConfig) -> None:
        """Raise if this cache was built for a model whose layers or state shapes differ from ``config``'s."""
        if config is self._config:
            return
        layout = _cache_layout(config)
        if layout != self.layout:
            differ = [
                f"{name} {self.layout[name]!r} in the cache, {value!r} in the model"
                for name, value in layout.items()
                if self.layout[name] != value
            ]
            raise ValueError(f"this cache was built for another model configuration: {'; '.join(differ)}")

    def begin_forward(
        self, batch: int, seq_len: int, new_tokens_mask: torch.Tensor | None, device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Called once per forward before the layers, with the batch's size, device and activation dtype; a
        static cache returns the MLA mask (None here: the model builds it from the attention mask).

        Raises ``ValueError`` when a filled cache meets another device or dtype (e.g. the model was cast after the
        prompt): its states would mix dtypes in the next layer."""
        if self.seen_tokens and self.held != (device, dtype):
            raise ValueError(
                f"this KimiLinearCache holds states on {self.held[0]} in {self.held[1]}, got activations on {device} "
                f"in {dtype}; call reset() (or use a new cache) after moving or casting the model"
            )
        rows = self._rows() if self.seen_tokens else None
        if rows is not None and rows != batch:
            # Checked here, by name: a layer would fail later on a shape ("the conv state must be [N, D, W]").
            raise ValueError(
                f"this KimiLinearCache holds {rows} rows, got a batch of {batch}: generate() repeats the prompt for "
                f"num_beams / num_return_sequences but not a cache passed in, and beam search leaves batch * num_beams "
                f"rows in its cache; pass a fresh cache, or pick its rows with batch_select_indices / "
                f"batch_repeat_interleave"
            )
        self.held = (device, dtype)
        return None

    def _rows(self) -> int | None:
        """Batch rows of the states held (None before the first forward)."""
        for states in (self.recurrent_states, self.latents):
            for state in states:
                if state is not None:
                    return state.shape[0]
        return None

    def end_forward(self, seq_len: int) -> None:
        self.seen_tokens += seq_len

    # ------------------------------------------------------------------ KDA
    def kda_states(self, layer_idx: int) -> tuple[ConvStates, torch.Tensor] | None:
        """The conv states and recurrent state of a KDA layer, or None before the layer's first forward."""
        if self.recurrent_states[layer_idx] is None:
            return None
        return self.conv_states[layer_idx], self.recurrent_states[layer_idx]

    def update_kda(self, layer_idx: int, conv_states: ConvStates, recurrent_state: torch.Tensor) -> None:
        self.conv_states[layer_idx] = conv_states
        self.recurrent_states[layer_idx] = recurrent_state

    # ------------------------------------------------------------------ MLA
    def update_latents(
        self, layer_idx: int, latent: torch.Tensor, rope_key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``latent [B, T, R]`` and ``rope_key [B, T, P]``; return the whole cached sequences."""
        if self.latents[layer_idx] is None:
            self.latents[layer_idx], self.rope_keys[layer_idx] = latent, rope_key
        else:
            self.latents[layer_idx] = torch.cat([self.latents[layer_idx], latent], dim=1)
            self.rope_keys[layer_idx] = torch.cat([self.rope_keys[layer_idx], rope_key], dim=1)
        return self.latents[layer_idx], self.rope_keys[layer_idx]

    # ------------------------------------------------------------------ generate() protocol
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # dynamic: grows without bound

    def __len__(self) -> int:
        return len(self.layer_types)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: False, also for KDA layers. transformers' ``generate`` reads ``all(cache.is_linear)`` as "this
        cache does not count positions" (its linear-attention layers keep none) and then feeds a continued prompt
        whole instead of cutting it at ``get_seq_length()``. This cache counts the positions of every layer
        (``seen_tokens``), so a model of KDA layers only must be cut as a hybrid one is (reporting its layers as
        linear re-fed the cached prompt into the recurrent states: wrong tokens, silently). Which layers are KDA:
        ``layer_types``."""
        return [False] * len(self.layer_types)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for i in range(len(self.layer_types)):
            if self.conv_states[i] is not None:
                self.conv_states[i] = tuple(self._replace(s, fn(s)) for s in self.conv_states[i])
            for states in (self.recurrent_states, self.latents, self.rope_keys):
                if states[i] is not None:
                    states[i] = self._replace(states[i], fn(states[i]))

    def _replace(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return new

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep, for each new row, the state of row ``beam_idx[row]``."""
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def reset(self) -> None:
        n = len(self.layer_types)
        self.conv_states = [None] * n
        self.recurrent_states = [None] * n
        self.latents = [None] * n
        self.rope_keys = [None] * n
        self.seen_tokens = 0


class KimiLinearStaticCache(KimiLinearCache):
    """Cache of fixed size and fixed tensor addresses, for CUDA-graph decoding.

    ``generate(..., cache_implementation="static")`` builds one per call; or pass one to ``generate``
    (``past_key_values=`` / ``cache=``) with ``max_cache_len`` >= prompt + new tokens, and ``reset()`` it between
    calls to keep its captured graph::

        cache = KimiLinearStaticCache(model.config, max_cache_len=prompt_len + max_new_tokens)
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, past_key_values=cache)

    On CUDA (``cuda_graphs=True``) the first one-token step runs eagerly on a side stream (it compiles the
    kernels), the second captures the step into a CUDA graph, and every later step replays it: one launch per
    token instead of hundreds. A decode step treats its token as real (as ``generate`` does) and cannot return
    hidden states or router logits; such calls, prefill, autograd and CPU run the eager path, which computes
    the same as :class:`KimiLinearCache`. ``reset()`` clears the cache for a new prompt of the same batch size
    and keeps the graph (its tensors stay where they are); a new batch size re-allocates and re-captures.

    Args:
        config: the model's config.
        max_cache_len: positions the MLA layers can hold (prompt, padding included, plus generated tokens).
        cuda_graphs: capture and replay decode steps on CUDA.
    """

    def __init__(self, config: KimiLinearConfig, max_cache_len: int, cuda_graphs: bool = True) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        super().__init__(config)
        self.max_cache_len = max_cache_len
        self.cuda_graphs = cuda_graphs
        self.key_mask: torch.Tensor | None = None  # [B, max_cache_len] bool: written real positions
        self.position: torch.Tensor | None = None  # [1] int64 on the device: next position to write
        self._positions: torch.Tensor | None = None  # [T] positions of the current forward
        self.dtype: torch.dtype | None = None  # the activations' dtype the layer buffers were allocated in
        self._decode_graph: DecodeGraph | None = None
        # Until a one-token step of this prompt is all real, the model checks each step's mask before replaying the
        # graph, which takes its token as real (KimiLinearForCausalLM._replays_decode_graph)
        self.steps_may_be_padding = True

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def begin_forward(
        self, batch: int, seq_len: int, new_tokens_mask: torch.Tensor | None, device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Record the new positions; returns the MLA mask ``[B, 1, T, max_cache_len]`` (True = attend).

        Without host synchronisation (it runs inside the captured decode step). ``new_tokens_mask [B, T]``
        marks the real new tokens (None: all real). A new batch size, device or dtype (e.g. after
        ``model.to(torch.bfloat16)``) re-allocates the buffers of an empty cache.
        """
        self.check_room(seq_len)
        held = None if self.key_mask is None else (self.key_mask.shape[0], self.key_mask.device, self.dtype)
        if held != (batch, device, dtype):
            if self.seen_tokens:
                raise ValueError(
                    f"this KimiLinearStaticCache holds batch size {held[0]} on {held[1]} in {held[2]}, got batch "
                    f"{batch} on {device} in {dtype}; call reset() first"
                )
            self._allocate(batch, device)
            self.dtype = dtype
        if self.seen_tokens == 0:
            self.key_mask.zero_()
            self.position.zero_()
        positions = self.position + torch.arange(seq_len, device=device)
        if new_tokens_mask is None:
            new_tokens_mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        self.key_mask.index_copy_(1, positions, new_tokens_mask.to(torch.bool))
        self._positions = positions
        keys = torch.arange(self.max_cache_len, device=device)
        causal = keys[None, :] <= positions[:, None]  # [T, S]
        # A padding query attends to itself only, so that its softmax stays finite (never read by real tokens).
        mask = (self.key_mask[:, None, :] & causal) | (keys[None, :] == positions[:, None])
        return mask[:, None]

    def end_forward(self, seq_len: int) -> None:
        self.position += seq_len
        self.seen_tokens += seq_len

    def check_room(self, seq_len: int) -> None:
        """Raise if ``seq_len`` more positions do not fit (on the host: the device would index out of bounds)."""
        if self.seen_tokens + seq_len > self.max_cache_len:
            raise ValueError(
                f"KimiLinearStaticCache(max_cache_len={self.max_cache_len}) is full: it holds {self.seen_tokens} "
                f"positions and this forward adds {seq_len}; build the cache with a larger max_cache_len"
            )

    def _allocate(self, batch: int, device: torch.device) -> None:
        """Fresh buffers for a new batch size or device (layer states are allocated on their first write)."""
        super().reset()
        self.key_mask = torch.zeros(batch, self.max_cache_len, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._decode_graph = None

    def kda_states(self, layer_idx: int) -> tuple[ConvStates, torch.Tensor] | None:
        # After reset() the buffers keep their old values: a new sequence starts from no state.
        return super().kda_states(layer_idx) if self.seen_tokens else None

    @staticmethod
    def _refuse_autograd(*tensors: torch.Tensor) -> None:
        """The buffers are written in place, which autograd cannot differentiate through (the next step's write
        changes what the last one saved for backward)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise ValueError(
                "KimiLinearStaticCache writes its buffers in place, which autograd cannot differentiate through: "
                "run the forward under torch.no_grad() (generate() does), or use KimiLinearCache"
            )

    def update_kda(self, layer_idx: int, conv_states: ConvStates, recurrent_state: torch.Tensor) -> None:
        self._refuse_autograd(*conv_states, recurrent_state)
        if self.recurrent_states[layer_idx] is None:
            super().update_kda(layer_idx, conv_states, recurrent_state)
            return
        for dst, src in zip((*self.conv_states[layer_idx], self.recurrent_states[layer_idx]),
                            (*conv_states, recurrent_state)):  # fmt: skip
            if dst is not src:  # decode kernels update the buffers in place
                dst.copy_(src)

    def update_latents(
        self, layer_idx: int, latent: torch.Tensor, rope_key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``latent [B, T, R]`` and ``rope_key [B, T, P]`` at this forward's positions; returns the
        ``[B, max_cache_len, .]`` buffers (unwritten positions hold zeros or old values and are masked)."""
        self._refuse_autograd(latent, rope_key)
        if self.latents[layer_idx] is None:
            batch = latent.shape[0]
            self.latents[layer_idx] = latent.new_zeros(batch, self.max_cache_len, latent.shape[-1])
            self.rope_keys[layer_idx] = rope_key.new_zeros(batch, self.max_cache_len, rope_key.shape[-1])
        self.latents[layer_idx].index_copy_(1, self._positions, latent)
        self.rope_keys[layer_idx].index_copy_(1, self._positions, rope_key)
        return self.latents[layer_idx], self.rope_keys[layer_idx]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._apply(fn)
        if self.key_mask is not None:
            self.key_mask = self._replace(self.key_mask, fn(self.key_mask))

    def _replace(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if new.shape == old.shape:
            return old.copy_(new)  # same addresses: a captured graph stays valid (beam reordering)
        self._decode_graph = None
        return new

    def reset(self) -> None:
        """Start a new sequence; keeps the buffers (and the captured graph) for the same batch size."""
        self.seen_tokens = 0
        self.steps_may_be_padding = True

    def decode_graph(self, model: KimiLinearForCausalLM) -> DecodeGraph:
        """The decode-step graph of ``model`` on this cache (built on first use, and again when the model or
        the place of its weights changed, e.g. after ``model.to(...)``)."""
        if self._decode_graph is None or self._decode_graph.weights != DecodeGraph.weights_of(model):
            self._decode_graph = DecodeGraph(model, self)
        return self._decode_graph


class DecodeGraph:
    """The one-token decode step of ``model`` on ``cache``, captured in a CUDA graph.

    ``step(input_ids [B, 1])`` returns the logits ``[B, 1, V]``: eagerly on a side stream the first time
    (kernels compile and libraries initialise outside the capture, as CUDA graphs require), then captured, then
    replayed. The graph reads its input from, and writes the logits to, tensors of its own; everything else
    it touches is the model's weights and the cache's buffers, whose addresses do not change.
    """

    def __init__(self, model: KimiLinearForCausalLM, cache: KimiLinearStaticCache) -> None:
        self.model = model
        self.cache = cache
        self.weights = self.weights_of(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed_up = False
        self.input_ids: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    @staticmethod
    def weights_of(model: KimiLinearForCausalLM) -> tuple:
        """Which model, and where its first and last weights live (moving or casting the model moves them all)."""
        return id(model), model.model.embed_tokens.weight.data_ptr(), model.lm_head.weight.data_ptr()

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outputs = self.model.model(input_ids=input_ids, cache=self.cache, use_cache=True, return_dict=True)
        return self.model.lm_head(outputs.last_hidden_state)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch = self.cache.key_mask.shape[0]
        if tuple(input_ids.shape) != (batch, 1):
            raise ValueError(
                f"this KimiLinearStaticCache holds batch size {batch}: a decode step needs input_ids of shape "
                f"({batch}, 1), got {tuple(input_ids.shape)}"
            )
        self.cache.check_room(1)  # a replay does not run the forward's Python, which checks this
        if not self.warmed_up:
            current = torch.cuda.current_stream(input_ids.device)
            side = torch.cuda.Stream(device=input_ids.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                logits = self._forward(input_ids)
            current.wait_stream(side)
            logits.record_stream(current)  # allocated on the side stream, used on the current one
            self.warmed_up = True
            return logits
        if self.graph is None:
            self.input_ids = input_ids.clone()
            self.graph = torch.cuda.CUDAGraph()
            seen = self.cache.seen_tokens
            with torch.cuda.graph(self.graph):
                self.logits = self._forward(self.input_ids)
            # Capturing ran the step's host-side bookkeeping but none of its GPU work: the replay below does it.
            self.cache.seen_tokens = seen
        else:
            self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.seen_tokens += input_ids.shape[1]
        return self.logits.clone()  # the next replay overwrites self.logits
