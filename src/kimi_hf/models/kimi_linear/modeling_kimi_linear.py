"""Kimi Linear (arXiv 2510.26692): hybrid KDA + MLA + MoE decoder as transformers classes.

Module and parameter names are those of the public checkpoints (``moonshotai/Kimi-Linear-48B-A3B-*``),
so their safetensors load as they are and what we save loads in the official remote code and in
transformers' native ``kimi_linear``. Unlike the official remote code the MoE trains, the MLA cache
keeps the compressed latent, and padded or packed batches never leak state between sequences.

KDA math runs through :mod:`kimi_hf.kernels` (Triton on CUDA, the plain-torch reference elsewhere;
``KIMI_HF_KERNEL_BACKEND=torch|triton`` forces one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from kimi_hf.kernels.conv import causal_conv1d, causal_conv1d_update_group
from kimi_hf.kernels.gated_norm import gated_rms_norm
from kimi_hf.kernels.kda import chunk_kda, fused_recurrent_kda
from kimi_hf.kernels.moe import MAX_TOKENS as MOE_MAX_TOKENS
from kimi_hf.kernels.moe import TRITON_DTYPES as MOE_DTYPES
from kimi_hf.kernels.moe import ExpertTable, moe_experts, moe_route
from kimi_hf.models.auto_map import BaseModelAutoMapMixin
from kimi_hf.modules.attention import eager_attention_forward
from kimi_hf.modules.attn_res import AttentionResiduals, AttnResState
from kimi_hf.modules.checkpointing import check_non_reentrant_checkpointing
from kimi_hf.modules.norm import RMSNorm

from .cache_kimi_linear import KimiLinearCache, KimiLinearStaticCache
from .configuration_kimi_linear import KimiLinearAttnResConfig, KimiLinearConfig

logger = logging.get_logger(__name__)

# transformers renamed the cache argument and output field from `past_key_values` to `cache` (5.2x);
# we accept both spellings and return the cache under the name the installed `generate()` reads.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# Official checkpoint names (see REFERENCE.md); transformers' native class saves the dense MLP of
# layer 0 under `block_sparse_moe.*`: `from_pretrained` maps it back.
NATIVE_DENSE_MLP_KEY_MAPPING = {r"block_sparse_moe\.(?=gate_proj\.|up_proj\.|down_proj\.)": "mlp."}


# ---------------------------------------------------------------------------------------------------- layout
@dataclass
class SequenceLayout:
    """Where the real tokens of a batch are, computed once per forward and shared by all layers.

    Attributes:
        indices: ``[n_real]`` flat indices of the real tokens in ``[B * T]``, or None when every token is
            real and the batch is not packed (then layers run on the padded tensor as is).
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths of the real-token sequences (N = B when unpadding
            a padded batch; the packed sequences for a packed batch), or None.
        mla_mask: ``[B, 1, T, S]`` bool mask for MLA (True = attend), or None for plain causal attention.
    """

    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    mla_mask: torch.Tensor | None

    @property
    def packed(self) -> bool:
        """Several sequences packed into one row (``cu_seqlens`` given or read from restarting positions)."""
        return self.indices is None and self.cu_seqlens is not None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[1, n_real, ...]`` (a view when nothing is removed)."""
        if self.indices is None:
            return x if self.cu_seqlens is None else x.reshape(1, -1, *x.shape[2:])
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.indices).unsqueeze(0)

    def unpack(self, y: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """Inverse of :meth:`pack`; padding positions get zeros."""
        if self.indices is None:
            return y.reshape(batch, seq_len, *y.shape[2:])
        out = y.new_zeros(batch * seq_len, *y.shape[2:])
        out.index_copy_(0, self.indices, y.squeeze(0))
        return out.view(batch, seq_len, *y.shape[2:])


def _cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor | None:
    """``[N + 1]`` int32 boundaries of the sequences of a ``[1, T]`` row from ``starts [1, T]`` (bool, True where a
    sequence begins; the first token always does), or None when the row holds a single sequence."""
    starts = starts[0].clone()
    starts[0] = True
    begins = starts.nonzero().flatten()
    if begins.numel() == 1:
        return None
    return torch.cat([begins, begins.new_tensor([starts.numel()])]).to(torch.int32)


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Sequence boundaries of a packed ``[1, T]`` batch from its restarting ``position_ids``, or None when there is a
    single sequence. As transformers' ``find_packed_sequence_indices`` reads them: a sequence starts wherever a
    position is not its predecessor's plus one, so that ``DataCollatorWithFlattening(position_ids_start=1)`` packs
    too (reading only restarts at 0 ran such sequences as one, each attending to the ones before it)."""
    position_ids = position_ids.reshape(1, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids.diff(dim=1) != 1
    return _cu_seqlens_from_starts(starts)


def _packed_boundaries(cu_seqlens: torch.Tensor | None, kwargs: dict) -> torch.Tensor | None:
    """``cu_seqlens``, or the packed-sequence boundaries that ``DataCollatorWithFlattening`` writes under other names
    (read from the forward's ``kwargs``): flash-attention's ``cu_seq_lens_q`` (``return_flash_attn_kwargs=True``), or
    ``seq_idx [1, T]``, the sequence of each token (``return_seq_idx=True``). Without them, with
    ``return_position_ids=False``, the packed sequences ran as one."""
    if cu_seqlens is not None:
        return cu_seqlens
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"]
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is None:
        return None
    if seq_idx.dim() != 2 or seq_idx.shape[0] != 1:
        raise ValueError(
            f"seq_idx marks sequences packed into one row (DataCollatorWithFlattening(return_seq_idx=True)): expected "
            f"shape [1, seq_len], got {tuple(seq_idx.shape)}"
        )
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx.diff(dim=1) != 0
    return _cu_seqlens_from_starts(starts)


def _mla_mask(keep: torch.Tensor | None, past_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Bool ``[B or 1, 1, T, past + T]`` causal mask (True = attend) over the keys that ``keep [B, past + T]``
    marks real."""
    query_pos = torch.arange(past_len, past_len + seq_len, device=device)
    key_pos = torch.arange(past_len + seq_len, device=device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None]
    if keep is not None:
        # A padding query may see nothing; let it see itself so that softmax stays finite (its output is
        # never used by a real token: KDA layers drop padding and MLA masks padding keys).
        mask = (mask & keep[:, None, :]) | (key_pos[None, :] == query_pos[:, None])[None]
    return mask[:, None]


def build_sequence_layout(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq_len: int,
    past_len: int,
    device: torch.device,
) -> SequenceLayout:
    """Decide padding/packing once per forward, for all layers (a few host synchronisations; none for a
    batch without ``attention_mask``, ``position_ids`` or ``cu_seqlens``).

    Restarting ``position_ids`` mark packed sequences only where no token is padding: a left-padded row's
    positions restart after its padding (``cumsum(mask) - 1``, padding at 0 or 1), and the mask decides there."""
    if (
        cu_seqlens is None and position_ids is not None and batch == 1 and seq_len > 1 and past_len == 0
        and (attention_mask is None or bool(attention_mask.all()))
    ):  # fmt: skip
        cu_seqlens = _packed_cu_seqlens(position_ids)
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
        if past_len:
            raise ValueError("packed sequences (cu_seqlens) cannot be combined with a cache")
        if attention_mask is not None and not bool(attention_mask.all()):
            # the packed layout runs every token as real: padding would be attended to and absorbed into states
            raise ValueError(
                f"packed sequences (cu_seqlens {cu_seqlens.tolist()}) cannot be combined with padding (an "
                f"attention_mask with zeros): leave the padding out of the packed row, or pass no cu_seqlens"
            )
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        if int(cu_seqlens[-1]) != seq_len or int(cu_seqlens[0]) != 0 or bool((cu_seqlens.diff() < 0).any()):
            raise ValueError(
                f"cu_seqlens must rise from 0 to the sequence length {seq_len} without decreasing, "
                f"got {cu_seqlens.tolist()}"
            )
        segment = torch.repeat_interleave(
            torch.arange(cu_seqlens.numel() - 1, device=device), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        )
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        mask = causal & (segment[:, None] == segment[None, :])
        return SequenceLayout(indices=None, cu_seqlens=cu_seqlens, mla_mask=mask[None, None])

    keep = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + seq_len], got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape != (batch, past_len + seq_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {past_len + seq_len}) "
                f"(past {past_len} + current {seq_len} tokens)"
            )
        keep = attention_mask.to(device=device, dtype=torch.bool)
        # Is any position padding; if so, is any new one (a one-token step can bring padding too: a left-padded
        # prompt fed token by token, generate(prefill_chunk_size=1)). The common unpadded step asks only the first.
        all_real = bool(keep.all())
        new_real = all_real or bool(keep[:, past_len:].all())
        if all_real:
            keep = None
    if keep is None:
        # Causal attention needs no mask unless several new tokens follow cached ones (sdpa's is_causal
        # aligns the triangle to the top-left corner).
        mask = _mla_mask(None, past_len, seq_len, device) if past_len and seq_len > 1 else None
        return SequenceLayout(None, None, mask)
    mask = _mla_mask(keep, past_len, seq_len, device)
    if new_real:
        return SequenceLayout(None, None, mask)
    current = keep[:, past_len:]
    lengths = current.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.cumsum(0)
    return SequenceLayout(indices=current.flatten().nonzero().flatten(), cu_seqlens=cu, mla_mask=mask)


