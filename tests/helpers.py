"""Assertions and configs shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path;
the repository root must not be on it, or its `kernels/` folder would shadow Hugging Face's `kernels`)."""

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms, in float64).

    NaN or inf in either tensor, or a shape mismatch, raises AssertionError: a relative error computed from NaN
    compares False, and we check finiteness explicitly so that it cannot pass by accident.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: result has NaN/inf")
    if not torch.isfinite(e).all():
        raise AssertionError(f"{name}: reference has NaN/inf")
    return (a - e).norm().item() / max(e.norm().item(), 1e-30)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Assert ``||actual - expected|| <= rtol * ||expected||`` (``relative_error``; NaN or inf always fails)."""
    rel = relative_error(actual, expected, name)
    if not rel <= rtol:
        ref = expected.detach().double().norm().item()
        raise AssertionError(f"{name}: relative error {rel:.3e} > {rtol:.1e} (abs {rel * ref:.3e}, ref norm {ref:.3e})")


def tiny_kimi_linear_config(**overrides):
    """A 4-layer Kimi Linear (KDA at layers 1, 2, 4; MLA at 3; 8 experts, top 2) for GPU tests; ``overrides`` replace
    any argument of :class:`kimi_hf.KimiLinearConfig`."""
    from kimi_hf import KimiLinearConfig

    kwargs = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_experts=8,
        num_experts_per_token=2, moe_intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "num_heads": 2, "head_dim": 64},
    )  # fmt: skip
    return KimiLinearConfig(**{**kwargs, **overrides})
