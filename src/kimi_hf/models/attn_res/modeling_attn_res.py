"""Dense Llama-style decoder with Attention Residuals (arXiv 2603.15031), transformers 5.x conventions.

Every attention sublayer and every MLP sublayer is one AttnRes "layer"; the residual stream between them is
:class:`kimi_hf.modules.AttentionResiduals` (``config.residual``: standard / full / block). A decoder layer
takes the immutable residual state and returns the next one, so that gradient checkpointing can re-run it;
the sublayers' PreNorms are fused into their AttnRes inputs (``sublayer_input(state, norm.weight, eps)``).

Works with transformers 5.17 (cache argument ``past_key_values``) and 5.24 (``cache``): both names are
accepted, and outputs use the field name of the installed version.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from kimi_hf.models.auto_map import BaseModelAutoMapMixin
from kimi_hf.modules import AttentionResiduals, AttnResState
from kimi_hf.modules.attention import eager_attention_forward
from kimi_hf.modules.checkpointing import check_non_reentrant_checkpointing
from kimi_hf.modules.norm import RMSNorm

from .configuration_attn_res import AttnResConfig

# transformers renamed the cache argument/output field from `past_key_values` (5.17) to `cache` (5.24).
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_NAME = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


def _pick_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache as either `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """Whether ``position_ids`` [B, T] restart within a row with no ``attention_mask``: several sequences packed into
    one row (``DataCollatorWithFlattening``), by transformers' rule. Not decided under torch.compile (data-dependent:
    transformers' masks then treat every batch as possibly packed)."""
    if position_ids is None or attention_mask is not None or torch.compiler.is_compiling():
        return False
    return find_packed_sequence_indices(position_ids) is not None