# ---------------------------------------------------------------------------------------------------- norms
class KimiLinearGatedRMSNorm(nn.Module):
    """Per-head output norm of KDA: ``RMSNorm(o) * weight * sigmoid(gate)`` over the head dim (``o_norm``)."""

    def __init__(self, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, eps=self.variance_epsilon, activation="sigmoid")


# ---------------------------------------------------------------------------------------------------- KDA
class ShortConvolution(nn.Module):
    """Depthwise causal convolution + SiLU over the sequence (``q_conv1d`` etc.; weight ``[D, 1, W]``)."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return causal_conv1d(
            x, self.weight, activation="silu", initial_state=state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )  # fmt: skip


class KimiDeltaAttention(nn.Module):
    """Kimi Delta Attention: gated delta rule with a per-channel forget gate.

    ``q, k = L2Norm(SiLU(ShortConv(W x)))``, ``v = SiLU(ShortConv(W_v x))``, ``beta = sigmoid(b_proj x)``,
    ``g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)``; output ``o_proj(RMSNorm_head(o) * sigmoid(g_b(g_a(x))))``.
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.linear_num_heads
        self.head_dim = config.linear_head_dim
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        kernel = config.linear_conv_kernel_size
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.q_conv1d = ShortConvolution(inner, kernel)
        self.k_conv1d = ShortConvolution(inner, kernel)
        self.v_conv1d = ShortConvolution(inner, kernel)
        self.f_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(inner, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(1, 1, self.num_heads, 1, dtype=torch.float32))
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, inner, bias=False)
        self.o_norm = KimiLinearGatedRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        # The decode step reads the conv weights as tensors, outside ShortConvolution.forward; where device_map
        # offloaded them (accelerate loads them only around that forward) the step calls the modules instead.
        # Set by KimiLinearModel._check_placement.
        self.conv_offloaded = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: SequenceLayout,
        cache: KimiLinearCache | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, hidden]`` -> ``[B, T, hidden]``."""
        batch, seq_len, _ = hidden_states.shape
        states = cache.kda_states(self.layer_idx) if cache is not None else None
        # One new real token per row with a filled cache takes the in-place decode kernels, which are forward-only;
        # with autograd on (e.g. a model called outside torch.no_grad) the chunked path handles it differentiably,
        # and a padding token (``layout.indices`` set) is dropped there, leaving its row's states as they were.
        decoding = states is not None and seq_len == 1 and layout.indices is None and not torch.is_grad_enabled()
        conv_states, initial_state = states if states is not None else ((None, None, None), None)
        x = hidden_states if decoding else layout.pack(hidden_states)  # [B or 1, T', hidden]
        heads = (*x.shape[:2], self.num_heads, self.head_dim)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if decoding and not self.conv_offloaded:  # the three conv states updated in place, in one launch
            weights = [conv.weight for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d)]
            q, k, v = causal_conv1d_update_group((q, k, v), conv_states, weights, activation="silu")
        else:
            keep = cache is not None
            q, sq = self.q_conv1d(q, layout.cu_seqlens, conv_states[0], keep)
            k, sk = self.k_conv1d(k, layout.cu_seqlens, conv_states[1], keep)
            v, sv = self.v_conv1d(v, layout.cu_seqlens, conv_states[2], keep)
            conv_states = (sq, sk, sv)

        gate = self.f_b_proj(self.f_a_proj(x)).view(heads)
        beta_logits = self.b_proj(x)  # the op takes their sigmoid in fp32 (fp64 in fp64 models)
        kda = fused_recurrent_kda if decoding else chunk_kda
        o, final_state = kda(
            q.view(heads), k.view(heads), v.view(heads), gate, beta_logits,
            initial_state=initial_state, output_final_state=cache is not None, use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
            cu_seqlens=None if decoding else layout.cu_seqlens,
            # in place where the state is fp32 (the kernel's state dtype); an fp64 model's state is returned
            **({"inplace_final_state": True} if decoding and initial_state.dtype == torch.float32 else {}),
        )  # fmt: skip
        if cache is not None:
            cache.update_kda(self.layer_idx, conv_states, final_state)

        out_gate = self.g_b_proj(self.g_a_proj(x)).view(heads)
        # explicit width: a step whose tokens are all padding packs to zero tokens, where -1 is ambiguous
        o = self.o_norm(o, out_gate).reshape(*x.shape[:2], self.num_heads * self.head_dim)
        o = self.o_proj(o)
        return o if decoding else layout.unpack(o, batch, seq_len)


# ---------------------------------------------------------------------------------------------------- MLA
# The official remote code (and transformers' native class) build the MLA LoRA norms without passing
# an eps, so they use RMSNorm's default 1e-6, not config.rms_norm_eps (1e-5) as every other norm does.
MLA_LORA_NORM_EPS = 1e-6
# A step of at most this many new tokens over at least MLA_ABSORB_MIN_KEYS cached positions attends in the latent
# space: the expanded form computes every position's per-head key and value again at each step (S * H * (qk + v)
# numbers written and read, 20 GB per layer at 1M positions on the 48B config), the latent one reads each position's
# latent and rope key (S * (kv_lora_rank + rope)) but launches a few more kernels. H100, session 23, ~1B config, B1
# after a 16K prompt: 1.49 against 2.03 ms/token with the static cache's CUDA graph; 9.26 against 8.76 with the
# growing cache, whose steps are bound by their launches. From 4096 positions the bytes saved outweigh the launches.
MLA_ABSORB_MAX_NEW_TOKENS = 16
MLA_ABSORB_MIN_KEYS = 4096


class KimiMLAAttention(nn.Module):
    """Multi-head latent attention without positional encoding (``mla_use_nope``).

    Keys and values are expanded from a normalised latent of size ``kv_lora_rank`` plus one shared
    "rope" key of size ``qk_rope_head_dim`` used without rotation; the cache keeps the latent. Decode-sized steps
    over a long cache attend in the latent space instead (:meth:`_latent_attention`).
    """

    is_causal = True

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scaling = config.qk_head_dim**-0.5
        hidden, qk = config.hidden_size, self.num_heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=MLA_LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=MLA_LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)
        # The latent attention reads kv_b_proj's weight as a tensor: where device_map offloaded it (accelerate loads
        # it only around the Linear's forward), the expanded form runs. Set by KimiLinearModel._check_placement.
        self.kv_b_offloaded = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: SequenceLayout,
        cache: KimiLinearCache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch, seq_len, self.num_heads, -1).transpose(1, 2)

        latent, rope_key = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if cache is not None:
            latent, rope_key = cache.update_latents(self.layer_idx, latent, rope_key)
        kv_len = latent.shape[1]
        if (
            cache is not None and seq_len <= MLA_ABSORB_MAX_NEW_TOKENS and kv_len >= MLA_ABSORB_MIN_KEYS
            and self.config._attn_implementation == "sdpa" and not (self.training and self.config.attention_dropout)
            # a wrapped kv_b_proj (a PEFT adapter, a quantised layer) must be called: its .weight skips the wrapper
            and type(self.kv_b_proj) is nn.Linear and not self.kv_b_offloaded
        ):  # fmt: skip
            return self.o_proj(self._latent_attention(q, latent, rope_key, layout.mla_mask)), None
        kv = self.kv_b_proj(latent).view(batch, kv_len, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        rope_key = rope_key[:, None].expand(batch, self.num_heads, kv_len, self.rope_dim)
        key = torch.cat([k_nope, rope_key], dim=-1)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self, q, key, value, layout.mla_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling,
        )  # fmt: skip
        return self.o_proj(out.reshape(batch, seq_len, -1)), weights

    def _latent_attention(
        self, q: torch.Tensor, latent: torch.Tensor, rope_key: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same attention with the key and value up-projections absorbed (DeepSeek-V2's decoding form):
        score = (W_uk^T q_nope) . c_s + q_rope . r_s, output = W_uv (sum_s p_s c_s), so that no per-head key or
        value is ever formed. The heads are folded into the query rows of two GEMMs over the positions, in fp32 (fp64
        in fp64 models): sdpa would run them as one head with a handful of query rows, a single program per step
        (2.1x slower than the expanded form after a 16K prompt on the H100, session 23).

        Args:
            q: ``[B, H, T, nope + rope]``; latent ``[B, S, R]`` (normalised), rope_key ``[B, S, P]``.
            mask: ``[B or 1, 1, T, S]`` bool (True = attend), or None: causal, the queries the last T positions.

        Returns:
            ``[B, T, H * v]`` in q's dtype, the heads' outputs before ``o_proj``.
        """
        batch, heads, seq_len, _ = q.shape
        kv_len, rank = latent.shape[1], self.kv_lora_rank
        acc = torch.promote_types(q.dtype, torch.float32)
        w_uk, w_uv = self.kv_b_proj.weight.view(heads, self.nope_dim + self.v_dim, rank).split(
            [self.nope_dim, self.v_dim], dim=1
        )  # [H, nope, R], [H, v, R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        query = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        query = query.reshape(batch, heads * seq_len, rank + self.rope_dim).to(acc) * self.scaling  # row h * T + t
        keys = torch.cat([latent, rope_key], dim=-1).to(acc)  # [B, S, R + P]
        scores = torch.matmul(query, keys.transpose(1, 2))  # [B, H * T, S]
        if mask is None and seq_len > 1:
            mask = torch.ones(seq_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - seq_len)
        if mask is not None:  # each head's rows take their token's mask
            mask = mask[..., :kv_len].expand(batch, 1, seq_len, kv_len)
            mask = mask.expand(batch, heads, seq_len, kv_len).reshape(batch, heads * seq_len, kv_len)
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), keys[..., :rank]).to(q.dtype)  # [B, H * T, R]
        out = torch.einsum("bhtr,hvr->bthv", out.view(batch, heads, seq_len, rank), w_uv)
        return out.reshape(batch, seq_len, heads * self.v_dim)


