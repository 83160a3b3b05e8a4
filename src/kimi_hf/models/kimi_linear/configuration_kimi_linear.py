"""Configuration of Kimi Linear: hybrid KDA (Kimi Delta Attention) + MLA + MoE decoder.

The field names and their meaning are those of the public checkpoints'
(``moonshotai/Kimi-Linear-48B-A3B-*``) ``config.json``, which this class reads as it is and writes back
in the same layout, so that the official remote code and transformers' native ``kimi_linear`` read
what we save. In particular ``linear_attn_config["kda_layers"]`` and ``["full_attn_layers"]`` are
**1-indexed** layer lists.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from kimi_hf.models.validation import check_positive_ints, check_positive_numbers, check_residual, is_int

ROUTER_ACTIVATIONS = ("sigmoid", "softmax")

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "num_experts",
    "num_experts_per_token",
    "moe_intermediate_size",
    "moe_layer_freq",
    "num_expert_group",
    "topk_group",
)


def _default_linear_attn_config(num_hidden_layers: int) -> dict[str, Any]:
    # The 48B model's pattern: full attention every 4th layer and at the last layer (1-indexed).
    full = sorted({i for i in range(4, num_hidden_layers + 1, 4)} | {num_hidden_layers})
    return {
        "kda_layers": [i for i in range(1, num_hidden_layers + 1) if i not in full],
        "full_attn_layers": full,
        "num_heads": 32,
        "head_dim": 128,
        "short_conv_kernel_size": 4,
    }


def _linear_attn_config_from_layer_types(
    layer_types: list[str], num_heads: int | None, head_dim: int | None, conv_size: int | None
) -> dict[str, Any]:
    """Rebuild the official ``linear_attn_config`` from a native-style (0-indexed) ``layer_types`` list."""
    unknown = sorted({t for t in layer_types} - {"linear_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types may hold 'linear_attention' or 'full_attention', got {unknown}")
    return {
        "kda_layers": [i + 1 for i, t in enumerate(layer_types) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(layer_types) if t == "full_attention"],
        "num_heads": 32 if num_heads is None else num_heads,
        "head_dim": 128 if head_dim is None else head_dim,
        "short_conv_kernel_size": 4 if conv_size is None else conv_size,
    }


class KimiLinearConfig(PreTrainedConfig):
    r"""Configuration for :class:`~kimi_hf.KimiLinearModel` and :class:`~kimi_hf.KimiLinearForCausalLM`.

    Defaults are those of Kimi-Linear-48B-A3B. Beyond the official fields:

    - ``residual`` (``"standard"``, ``"full"`` or ``"block"``) and ``attn_res_block_size`` select
      Attention Residuals (arXiv 2603.15031) in place of the residual sum. A config with AttnRes is
      saved with ``model_type: "kimi_linear_attn_res"`` so that classes that would ignore the AttnRes
      weights (transformers' native ``kimi_linear``, the official remote code) refuse it.
    - ``router_bias_update_rate``: step size of the auxiliary-loss-free load balancing of the MoE
      routers (the correction bias moves by this amount towards under-loaded experts, from the real tokens'
      load of the previous training forward, at each training forward: with N micro-batches of gradient
      accumulation that is N updates per optimizer step, where DeepSeek-V3 makes one, so divide the rate by N to
      keep its pace; 0 keeps it frozen, as the official checkpoints expect for fine-tuning).
    - ``output_router_logits``: return the routers' logits.

    Raises:
        ValueError: naming the field and the value, for inconsistent or out-of-range settings.
    """

    model_type = "kimi_linear"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "num_local_experts": "num_experts",
        "num_experts_per_tok": "num_experts_per_token",
        "n_shared_experts": "num_shared_experts",
        "n_routed_experts": "num_experts",
        "max_position_embeddings": "model_max_length",
        # the native class's spellings
        "norm_topk_prob": "moe_renormalize",
        "n_group": "num_expert_group",
    }

    def __init__(
        self,
        vocab_size: int = 163840,
        hidden_size: int = 2304,
        intermediate_size: int = 9216,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = 72,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = 163839,
        bos_token_id: int | None = 163584,
        eos_token_id: int | list[int] | None = 163586,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        model_max_length: int = 1048576,
        attention_dropout: float = 0.0,
        # MLA
        q_lora_rank: int | None = None,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        mla_use_nope: bool = True,
        # MoE
        num_experts: int = 256,
        num_experts_per_token: int = 8,
        num_shared_experts: int = 1,
        moe_intermediate_size: int = 1024,
        first_k_dense_replace: int = 1,
        moe_layer_freq: int = 1,
        moe_router_activation_func: str = "sigmoid",
        moe_renormalize: bool = True,
        routed_scaling_factor: float = 2.446,
        use_grouped_topk: bool = True,
        num_expert_group: int = 1,
        topk_group: int = 1,
        router_bias_update_rate: float = 0.0,
        output_router_logits: bool = False,
        # KDA
        linear_attn_config: dict[str, Any] | None = None,
        # Attention Residuals
        residual: str = "standard",
        attn_res_block_size: int | None = None,
        # Written by transformers' native class: derived views of the fields above, checked and not stored.
        layer_types: list[str] | None = None,
        mlp_layer_types: list[str] | None = None,
        linear_num_heads: int | None = None,
        linear_head_dim: int | None = None,
        linear_conv_kernel_dim: int | None = None,
        qk_head_dim: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        if rope_scaling is not None:  # transformers >= 5.2x warns on any assignment (rope_parameters replaces it)
            self.rope_scaling = rope_scaling
        self.model_max_length = model_max_length
        self.attention_dropout = attention_dropout
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.mla_use_nope = mla_use_nope
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.moe_router_activation_func = moe_router_activation_func
        self.moe_renormalize = moe_renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.router_bias_update_rate = router_bias_update_rate
        self.output_router_logits = output_router_logits
        if linear_attn_config is None and layer_types is not None:
            linear_attn_config = _linear_attn_config_from_layer_types(
                layer_types, linear_num_heads, linear_head_dim, linear_conv_kernel_dim
            )
        # the default layer lists and their checks count on these (moe_layer_freq 0: a ZeroDivisionError there)
        check_positive_ints(self, ("num_hidden_layers", "moe_layer_freq"))
        if linear_attn_config is None:
            linear_attn_config = _default_linear_attn_config(num_hidden_layers)
        if not isinstance(linear_attn_config, Mapping):  # dict() of a list failed with an unrelated TypeError
            raise ValueError(
                "linear_attn_config must be a dict (kda_layers, full_attn_layers, num_heads, head_dim, "
                f"short_conv_kernel_size), got {linear_attn_config!r}"
            )
        # A deep copy, so that the caller's dict (often the json one) and its lists are never aliased.
        self.linear_attn_config = copy.deepcopy(dict(linear_attn_config))
        # Checked before PreTrainedConfig.__init__, which reads `layer_types` (derived from the layer lists): a bad
        # list failed there with "'NoneType' object is not iterable"; validate() checks it again after assignments.
        self._validate_linear_attn_config()
        self.residual = residual
        self.attn_res_block_size = attn_res_block_size
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()
        self._check_native_views(layer_types, mlp_layer_types, linear_num_heads, linear_head_dim, qk_head_dim)

    # ------------------------------------------------------------------ derived views
    @property
    def kda_layers(self) -> list[int]:
        """0-indexed KDA layers."""
        return [i - 1 for i in self.linear_attn_config["kda_layers"]]

    @property
    def full_attn_layers(self) -> list[int]:
        """0-indexed MLA (full attention) layers."""
        return [i - 1 for i in self.linear_attn_config["full_attn_layers"]]

    @property
    def layer_types(self) -> list[str]:
        """Per layer (0-indexed): ``"linear_attention"`` (KDA) or ``"full_attention"`` (MLA)."""
        kda = set(self.kda_layers)
        return ["linear_attention" if i in kda else "full_attention" for i in range(self.num_hidden_layers)]

    @property
    def linear_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def linear_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def linear_conv_kernel_size(self) -> int:
        return int(self.linear_attn_config.get("short_conv_kernel_size", 4))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The official rule (0-indexed): MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def mlp_layer_types(self) -> list[str]:
        """Per layer (0-indexed): ``"sparse"`` (MoE) or ``"dense"``, as transformers' native config spells it."""
        return ["sparse" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    @property
    def num_sublayers(self) -> int:
        """Attention and MLP/MoE sublayers: the "layers" of Attention Residuals."""
        return 2 * self.num_hidden_layers

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one.

        Also run by transformers' ``save_pretrained`` (the hook's name) and by the models' constructors: fields set
        after ``__init__`` (``from_pretrained(path, **overrides)``, attribute assignments) are checked there.
        """
        check_positive_ints(self, _POSITIVE_INT_FIELDS)
        for name in ("qk_rope_head_dim", "num_shared_experts", "first_k_dense_replace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"q_lora_rank must be None or a positive integer, got {self.q_lora_rank!r}")
        # routed_scaling_factor multiplies every routed expert's output: NaN gave NaN logits, a string failed in the
        # first MoE forward with an unrelated TypeError
        check_positive_numbers(self, ("rms_norm_eps", "routed_scaling_factor"))
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of transformers' activations {sorted(ACT2FN)}, "
                             f"got {self.hidden_act!r}")  # fmt: skip
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            token = getattr(self, name)
            # eos_token_id may be a list (generate stops at any of them). It was not checked: a small vocabulary
            # given without eos_token_id kept the 48B id 163586, which no logit can produce, so generate never
            # stopped at the end of a sequence.
            tokens = token if name == "eos_token_id" and isinstance(token, (list, tuple)) else [token]
            if any(t is not None and (not is_int(t) or not 0 <= t < self.vocab_size) for t in tokens):
                raise ValueError(
                    f"{name} must be None or in [0, vocab_size={self.vocab_size}), got {token!r} (the defaults are "
                    "the 48B checkpoints' ids: give pad_token_id, bos_token_id and eos_token_id with a smaller vocab)"
                )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}): MLA expands one latent into per-head keys and values"
            )
        if not self.mla_use_nope:
            raise ValueError(
                "mla_use_nope=False (rotary MLA) is not supported: Kimi Linear's MLA layers use no positional "
                "encoding (the KDA layers carry position), and no public checkpoint sets it"
            )
        # `rope_scaling` is stored by transformers as `rope_parameters`. With no rotary embedding anywhere, a scaling
        # (YaRN, linear, ...) was accepted and did nothing: a "context extension" that never happened.
        rope = getattr(self, "rope_parameters", None)
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type != "default":
            raise ValueError(
                f"rope_scaling={rope!r} has no effect: Kimi Linear has no rotary position embedding (its MLA layers "
                "use none, mla_use_nope=True, and the KDA layers need none); leave rope_scaling null"
            )
        if self.num_experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_token ({self.num_experts_per_token}) must be <= num_experts ({self.num_experts})"
            )
        if self.moe_router_activation_func not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"moe_router_activation_func must be one of {ROUTER_ACTIVATIONS}, "
                f"got {self.moe_router_activation_func!r}"
            )
        if self.num_experts % self.num_expert_group:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by num_expert_group ({self.num_expert_group})"
            )
        if self.topk_group > self.num_expert_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= num_expert_group ({self.num_expert_group})")
        if self.use_grouped_topk and self.num_experts_per_token > self.topk_group * (
            self.num_experts // self.num_expert_group
        ):
            raise ValueError(
                f"num_experts_per_token ({self.num_experts_per_token}) exceeds the experts reachable in topk_group "
                f"({self.topk_group}) groups of {self.num_experts // self.num_expert_group}"
            )
        rate = self.router_bias_update_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"router_bias_update_rate must be a finite number >= 0, got {rate!r}")
        self._validate_linear_attn_config()
        check_residual(self.residual, self.attn_res_block_size, self.num_sublayers)

    def _validate_linear_attn_config(self) -> None:
        cfg = self.linear_attn_config
        for key in ("kda_layers", "full_attn_layers", "num_heads", "head_dim"):
            if key not in cfg:
                raise ValueError(f"linear_attn_config is missing {key!r} (got keys {sorted(cfg)})")
        for key in ("kda_layers", "full_attn_layers"):
            if not isinstance(cfg[key], (list, tuple)):  # None or a bare int failed with "... is not iterable"
                raise ValueError(f"linear_attn_config[{key!r}] must be a list of 1-indexed layers, got {cfg[key]!r}")
        for key in ("num_heads", "head_dim", "short_conv_kernel_size"):
            value = cfg.get(key, 4)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"linear_attn_config[{key!r}] must be a positive integer, got {value!r}")
        n = self.num_hidden_layers
        seen: dict[int, str] = {}
        for key in ("kda_layers", "full_attn_layers"):
            for layer in cfg[key]:
                if not is_int(layer) or not 1 <= layer <= n:
                    raise ValueError(
                        f"linear_attn_config[{key!r}] names layer {layer!r}: the lists hold integers in 1..{n} "
                        f"(1-indexed, num_hidden_layers={n})"
                    )
                if layer in seen:
                    raise ValueError(
                        f"linear_attn_config: layer {layer} is listed in both {seen[layer]!r} and {key!r}"
                        if seen[layer] != key
                        else f"linear_attn_config[{key!r}] lists layer {layer} twice"
                    )
                seen[layer] = key
        missing = [i for i in range(1, n + 1) if i not in seen]
        if missing:
            raise ValueError(
                f"linear_attn_config: layers {missing} (1-indexed) are in neither 'kda_layers' nor 'full_attn_layers'"
            )

    def _check_native_views(
        self,
        layer_types: list[str] | None,
        mlp_layer_types: list[str] | None,
        linear_num_heads: int | None,
        linear_head_dim: int | None,
        qk_head_dim: int | None,
    ) -> None:
        """A config written by transformers' native class repeats fields in derived form: they must agree."""
        expected = {
            "layer_types": self.layer_types,
            "mlp_layer_types": self.mlp_layer_types,
            "linear_num_heads": self.linear_num_heads,
            "linear_head_dim": self.linear_head_dim,
            "qk_head_dim": self.qk_head_dim,
        }
        given = {
            "layer_types": layer_types,
            "mlp_layer_types": mlp_layer_types,
            "linear_num_heads": linear_num_heads,
            "linear_head_dim": linear_head_dim,
            "qk_head_dim": qk_head_dim,
        }
        for name, value in given.items():
            if value is None:
                continue
            value = list(value) if isinstance(value, (list, tuple)) else value
            if value != expected[name]:
                raise ValueError(f"{name}={value!r} contradicts the other fields, which give {expected[name]!r}")

    # ------------------------------------------------------------------ serialisation
    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in (KimiLinearConfig.model_type, KimiLinearAttnResConfig.model_type):
            # Both spellings are ours; the `residual` field, not the class, decides which one is written.
            config_dict = {k: v for k, v in config_dict.items() if k != "model_type"}
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["model_type"] = (
            KimiLinearConfig.model_type if self.residual == "standard" else KimiLinearAttnResConfig.model_type
        )
        if self.moe_layer_freq != 1:
            # transformers' native class ignores moe_layer_freq and reads this (else it derives it from
            # first_k_dense_replace alone, and builds other layers than ours); official configs (frequency 1)
            # stay as they are
            output["mlp_layer_types"] = self.mlp_layer_types
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs: Any) -> None:
        """As transformers'; warns when the checkpoint, saved as ``kimi_linear``, uses routing that transformers'
        native class does not read (it loads such a checkpoint without a word and computes other logits)."""
        ignored = self._options_the_native_class_ignores()
        if ignored:
            warnings.warn(
                f"saving a kimi_linear checkpoint with {', '.join(ignored)}: transformers' native "
                "KimiLinearForCausalLM ignores this and would load it with other logits (it always routes by sigmoid "
                "scores, groups the experts by num_expert_group and renormalises even one expert's weight); load it "
                "with kimi_hf's class or trust_remote_code=True",
                stacklevel=2,
            )
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _options_the_native_class_ignores(self) -> list[str]:
        """Routing options of ours that a checkpoint of ``model_type: kimi_linear`` cannot carry to the native class.
        (AttnRes checkpoints have their own model type, which the native class does not take through the Auto
        classes.)"""
        if self.residual != "standard":
            return []
        ignored = []
        if self.moe_router_activation_func != "sigmoid":
            ignored.append(f"moe_router_activation_func={self.moe_router_activation_func!r}")
        if not self.use_grouped_topk and self.num_expert_group > 1:
            ignored.append(f"use_grouped_topk=False with num_expert_group={self.num_expert_group}")
        if self.num_experts_per_token == 1 and self.moe_renormalize:  # ours, as the official code: no renormalising
            ignored.append("num_experts_per_token=1 with moe_renormalize=True")
        return ignored

    def to_diff_dict(self) -> dict[str, Any]:
        # Write every field, like the official config.json: readers with other defaults (the native class,
        # the official remote code) must see our values, not theirs. Not `_name_or_path` (where the config was read
        # from), which transformers' own diff drops too: a local path leaked into a published config.json, and a
        # save -> load -> save round trip changed the file.
        output = self.to_dict()
        output.pop("_name_or_path", None)
        return output


class KimiLinearAttnResConfig(KimiLinearConfig):
    """Kimi Linear with Attention Residuals (``model_type: "kimi_linear_attn_res"``).

    The same fields as :class:`KimiLinearConfig`, with Block AttnRes by default (6 sublayers per block,
    as the paper's 48B model). Its own model type keeps classes that would ignore the AttnRes
    weights (transformers' native ``kimi_linear``, the official remote code) from taking the checkpoint.
    """

    model_type = "kimi_linear_attn_res"

    def __init__(self, residual: str = "block", attn_res_block_size: int | None = 6, **kwargs) -> None:
        super().__init__(residual=residual, attn_res_block_size=attn_res_block_size, **kwargs)
