"""The hybrid generation cache of Kimi Linear.

Per KDA layer it holds the short-convolution states of q, k and v (``[B, D, W]`` each: the last W
inputs) and the recurrent state ``[B, H, K, V]`` (fp32); per MLA layer the *compressed* latent
KV: the normalised latent ``[B, S, kv_lora_rank]`` and the shared rope key ``[B, S, qk_rope_head_dim]``
(the official remote code keeps the expanded per-head keys and values instead: 2 * H * 128 numbers
per token against 576 here).

The class implements what ``generate()`` asks of a cache (sequence length, beam reordering, batch
expansion and selection) without depending on ``transformers.Cache``'s constructor, which changed
between the transformers versions we support.
"""

from __future__ import annotations

import torch

from .configuration_kimi_linear import KimiLinearConfig


class KimiLinearCache:
    """Generation cache for :class:`~kimi_hf.KimiLinearForCausalLM`.

    Args:
        config: the model's config (decides which layers are KDA and which MLA).

    Layers fill their entries lazily on their first forward; ``seen_tokens`` counts the positions
    (padding included) that went through the model, and is advanced by the model after each forward.
    """

    is_compileable = False

    def __init__(self, config: KimiLinearConfig) -> None:
        self.layer_types = config.layer_types
        n = config.num_hidden_layers
        self.conv_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n
        self.recurrent_states: list[torch.Tensor | None] = [None] * n
        self.latents: list[torch.Tensor | None] = [None] * n
        self.rope_keys: list[torch.Tensor | None] = [None] * n
        self.seen_tokens = 0

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

    def _apply(self, fn) -> None:
        for i in range(len(self.layer_types)):
            if self.conv_states[i] is not None:
                self.conv_states[i] = tuple(fn(s) for s in self.conv_states[i])
            for states in (self.recurrent_states, self.latents, self.rope_keys):
                if states[i] is not None:
                    states[i] = fn(states[i])

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
