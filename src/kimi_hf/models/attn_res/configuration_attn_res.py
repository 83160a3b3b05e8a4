"""Configuration of the dense Llama-style decoder with Attention Residuals (arXiv 2603.15031)."""

from __future__ import annotations

from transformers import PreTrainedConfig

from kimi_hf.models.validation import check_positive_ints, check_positive_numbers, check_residual

KERNEL_BACKENDS = ("triton", "torch")

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


class AttnResConfig(PreTrainedConfig):
    r"""Configuration for :class:`~kimi_hf.AttnResModel` / :class:`~kimi_hf.AttnResForCausalLM`.

    A Llama-style decoder (RMSNorm, GQA attention with RoPE, SwiGLU MLP) whose residual stream is
    selected by ``residual``:

    - ``"standard"``: h + f(norm(h)).
    - ``"full"``: Full AttnRes, every sublayer attends over the embedding and all earlier sublayer outputs.
    - ``"block"``: Block AttnRes with ``attn_res_block_size`` sublayers per block (attention and MLP are one
      sublayer each: ``2 * num_hidden_layers`` sublayers; the last block takes the remainder).

    Other AttnRes fields: ``attn_res_eps`` (key RMSNorm epsilon), ``attn_res_two_phase`` (the inference path
    under ``torch.no_grad()``: two-phase depth attention, residual additions fused into the next read),
    ``attn_res_backend`` (``"triton"``, ``"torch"`` or None = automatic).

    RoPE is the default (unscaled) one with ``rope_theta`` (default 10000), which transformers 5's
    ``rope_parameters={"rope_type": "default", "rope_theta": ...}`` may give instead; scaled RoPE types
    (``rope_scaling``/``rope_parameters`` with another ``rope_type``) are not implemented and refused.

    Raises:
        ValueError: naming the field and the value, for inconsistent or out-of-range settings (also for fields
            set after ``__init__``: when a model is built from the config, or the config is saved).
    """

    model_type = "kimi_attn_res"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 5632,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        residual: str = "block",
        attn_res_block_size: int | None = 8,
        attn_res_eps: float = 1e-6,
        attn_res_two_phase: bool = True,
        attn_res_backend: str | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None and num_attention_heads else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.residual = residual
        self.attn_res_block_size = attn_res_block_size
        self.attn_res_eps = attn_res_eps
        self.attn_res_two_phase = attn_res_two_phase
        self.attn_res_backend = attn_res_backend
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._resolve_rope_theta()
        self.validate()

    def _resolve_rope_theta(self) -> None:
        """Take ``rope_theta`` from ``rope_parameters`` (where transformers puts ``rope_scaling`` too) when it is given
        there; refuse RoPE scaling, which the model does not implement (it would be saved and silently ignored)."""
        params = self.__dict__.get("rope_parameters") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        unknown = set(params) - {"rope_type", "type", "rope_theta"}
        if rope_type != "default" or unknown:
            raise ValueError(
                f"only the default RoPE is implemented (rope_type 'default' with rope_theta), got rope "
                f"parameters {params!r}"
            )
        theta = params.get("rope_theta")
        if theta is not None and self.rope_theta is not None and theta != self.rope_theta:
            raise ValueError(f"rope_theta {self.rope_theta!r} and rope_parameters' rope_theta {theta!r} differ")
        if self.rope_theta is None:
            self.rope_theta = 10000.0 if theta is None else theta

    @property
    def num_sublayers(self) -> int:
        """Attention and MLP sublayers: the "layers" of the AttnRes paper."""
        return 2 * self.num_hidden_layers

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one.

        Also run by transformers' ``save_pretrained`` (the hook's name) and by the models' constructors: fields set
        after ``__init__`` (``from_pretrained(path, **overrides)``, attribute assignments) are checked there.
        """
        check_positive_ints(self, _POSITIVE_INT_FIELDS)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_positive_numbers(self, ("rms_norm_eps", "attn_res_eps", "rope_theta", "initializer_range"))
        dropout = self.attention_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"attention_dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(self.attn_res_two_phase, bool):
            raise ValueError(f"attn_res_two_phase must be True or False, got {self.attn_res_two_phase!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        check_residual(self.residual, self.attn_res_block_size, self.num_sublayers)
        if self.attn_res_backend is not None and self.attn_res_backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"attn_res_backend must be None or one of {KERNEL_BACKENDS}, got {self.attn_res_backend!r}"
            )


__all__ = ["AttnResConfig"]