class AttnResRotaryEmbedding(nn.Module):
    """Default RoPE: cos/sin [B, T, head_dim] for the given positions."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """theta^(-2i/dim), [dim / 2] float32 (a non-persistent buffer: rebuilt by ``_init_weights`` on load)."""
        return 1.0 / (self.rope_theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, Dh], k [B, Hkv, T, Dh], cos/sin [B, T, Dh]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class AttnResAttention(nn.Module):
    """GQA self-attention with RoPE through transformers' attention interface (eager, sdpa, flash...)."""

    def __init__(self, config: AttnResConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, D] (already normalised) -> raw sublayer output [B, T, D], and the attention weights
        [B, H, T, S] where the implementation returns them (eager), else None."""
        batch, seq = hidden_states.shape[:2]
        shape = (batch, seq, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # get_interface: transformers lets set_attn_implementation() switch a model whose code looks it up this way
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(batch, seq, -1).contiguous()), weights


class AttnResMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttnResDecoderLayer(GradientCheckpointingLayer):
    """Attention sublayer then MLP sublayer, each with its own PreNorm, joined by the AttnRes residual."""

    def __init__(self, config: AttnResConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = AttnResAttention(config, layer_idx)
        self.mlp = AttnResMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        residual_state: AttnResState,
        attn_res: AttentionResiduals,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[AttnResState, torch.Tensor | None]:
        """Run both sublayers from ``residual_state``; return the residual state after them and the attention
        weights (eager attention; else None).

        Each sublayer's PreNorm is fused into its AttnRes input (``sublayer_input(state, norm.weight, eps)``).
        """
        kwargs.pop("use_cache", None)
        norm = self.input_layernorm
        out, weights = self.self_attn(
            attn_res.sublayer_input(residual_state, norm.weight, norm.variance_epsilon),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=_pick_cache(past_key_values, cache),
            **kwargs,
        )
        state = attn_res.add_sublayer_output(residual_state, out)
        norm = self.post_attention_layernorm
        out = self.mlp(attn_res.sublayer_input(state, norm.weight, norm.variance_epsilon))
        return attn_res.add_sublayer_output(state, out), weights


class AttnResPreTrainedModel(BaseModelAutoMapMixin, PreTrainedModel):
    config_class = AttnResConfig
    config: AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # The residual state (sources of every earlier block, one shared source store on the Triton backend) and the
    # shared pseudo-queries are read by every layer: the decoder must stay on one device, so device_map="auto" keeps
    # AttnResModel whole. The decoder layer stays listed for FSDP's transformer-based auto wrap, which takes this list.
    _no_split_modules = ["AttnResModel", "AttnResDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: AttnResConfig, *inputs, **kwargs) -> None:
        # from_pretrained(path, **overrides) and attribute assignments set fields after the config's own checks
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AttnResRotaryEmbedding):
            # from_pretrained builds the model on the meta device: non-persistent buffers must be recomputed
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, AttentionResiduals) and module.mode != "standard":
            # paper: zero pseudo-queries (uniform average at init), unit key-norm gains
            init.zeros_(module.queries)
            init.ones_(module.norm_weight)


class AttnResModel(AttnResPreTrainedModel):
    """Embedding, decoder layers joined by Attention Residuals, final aggregation and norm."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([AttnResDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.attn_res = AttentionResiduals(
            config.hidden_size,
            config.num_sublayers,
            mode=config.residual,
            block_size=config.attn_res_block_size,
            eps=config.attn_res_eps,
            two_phase=config.attn_res_two_phase,
            backend=config.attn_res_backend,
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = AttnResRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._placement_checked_on: torch.device | None = None  # see _check_placement
        self.post_init()

    def _apply(self, fn, recurse: bool = True):
        self._placement_checked_on = None  # moved or cast: check the placement again at the next forward
        return super()._apply(fn, recurse)

    def _check_placement(self, device: torch.device) -> None:
        """Refuse a decoder whose weights read outside their modules' forward are not on ``device`` (the embeddings').

        Checked once per device (again after ``.to()``): walking the 2L+3 weights costs tens of microseconds, a share
        of a decode step's host time; accelerate places or offloads the weights when it loads the model, before any
        forward.

        The PreNorm gains (fused into the AttnRes reads), the pseudo-queries and the key-norm gains are read as
        tensors, so accelerate's offload hooks (device_map with "cpu" on an accelerator, or "disk"), which load a
        module's weights only around its own forward, leave them on the meta device; and a decoder split over devices
        would mix devices in one read (the residual state does not follow the layers' hooks).
        """
        if self._placement_checked_on == device:
            return
        weights = [("norm.weight", self.norm.weight)]
        weights += [("attn_res." + name, p) for name, p in self.attn_res.named_parameters()]
        for i, layer in enumerate(self.layers):
            weights.append((f"layers.{i}.input_layernorm.weight", layer.input_layernorm.weight))
            weights.append((f"layers.{i}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight))
        for name, weight in weights:
            if weight.device == device:
                continue
            if weight.is_meta:
                raise ValueError(
                    f"{name} is on the meta device (offloaded by device_map): AttnRes models do not support CPU or "
                    f"disk offload, as their fused PreNorms and AttnRes parameters are read outside their modules' "
                    f"forward; load the model on devices that hold it whole"
                )
            raise ValueError(
                f"{name} is on {weight.device}, the embeddings on {device}: the AttnRes decoder must be on one "
                f"device (every layer reads the residual state of all earlier ones): give it a device_map that puts "
                f"the whole decoder on one device (device_map='auto' does for AttnResForCausalLM)"
            )
        self._placement_checked_on = device

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Returns ``last_hidden_state`` [B, T, D] (final AttnRes aggregation, normalised), the KV cache, with
        ``output_hidden_states`` the input of every decoder layer's attention sublayer plus the final output, and
        with ``output_attentions`` (eager attention only) every layer's attention weights [B, H, T, S].

        Packed sequences (``position_ids`` [1, T] restarting at 0, no ``attention_mask``) attend within themselves
        and return no cache; asking for one (``use_cache=True`` or a cache passed in) is an error.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = _pick_cache(past_key_values, cache)
        if _packed(position_ids, attention_mask):
            # transformers' masks separate packed sequences only without a cache; they have no continuation to cache
            if use_cache or cache is not None:
                raise ValueError(
                    "packed sequences (position_ids restarting at 0, no attention_mask) cannot fill a cache: pass "
                    "use_cache=False, or one sequence per batch row"
                )
            use_cache = False
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions needs the eager attention, which returns the weights; this model uses "
                f"{self.config._attn_implementation!r}: load it with attn_implementation='eager' or call "
                f"model.set_attn_implementation('eager')"
            )
        if self.training:  # the residual state is a Python object: only non-reentrant checkpointing sees it
            check_non_reentrant_checkpointing(self.layers)
        state = None  # (from input_ids, the embeddings may go straight into the AttnRes source store)
        if inputs_embeds is None:
            state, inputs_embeds = self.attn_res.begin_from_ids(self.embed_tokens, input_ids)
        self._check_placement(inputs_embeds.device)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        if state is None:
            state = self.attn_res.begin(inputs_embeds)
        all_hidden, all_weights = [], []
        for layer in self.layers:
            if output_hidden_states:  # the (un-normalised) input of the layer's attention sublayer
                all_hidden.append(self.attn_res.sublayer_input(state))
            # position_ids go on to the attention implementation: flash attention finds packed sequences by them
            state, weights = layer(
                state,
                attn_res=self.attn_res,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                position_ids=position_ids,
                **{CACHE_NAME: cache},
                **kwargs,
            )
            all_weights.append(weights)
        hidden = self.attn_res.final_output(state, self.norm.weight, self.norm.variance_epsilon)
        if output_hidden_states:
            all_hidden.append(hidden)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
            **{_OUTPUT_CACHE_NAME: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    """:class:`AttnResModel` with a language-modelling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.model = AttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` [B, T] (-100 ignored, shifted inside) give the causal-LM loss; ``logits_to_keep`` keeps the
        last N positions (0 = all) or the given indices of the logits [B, T', vocab]."""
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=_pick_cache(past_key_values, cache),
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE_NAME: getattr(outputs, _OUTPUT_CACHE_NAME)},
        )
        return output if return_dict else output.to_tuple()


__all__ = ["AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel"]