# ---------------------------------------------------------------------------------------------------- MLP / MoE
class KimiLinearMLP(nn.Module):
    """SwiGLU MLP with the official names (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, config: KimiLinearConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class KimiLinearExpert(nn.Module):
    """One routed expert, with the official names: ``w1`` gate, ``w3`` up, ``w2`` down."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


def _inside_backward() -> bool:
    """True while autograd's engine runs (e.g. a gradient-checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of ``expert_ids`` (int64, any shape) chose each expert, ``[num_experts]`` int64. A scatter-add, not
    ``torch.bincount``: on CUDA bincount reads the largest id back to the host to size its output, a synchronisation
    in every MoE layer."""
    flat = expert_ids.flatten()
    return torch.zeros(num_experts, device=flat.device, dtype=torch.long).scatter_add_(0, flat, torch.ones_like(flat))


class KimiLinearRouter(nn.Module):
    """Sigmoid (or softmax) router with an expert-selection bias (``gate.weight``, ``gate.e_score_correction_bias``).

    The correction bias only chooses experts; the mixing weights are the unbiased scores of the
    chosen experts, renormalised (``moe_renormalize``, with more than one expert per token, as the official
    code does) and times ``routed_scaling_factor``. Grouped top-k first keeps the ``topk_group`` groups with
    the best sum of their two best biased scores.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_token
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # Expert loads of the last training forward, applied to the bias at the next one (never in between,
        # so that a checkpointing recomputation routes exactly as the forward it replays).
        self._pending_load: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, real_rows: torch.Tensor | None = None, shared_expert: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, hidden]`` -> router logits ``[N, E]`` (fp32), weights ``[N, k]`` (fp32), expert ids ``[N, k]``.

        ``real_rows``: the rows that are real tokens (None: all); only they count in the balancing load.
        ``shared_expert``: an id that every token also takes with weight 1, appended as a column ``k`` of the
        weights and ids (a shared expert run with the routed ones)."""
        cfg = self.config
        # Balancing follows training forwards only: not a recomputation in backward, nor a forward under no_grad
        # (generate() or an evaluation pass of a model left in train mode moved the bias at every step).
        records_load = (
            self.training and cfg.router_bias_update_rate > 0 and torch.is_grad_enabled() and not _inside_backward()
        )
        if records_load:
            self._apply_pending_bias_update()
        logits = self._logits(x)
        groups, topk_groups = (cfg.num_expert_group, cfg.topk_group) if cfg.use_grouped_topk else (1, 1)
        # A decode step's few tokens take the one-launch Triton routing (on CUDA); autograd, fp64 and grouped
        # top-k the torch formula.
        one_launch = (
            not torch.is_grad_enabled() and logits.dtype == torch.float32 and x.shape[0] <= MOE_MAX_TOKENS
            and groups == 1
        )  # fmt: skip
        # The official code renormalises only with more than one expert per token: one renormalised weight is the
        # constant 1, which gave the router weight no gradient (a top-1 router never learned) and other outputs than
        # the official ones (the score times routed_scaling_factor).
        renormalize = cfg.moe_renormalize and self.top_k > 1
        expert_ids, weights = moe_route(
            logits, self.top_k, self.e_score_correction_bias, cfg.moe_router_activation_func, renormalize,
            cfg.routed_scaling_factor, shared_expert, groups, topk_groups, backend=None if one_launch else "torch",
        )  # fmt: skip
        if records_load:
            chosen = expert_ids[:, : self.top_k] if real_rows is None else expert_ids[real_rows, : self.top_k]
            self._pending_load = _expert_counts(chosen, self.num_experts).float()
        return logits, weights, expert_ids

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, hidden]`` -> router logits ``[N, E]`` in fp32 (fp64 in fp64 models), also under autocast: its
        bf16/fp16 linear would choose the experts and weigh them from rounded scores (an fp32 model trained with
        autocast, as the Trainer's ``bf16=True`` runs it, routed less precisely than the same model cast to bf16)."""
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._logits(x)
        acc = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(acc), self.weight.to(acc))

    @torch.no_grad()
    def _apply_pending_bias_update(self) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts. Under
        torch.distributed the load is summed over the ranks first (every rank trains in step and reaches this
        in the same forward), so that every rank makes the same update from the global batch."""
        if self._pending_load is not None:
            load = self._pending_load
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)
            bias = self.e_score_correction_bias
            if bias.dtype != torch.float32:
                logger.warning_once(
                    f"e_score_correction_bias is {bias.dtype}: balancing steps of {self.config.router_bias_update_rate}"
                    " can fall below its resolution and be lost; keep it fp32 (from_pretrained(dtype=...) does, "
                    "model.to(dtype) does not)"
                )
            bias += self.config.router_bias_update_rate * torch.sign(load.mean() - load)
            self._pending_load = None


def _to_pairs(x: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """``x [N, h]`` -> the rows of the (token, expert) pairs in expert order, ``x[token_of]`` ``[N*k, h]``."""
    return x.index_select(0, token_of)


def _sum_pairs(y: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``y [N*k, h]`` in expert order -> per-token sums ``[N, h]``: pair ``n*k + j`` sits at row ``inverse[n*k + j]``.
    Summed in fp32 and rounded once."""
    return y.index_select(0, inverse).view(-1, k, y.shape[-1]).sum(1)


class _DispatchToPairs(torch.autograd.Function):
    """:func:`_to_pairs` whose backward is :func:`_sum_pairs` (its transpose): two gathers. Autograd's own backward
    of ``index_select`` is an ``index_add_``, which took 11.6 ms of a 103 ms training step on the H200 (session 7
    profile: with the two other scatter-adds below, 3 per MoE layer over [32768, 2048] rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_of: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return _to_pairs(x, token_of)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _sum_pairs(grad, inverse, ctx.k), None, None, None


class _CombinePairs(torch.autograd.Function):
    """:func:`_sum_pairs` whose backward is :func:`_to_pairs` (its transpose)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, token_of: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(token_of)
        return _sum_pairs(y, inverse, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token_of,) = ctx.saved_tensors
        return _to_pairs(grad.contiguous(), token_of), None, None, None


class _TakeRows(torch.autograd.Function):
    """``x[rows]`` for distinct ``rows``; the backward writes the gradient rows back in place of autograd's
    ``index_add_`` (no accumulation is needed when no row repeats)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, grad.shape[1]).index_copy_(0, rows, grad), None


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether the grouped-GEMM experts serve ``x``: CUDA bf16/fp16 on a Hopper (sm_90) or newer GPU."""
    return (
        x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class KimiLinearSparseMoE(nn.Module):
    """Routed experts plus shared experts (``block_sparse_moe``). Trainable: gradients reach the experts,
    the router weight (through the mixing weights) and the shared experts."""

    # True: one grouped GEMM per projection on CUDA in bf16/fp16 (torch._grouped_mm), with no host
    # synchronisation; False (or fp32, or CPU): a loop over the experts (one host synchronisation per layer).
    # Groups are padded to GROUP_ALIGN rows with none empty: unpadded groups hit a CUDA illegal memory access
    # on the H200 (torch 2.11); padded, tests/test_kimi_linear_gpu.py passes there. Only verified on Hopper,
    # so older GPUs take the loop.
    use_grouped_mm: bool = True
    GROUP_ALIGN = 16

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_act = config.hidden_act
        self.gate = KimiLinearRouter(config)
        self.experts = nn.ModuleList([KimiLinearExpert(config) for _ in range(config.num_experts)])
        self.shared_experts = (
            KimiLinearMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )
        self._expert_table = ExpertTable()  # the experts' weight addresses, for the decode kernels
        # The grouped-GEMM and decode paths read the expert (and shared expert) weights as tensors: where device_map
        # offloaded any (accelerate loads them only around each Linear's forward), the experts are called as
        # modules. Set by KimiLinearModel._check_placement.
        self.experts_offloaded = False

    def forward(
        self, hidden_states: torch.Tensor, real_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, hidden]`` -> output ``[B, T, hidden]`` and router logits ``[B*T, E]``; ``real_rows``: the flat
        indices ``[n]`` of the real (not padding) tokens in ``[B*T]``, or None when all are, for the balancing load."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        # The decode path reads the experts' weights in place, so it also needs plain nn.Linear experts.
        expert_weights = self._expert_weights() if self._use_decode_experts(x) else None
        if expert_weights is not None:
            out, logits = self._decode(x, real_rows, expert_weights)
        else:
            logits, weights, expert_ids = self.gate(x, real_rows)
            out = self._routed(x, weights, expert_ids)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        return out.view(shape), logits

    def _use_decode_experts(self, x: torch.Tensor) -> bool:
        """Inference on CUDA with few tokens (decoding) takes the small-batch experts op: each chosen expert's
        weights are read once for all the tokens that chose it, in Triton kernels with no sorting and no host
        synchronisation, so the step can be captured in a CUDA graph. Inputs of another dtype than the weights
        (autocast) take the routed path, whose linear layers autocast handles, as does float64. (Wrapped experts
        take it too: :meth:`forward` asks :meth:`_expert_weights`, whose weights the decode path then reads.)"""
        if (
            self.hidden_act != "silu" or not x.is_cuda or torch.is_grad_enabled() or x.shape[0] > MOE_MAX_TOKENS
            or self.experts_offloaded
        ):  # fmt: skip
            return False
        return x.dtype in MOE_DTYPES and x.dtype == self.experts[0].w1.weight.dtype

    def _expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None:
        """The experts' ``w1``, ``w3`` and ``w2`` weights (a list over the experts each), or None if a projection is not
        a plain ``nn.Linear``: a wrapped one (a PEFT adapter, a quantised layer) must be called as a module, since
        reading its ``.weight`` would skip the wrapper (LoRA's ``weight`` is the frozen base weight).

        Read from the modules' dicts: attribute access goes through ``nn.Module.__getattr__`` (about 0.5 us a time),
        and every decode step asks this of every MoE layer, for three projections of every expert."""
        weights: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        for expert in self.experts._modules.values():
            for name, found in zip(("w1", "w3", "w2"), weights):
                linear = expert._modules[name]
                if type(linear) is not nn.Linear:
                    return None
                found.append(linear._parameters["weight"])
        return weights

    def _experts_read_in_place(self) -> bool:
        """Whether the grouped-GEMM and decode paths may read the expert weights in place (:meth:`_expert_weights`)."""
        return not self.experts_offloaded and self._expert_weights() is not None

    def _shared_expert_rides(self) -> bool:
        """Whether the shared experts can run in the decode kernels as one more routed expert: plain ``nn.Linear``
        projections of one expert's shape and dtype (``num_shared_experts == 1``)."""
        shared = self.shared_experts
        if shared is None:
            return False
        if any(type(m) is not nn.Linear for m in (shared.gate_proj, shared.up_proj, shared.down_proj)):
            return False
        w1 = self.experts[0].w1.weight
        return shared.gate_proj.weight.shape == w1.shape and shared.gate_proj.weight.dtype == w1.dtype

    def _decode(
        self, x: torch.Tensor, real_rows: torch.Tensor | None, expert_weights: tuple[list[torch.Tensor], ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, hidden]`` -> output ``[N, hidden]`` (routed + shared experts) and router logits ``[N, E]``;
        ``expert_weights``: :meth:`_expert_weights`.

        A decode step is bound by its launches: the routing is one kernel, and the shared expert rides with the
        routed ones as expert E, chosen by every token with weight 1 (summed with them in fp32), where the five
        launches of its own MLP and the add would otherwise follow."""
        rides = self._shared_expert_rides()
        logits, weights, expert_ids = self.gate(x, real_rows, shared_expert=self.num_experts if rides else None)
        w1, w3, w2 = expert_weights
        if rides:
            shared = self.shared_experts
            w1, w3, w2 = w1 + [shared.gate_proj.weight], w3 + [shared.up_proj.weight], w2 + [shared.down_proj.weight]
        out = moe_experts(x, expert_ids, weights, w1, w3, w2, table=self._expert_table)
        if self.shared_experts is not None and not rides:
            out = out + self.shared_experts(x)
        return out, logits

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each token through its chosen experts only: ``x [N, hidden]`` -> ``[N, hidden]``."""
        # Sort the (token, expert) pairs by expert so that each expert sees one contiguous slice; ``inverse``
        # maps each pair back to its row, so that the combine and both backwards are gathers, not scatter-adds.
        k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        order = flat_ids.argsort(stable=True)
        token_of = order // k
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        routed_in = _DispatchToPairs.apply(x, token_of, inverse, k)
        counts = _expert_counts(flat_ids, self.num_experts)
        if self.use_grouped_mm and _grouped_mm_ok(x) and self._experts_read_in_place():
            routed_out = self._experts_grouped(routed_in, flat_ids[order], counts)
        else:
            routed_out = self._experts_loop(routed_in, counts)
        y = routed_out * weights.flatten()[order, None].to(x.dtype)
        return _CombinePairs.apply(y, token_of, inverse, k)

    def _experts_loop(self, routed_in: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``routed_in [M, hidden]`` sorted by expert, ``counts [E]`` -> ``[M, hidden]``."""
        sizes = counts.tolist()  # one host synchronisation
        chunks = routed_in.split(sizes)
        return torch.cat([self.experts[e](chunk) for e, chunk in enumerate(chunks) if sizes[e]])

    def _experts_grouped(self, routed_in: torch.Tensor, expert_of: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``routed_in [M, hidden]`` sorted by expert, ``expert_of [M]`` its experts, ``counts [E]`` -> ``[M, hidden]``.

        Each expert's rows go to a slot of its count rounded up to ``GROUP_ALIGN`` (at least one block, so no
        group is empty) in a zero-filled buffer of static size (no host synchronisation); padding rows are
        zero, so they add nothing to the weight gradients, and only real rows are read back. The last expert's
        group runs to the end of the buffer: ``_grouped_mm`` leaves rows past its last offset unwritten, and the
        activation and its backward would compute on those rows of uninitialised memory (not read back, but NaN
        there trips autograd's anomaly mode); zero rows in a group come out as zeros.
        """
        align = self.GROUP_ALIGN
        slots = ((counts + align - 1) // align * align).clamp_min(align)
        ends = slots.cumsum(0)
        first = counts.cumsum(0) - counts  # first sorted row of each expert
        rank = torch.arange(routed_in.shape[0], device=routed_in.device) - first[expert_of]
        rows = ends[expert_of] - slots[expert_of] + rank
        # >= sum(slots), and a multiple of the alignment, as every group end must be
        capacity = -(-routed_in.shape[0] // align) * align + align * self.num_experts
        padded = routed_in.new_zeros(capacity, routed_in.shape[1]).index_copy(0, rows, routed_in)
        offsets = torch.cat([ends[:-1], ends.new_full((1,), capacity)]).to(torch.int32)
        # Experts keep the official per-expert modules; stacking their weights costs one read of them (and three
        # launches: a concatenation per expert took E + 1).
        w1, w3, w2 = self._expert_weights()  # not None: _experts_read_in_place checked
        w13 = torch.cat([torch.stack(w1), torch.stack(w3)], dim=1)  # [E, 2I, hidden]
        w2 = torch.stack(w2)  # [E, hidden, I]
        gate, up = torch._grouped_mm(padded, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        act = self.experts[0].act_fn(gate) * up
        return _TakeRows.apply(torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets), rows)


# ---------------------------------------------------------------------------------------------------- decoder
class KimiLinearDecoderLayer(GradientCheckpointingLayer):
    """Two sublayers, each with its PreNorm: KDA or MLA, then a dense MLP or the MoE.

    How their outputs combine is the model's :class:`~kimi_hf.modules.AttentionResiduals`: the usual
    residual sum (``residual="standard"``, the official architecture) or depth attention (full/block AttnRes).
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_kda = config.layer_types[layer_idx] == "linear_attention"
        self.self_attn = KimiDeltaAttention(config, layer_idx) if self.is_kda else KimiMLAAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.block_sparse_moe = KimiLinearSparseMoE(config)
        else:
            self.mlp = KimiLinearMLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # The PreNorm gains are read as tensors (fused into the residual read): where device_map offloaded them
        # (accelerate loads them only around RMSNorm.forward), the norms are called instead, on the unfused read.
        # Set by KimiLinearModel._check_placement.
        self.norms_offloaded = False

    def _sublayer_input(
        self, residual_state: AttnResState, attn_res: AttentionResiduals, norm: RMSNorm
    ) -> torch.Tensor:
        """The PreNorm of the next sublayer's input ``[B, T, hidden]``: fused into the residual read, or the norm
        module called where its weight is offloaded (the same formula: :func:`~kimi_hf.kernels.attn_res.prenorm`)."""
        if self.norms_offloaded:
            return norm(attn_res.sublayer_input(residual_state))
        return attn_res.sublayer_input(residual_state, norm.weight, norm.variance_epsilon)

    def forward(
        self,
        residual_state: AttnResState,
        attn_res: AttentionResiduals,
        layout: SequenceLayout,
        cache: KimiLinearCache | None = None,
    ) -> tuple[AttnResState, torch.Tensor | None, torch.Tensor | None]:
        """Run both sublayers; returns the residual state after them, the router logits (None if dense) and the
        MLA attention weights ``[B, H, T, S]`` (eager attention; None for KDA, which has no attention matrix).

        Each PreNorm is fused into its sublayer's input (``attn_res.sublayer_input(state, weight, eps)``):
        with AttnRes on the Triton training path the input is then recomputed in backward, not stored.
        """
        h = self._sublayer_input(residual_state, attn_res, self.input_layernorm)
        if self.is_kda:
            attn_out, attn_weights = self.self_attn(h, layout, cache), None
        else:
            attn_out, attn_weights = self.self_attn(h, layout, cache)
        state = attn_res.add_sublayer_output(residual_state, attn_out)
        h = self._sublayer_input(state, attn_res, self.post_attention_layernorm)
        ff, router_logits = self.block_sparse_moe(h, layout.indices) if self.is_moe else (self.mlp(h), None)
        return attn_res.add_sublayer_output(state, ff), router_logits, attn_weights


def _execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` runs: the execution device of the first accelerate hook in it (device_map), else its first
    weight's device; None when it has neither (all its weights offloaded without a hook)."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
            runs_on = getattr(h, "execution_device", None)
            if runs_on is not None:
                device = torch.device(runs_on) if isinstance(runs_on, (int, str)) else runs_on
                # "cuda" without an index: the current device, where accelerate's copies land (as the embeddings)
                return torch.empty(0, device=device).device if device.index is None else device
    for param in module.parameters():
        if not param.is_meta:
            return param.device
    return None


def _move_residual_stream(
    state: AttnResState, layout: SequenceLayout, device: torch.device
) -> tuple[AttnResState, SequenceLayout]:
    """A standard-residual state and the batch layout on ``device``, for the next layer of a decoder split over
    devices: accelerate's hooks move a layer's tensor arguments, not these dataclasses. (Standard mode: the stream and
    the pending sublayer output; the inference path's per-read cache is empty between layers.)"""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    state = replace(state, partial=move(state.partial), pending=move(state.pending))
    return state, SequenceLayout(move(layout.indices), move(layout.cu_seqlens), move(layout.mla_mask))


class KimiLinearPreTrainedModel(BaseModelAutoMapMixin, PreTrainedModel):
    config_class = KimiLinearConfig
    config: KimiLinearConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # device_map="auto" may split a standard-residual decoder between layers (the model moves the residual stream to
    # each layer's device); KimiLinearModel adds itself for AttnRes, whose residual state no layer can leave.
    _no_split_modules = ["KimiLinearDecoderLayer"]
    # accelerate's hooks move a layer's tensor-like arguments to its device: not the shared AttentionResiduals module
    # (nn.Module.to on every layer call), nor the cache, whose states each layer keeps on its own device
    _skip_keys_device_placement = ["past_key_values", "cache", "attn_res"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _is_stateful = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight", "dt_bias", "A_log"]

    def __init__(self, config: KimiLinearConfig, *inputs, **kwargs) -> None:
        # from_pretrained(path, **overrides) and attribute assignments set fields after the config's own checks
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As :meth:`transformers.PreTrainedModel.from_pretrained`; also reads checkpoints written by
        transformers' native class (dense MLP saved as ``block_sparse_moe.{gate,up,down}_proj``), into the causal
        LM or the base model."""
        kwargs.setdefault("key_mapping", NATIVE_DENSE_MLP_KEY_MAPPING)
        loaded = super().from_pretrained(*args, **kwargs)
        # transformers would replay the renaming backwards on save; our module names are already the
        # official checkpoint names, which is what save_pretrained must write.
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model._weight_conversions = None
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization skips tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            loaded = getattr(module.weight, "_is_hf_initialized", False)
            if module.padding_idx is not None and module.padding_idx < module.weight.shape[0] and not loaded:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (RMSNorm, KimiLinearGatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            init.kaiming_uniform_(module.weight, a=5**0.5)
        elif isinstance(module, KimiLinearRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, AttentionResiduals):
            if module.mode != "standard":
                init.zeros_(module.queries)  # uniform average over the sources at initialisation
                init.ones_(module.norm_weight)
        elif isinstance(module, KimiDeltaAttention):
            # As in fla: decay rates A in [1, 16]; dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1].
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1.0, 16.0).log())
            log_dt = torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))
            dt = log_dt.exp()
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class KimiLinearModel(KimiLinearPreTrainedModel):
    """The decoder stack without the LM head (``model.*`` in the checkpoints)."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(KimiLinearDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # Standard mode has no parameters: plain checkpoints keep the official state-dict names.
        self.attn_res = AttentionResiduals(
            config.hidden_size,
            num_sublayers=config.num_sublayers,
            mode=config.residual,
            block_size=config.attn_res_block_size,
            eps=config.rms_norm_eps,
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        if config.residual != "standard":
            # Every layer reads the residual state of all earlier ones (a bank of sources) and the shared
            # pseudo-queries: device_map="auto" must keep the decoder on one device. The layer stays listed for
            # FSDP's transformer-based auto wrap, which takes this list.
            self._no_split_modules = [type(self).__name__, "KimiLinearDecoderLayer"]
        # See _check_placement: the device it last checked, where each layer's device differs from the one before
        # (index num_hidden_layers: the final norm), whether the final norm is offloaded, and whether the forward runs
        # on one device with every weight in place (what a CUDA graph of the decode step needs).
        self._placement_checked_on: torch.device | None = None
        self._device_changes: dict[int, torch.device] = {}
        self.norm_offloaded = False
        self.graphable = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _apply(self, fn, recurse: bool = True):
        self._placement_checked_on = None  # moved or cast: check the placement again at the next forward
        return super()._apply(fn, recurse)

    def _check_placement(self, device: torch.device) -> None:
        """Adapt to, or refuse, a placement by accelerate (``from_pretrained(device_map=...)``); ``device``: the
        embeddings'. Checked once per device (again after ``.to()``): the walk over the weights costs far more than a
        decode step's host time allows; accelerate places or offloads the weights when it loads the model.

        Weights read as tensors outside their module's forward are not loaded by accelerate's offload hooks (a
        device_map entry "disk", or "cpu" beside an accelerator: the weights stay on the meta device and are loaded
        around each module's own forward only): the fused PreNorm gains, the final norm's, the KDA conv weights of
        the decode step, MLA's ``kv_b_proj`` in the latent attention, the experts' in the grouped-GEMM and decode
        paths. Where they are offloaded, their modules are called instead (flags set here). AttnRes's pseudo-queries
        and key-norm gains are read by every layer: offloaded, refused by name.

        A decoder split over devices between layers (device_map="auto" over several GPUs, or a hand-made map) has its
        residual stream moved to each layer's device in :meth:`forward` (standard residuals); AttnRes's state (the
        sources of all earlier blocks) cannot follow the layers: refused, naming the layer.

        Raises:
            ValueError: an AttnRes parameter offloaded, or an AttnRes decoder on several devices.
        """
        if self._placement_checked_on == device:
            return
        offloaded = []
        for layer in self.layers:
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            layer.norms_offloaded = any(norm.weight.is_meta for norm in norms)
            attn = layer.self_attn
            if layer.is_kda:
                attn.conv_offloaded = any(c.weight.is_meta for c in (attn.q_conv1d, attn.k_conv1d, attn.v_conv1d))
                offloaded.append(layer.norms_offloaded or attn.conv_offloaded)
            else:
                attn.kv_b_offloaded = attn.kv_b_proj.weight.is_meta
                offloaded.append(layer.norms_offloaded or attn.kv_b_offloaded)
            if layer.is_moe:
                moe = layer.block_sparse_moe
                experts = [moe.experts] + ([moe.shared_experts] if moe.shared_experts is not None else [])
                moe.experts_offloaded = any(p.is_meta for m in experts for p in m.parameters())
                offloaded.append(moe.experts_offloaded)
        self.norm_offloaded = self.norm.weight.is_meta
        changes, current = {}, device
        for i, module in enumerate([*self.layers, self.norm]):
            runs_on = _execution_device(module)
            if runs_on is not None and runs_on != current:
                changes[i] = current = runs_on
        if self.config.residual != "standard":
            for name, param in self.attn_res.named_parameters():
                if param.is_meta:
                    raise ValueError(
                        f"attn_res.{name} is on the meta device (offloaded by device_map): AttnRes parameters are "
                        f"read by every layer, outside their module's forward, so they cannot be offloaded; keep "
                        f"model.attn_res on {device}, the embeddings' device"
                    )
                if param.device != device:
                    raise ValueError(
                        f"attn_res.{name} is on {param.device}, the embeddings on {device}: the AttnRes decoder must "
                        f"be on one device"
                    )
            if changes:
                first = min(changes)
                name = f"layers.{first}" if first < len(self.layers) else "norm"
                raise ValueError(
                    f"{name} runs on {changes[first]}, the embeddings on {device}: the AttnRes decoder must be on one "
                    f"device (every layer reads the residual state of all earlier ones): give it a device_map that "
                    f"puts the whole decoder on one device (device_map='auto' does)"
                )
        self._device_changes = changes
        self.graphable = not changes and not self.norm_offloaded and not any(offloaded)
        self._placement_checked_on = device

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KimiLinearCache | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, hidden]``).
            attention_mask: ``[B, past + T]`` 1 for real tokens, 0 for padding (left or right).
            position_ids: only read to find packed sequences (``[1, T]``, a new sequence wherever a position is not
                the previous one plus one, as written by ``DataCollatorWithFlattening``); positions carry no other
                information in Kimi Linear.
            past_key_values / cache: a :class:`KimiLinearCache` (either name).
            cu_seqlens: ``[N + 1]`` boundaries of N sequences packed into a batch of one.
            cu_seq_lens_q / seq_idx (keywords): the packed-sequence marks of
                ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` (boundaries, read as ``cu_seqlens``)
                and ``DataCollatorWithFlattening(return_seq_idx=True)`` (``[1, T]`` sequence of each token).
            output_attentions: return the attention weights ``[B, H, T, S]`` of every MLA layer (one entry per MLA
                layer: KDA layers have no attention matrix); needs the eager attention implementation.

        Packed sequences have no single continuation to cache: with ``use_cache`` left to the config they
        return no cache, and asking for one (``use_cache=True`` or a cache passed in) is an error.
        """
        cache = cache if cache is not None else past_key_values
        cache_requested = use_cache is True or cache is not None
        cu_seqlens = _packed_boundaries(cu_seqlens, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions needs the eager attention, which returns the weights; this model uses "
                f"{self.config._attn_implementation!r}: load it with attn_implementation='eager' or call "
                f"model.set_attn_implementation('eager')"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False.")
            use_cache = False
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        state = None  # (from input_ids, the embeddings may go straight into the AttnRes source store)
        if inputs_embeds is None:
            state, inputs_embeds = self.attn_res.begin_from_ids(self.embed_tokens, input_ids)
        self._check_placement(inputs_embeds.device)
        if use_cache and cache is None:
            cache = KimiLinearCache(self.config)
        if not use_cache:
            cache = None
        if cache is not None and not isinstance(cache, KimiLinearCache):
            raise ValueError(f"Kimi Linear needs a KimiLinearCache, got {type(cache).__name__}")
        if cache is not None:
            cache.check_config(self.config)

        batch, seq_len, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        layout = build_sequence_layout(
            attention_mask, position_ids, cu_seqlens, batch, seq_len, past_len, inputs_embeds.device
        )
        if layout.packed and cache is not None:
            if cache_requested:
                raise ValueError(
                    "packed sequences (cu_seqlens, seq_idx, or position_ids restarting) cannot fill a cache: "
                    "pass use_cache=False, or one sequence per batch row"
                )
            cache = None
        if cache is not None:
            new_tokens_mask = attention_mask[:, past_len:] if attention_mask is not None else None
            static_mask = cache.begin_forward(
                batch, seq_len, new_tokens_mask, inputs_embeds.device, inputs_embeds.dtype
            )
            if static_mask is not None:  # a static cache: MLA attends over its fixed-size buffers
                layout = replace(layout, mla_mask=static_mask)

        if self.training:
            check_non_reentrant_checkpointing(self.layers)
        if state is None:
            state = self.attn_res.begin(inputs_embeds)
        all_hidden: list[torch.Tensor] = []
        all_router_logits: list[torch.Tensor] = []
        all_attentions: list[torch.Tensor] = []
        changes = self._device_changes  # empty unless the decoder is split over devices
        for i, layer in enumerate(self.layers):
            if changes and i in changes:
                state, layout = _move_residual_stream(state, layout, changes[i])
            if output_hidden_states:
                all_hidden.append(self.attn_res.sublayer_input(state))
            state, router_logits, attn_weights = layer(state, attn_res=self.attn_res, layout=layout, cache=cache)
            if output_router_logits and router_logits is not None:
                all_router_logits.append(router_logits)
            if output_attentions and attn_weights is not None:
                all_attentions.append(attn_weights)
        if changes and len(self.layers) in changes:
            state, layout = _move_residual_stream(state, layout, changes[len(self.layers)])
        if self.norm_offloaded:
            hidden_states = self.norm(self.attn_res.final_output(state))
        else:
            hidden_states = self.attn_res.final_output(state, self.norm.weight, self.norm.variance_epsilon)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if cache is not None:
            cache.end_forward(seq_len)

        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
            **{CACHE_FIELD: cache},
        )
        return output if return_dict else output.to_tuple()


class KimiLinearForCausalLM(KimiLinearPreTrainedModel, GenerationMixin):
    """Kimi Linear with its (untied) LM head."""

    # tied only where the config asks (tie_word_embeddings, False in every public checkpoint)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    base_model_class: type[KimiLinearModel] = KimiLinearModel

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its KimiLinearCache itself.
        return False

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """``generate(..., cache_implementation="static")`` decodes with a :class:`KimiLinearStaticCache` of
        ``max_cache_length`` positions, or ``max_cache_len`` where the generation config asks for more (as transformers
        sizes its StaticCache: room to continue from the returned cache); CUDA graphs on CUDA. Everything else is
        transformers' own handling (which refuses a cache passed together with ``cache_implementation``, and leaves
        the growing cache to the model)."""
        if model_kwargs.get(CACHE_FIELD) is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation == "static":
                size = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
                model_kwargs[CACHE_FIELD] = KimiLinearStaticCache(self.config, max_cache_len=size)
                return
            if generation_config.prefill_chunk_size is not None:  # chunked prefill needs the cache from the start
                model_kwargs[CACHE_FIELD] = KimiLinearCache(self.config)
                return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        cache: KimiLinearCache | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        r"""
        Args:
            labels: ``[B, T]`` next-token targets (shifted inside; -100 ignored).
            logits_to_keep: compute logits only for the last N positions (int) or the given indices (tensor).
            Other arguments (also the keywords ``cu_seq_lens_q`` and ``seq_idx``) as in :meth:`KimiLinearModel.forward`.
        """
        cache = cache if cache is not None else past_key_values
        outputs_asked = (output_hidden_states, output_router_logits, output_attentions)
        if self._replays_decode_graph(cache, input_ids, labels, use_cache, outputs_asked, attention_mask):
            logits = cache.decode_graph(self).step(input_ids)
            output = MoeCausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
            return output if return_dict is not False else output.to_tuple()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            cu_seqlens=cu_seqlens,
            # the collator's other packing marks: the model reads them (kwargs also go on to the loss function)
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
            seq_idx=kwargs.get("seq_idx"),
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()

    def _replays_decode_graph(
        self,
        cache: KimiLinearCache | None,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        use_cache: bool | None,
        outputs_asked: tuple[bool | None, bool | None, bool | None],
        attention_mask: torch.Tensor | None = None,
    ) -> bool:
        """Whether this forward is a one-token decode step that a :class:`KimiLinearStaticCache` runs as a
        CUDA graph: inference on CUDA, after a prefill, with only logits to return (``outputs_asked``: the
        ``output_hidden_states``, ``output_router_logits`` and ``output_attentions`` arguments), and a real token.

        The graph takes its token as real. A one-token step can be padding (``generate(prefill_chunk_size=1)`` on a
        left-padded batch): until a step's tokens are all real, ``attention_mask``'s last column is read (one host
        synchronisation per step), and a step with padding runs eagerly, which drops it. With left padding every
        later token is real, so a prompt's steps stop asking after the first all-real one (``generate``'s usual
        one-chunk prefill asks once)."""
        configured = (self.config.output_hidden_states, self.config.output_router_logits, self.config.output_attentions)
        if any(asked if asked is not None else default for asked, default in zip(outputs_asked, configured)):
            return False
        replayable = (
            isinstance(cache, KimiLinearStaticCache)
            and cache.cuda_graphs
            # a graph replays fixed weight addresses on one device: not accelerate's offload loads or a split model
            and self.model.graphable
            and use_cache is not False
            and cache.get_seq_length() > 0
            and input_ids is not None
            and input_ids.is_cuda
            and input_ids.shape[1] == 1
            and not self.training
            and not torch.is_grad_enabled()
            and labels is None
        )
        if replayable and attention_mask is not None and cache.steps_may_be_padding:
            if not bool(attention_mask[:, -1].all()):
                return False
            cache.steps_may_be_padding = False
        return replayable

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; the cache travels under the installed name.

        As transformers' own method: ``next_sequence_length`` (from ``generate``) says how many of ``input_ids`` are
        new; None means all of them (decoding without a cache, chunked prefill, or only new tokens passed).
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if isinstance(cache, KimiLinearCache) else 0
        new = kwargs.get("next_sequence_length")
        if new is not None and new <= 0:
            # Not only a new prompt: also a continuation given only its new tokens, without the mask of the whole.
            given = inputs_embeds.shape[1] if inputs_embeds is not None else input_ids.shape[1]
            raise ValueError(
                f"the cache already holds {past} positions and the {given} tokens given add none: to continue, pass "
                f"the whole sequence (prompt and generated tokens), or only the new tokens with an attention_mask over "
                f"all past and new positions; to start a new prompt, call cache.reset() (or pass a new cache)"
            )
        if inputs_embeds is not None and (past == 0 or kwargs.get("is_first_iteration")):
            # a prompt given as embeddings (after a filled cache: the whole sequence's, as for input_ids)
            model_inputs: dict = {"inputs_embeds": inputs_embeds if new is None else inputs_embeds[:, -new:]}
        elif past > 0:
            model_inputs = {"input_ids": input_ids if new is None else input_ids[:, -new:]}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(attention_mask=attention_mask, use_cache=use_cache, **{CACHE_FIELD: cache})
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        # The rest goes on to forward as transformers' own method passes it (output_hidden_states,
        # output_router_logits, ...); positions only mark packed prompts, and the prompt's would not fit a step.
        skip = {"cache", "past_key_values", "next_sequence_length", "labels", "position_ids", "cache_position"}
        skip |= model_inputs.keys()
        model_inputs.update({key: value for key, value in kwargs.items() if key not in skip})
        return model_inputs


class KimiLinearAttnResModel(KimiLinearModel):
    """:class:`KimiLinearModel` for ``model_type: "kimi_linear_attn_res"`` checkpoints (Auto classes)."""

    config_class = KimiLinearAttnResConfig


class KimiLinearAttnResForCausalLM(KimiLinearForCausalLM):
    """:class:`KimiLinearForCausalLM` for ``model_type: "kimi_linear_attn_res"`` checkpoints (Auto classes); its
    base model is a :class:`KimiLinearAttnResModel`, so that a saved ``auto_map`` pairs each class with its config."""

    config_class = KimiLinearAttnResConfig
    base_model_class = KimiLinearAttnResModel


__all__ = [
    "KimiLinearAttnResForCausalLM",
    "KimiLinearAttnResModel",
    "KimiLinearCache",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
]
