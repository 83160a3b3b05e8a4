"""Input checks and small plain-torch helpers shared by every KDA path (reference and Triton)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Same epsilon as fla's l2norm (x / sqrt(sum x^2 + eps)), so results match it.
L2NORM_EPS = 1e-6
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, computed in fp32 (fp64 stays fp64); returns x's dtype."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def gate_params(A_log: torch.Tensor, dt_bias: torch.Tensor, H: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape the gate parameters to ``A_log [H]`` and ``dt_bias [H, K]`` (views, dtype kept).

    ``A_log`` may be ``[H]`` or the checkpoint's ``[1, 1, H, 1]``; ``dt_bias`` may be ``[H*K]`` or ``[H, K]``.
    """
    if not isinstance(A_log, torch.Tensor) or tuple(A_log.shape) not in ((H,), (1, 1, H, 1)):
        got = tuple(A_log.shape) if isinstance(A_log, torch.Tensor) else type(A_log).__name__
        raise ValueError(f"A_log must have shape ({H},) or (1, 1, {H}, 1), got {got}")
    if not isinstance(dt_bias, torch.Tensor) or tuple(dt_bias.shape) not in ((H * K,), (H, K)):
        got = tuple(dt_bias.shape) if isinstance(dt_bias, torch.Tensor) else type(dt_bias).__name__
        raise ValueError(f"dt_bias must have shape ({H * K},) or ({H}, {K}), got {got}")
    return A_log.reshape(H), dt_bias.reshape(H, K)


def default_dt_bias(dt_bias: torch.Tensor | None, g: torch.Tensor, use_gate_in_kernel: bool) -> torch.Tensor | None:
    """fla's ``dt_bias`` is optional with the fused gate: None there is no bias, zeros ``[H*K]`` (fp32, no grad);
    ``g`` is ``[..., H, K]``."""
    if use_gate_in_kernel and dt_bias is None:
        return torch.zeros(g.shape[-2] * g.shape[-1], device=g.device, dtype=torch.float32)
    return dt_bias


def beta_sigmoid(beta: torch.Tensor) -> torch.Tensor:
    """``sigmoid(beta)`` in fp32 at least (fp64 stays fp64): what ``use_beta_sigmoid_in_kernel`` applies to raw beta
    logits, at the precision the kernels apply it."""
    return torch.sigmoid(beta.to(torch.promote_types(beta.dtype, torch.float32)))


def kda_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """KDA's per-channel log-decay ``-exp(A_log[h]) * softplus(g + dt_bias[h])``.

    Args:
        g: raw gate pre-activation ``f_b(f_a(x))`` reshaped to ``[..., H, K]`` (any leading dims, as fla's gate
            functions take it: ``[B, T, H, K]`` in prefill, ``[B, H, K]`` or packed ``[N, H, K]`` rows too).
        A_log: ``[H]`` or ``[1, 1, H, 1]``.
        dt_bias: ``[H*K]`` or ``[H, K]``, or None for no bias (as fla's ``naive_kda_gate``/``fused_kda_gate``).

    Returns:
        g's shape in fp32 (fp64 when ``g`` is fp64), always <= 0.
    """
    if not isinstance(g, torch.Tensor) or g.dim() < 2:
        raise ValueError(f"g must be [..., H, K], got {tuple(g.shape) if isinstance(g, torch.Tensor) else g!r}")
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    A_log, dt_bias = gate_params(A_log, default_dt_bias(dt_bias, g, True), g.shape[-2], g.shape[-1])
    decay_rate = A_log.to(dtype).exp()[:, None]
    return -decay_rate * F.softplus(g.to(dtype) + dt_bias.to(dtype))


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> int:
    """Validate KDA inputs (see :func:`kimi_hf.kernels.kda.chunk_kda` for the layout).

    Raises:
        ValueError: naming the first bad shape, dtype, device or option.

    Returns:
        N, the number of sequences (``B``, or ``len(cu_seqlens) - 1``).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have q's shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if tuple(g.shape) != (B, T, H, K):
        raise ValueError(f"g must be [B, T, H, K] = {(B, T, H, K)}, got {tuple(g.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("use_gate_in_kernel=True needs A_log (dt_bias is optional, as in fla)")
        gate_params(A_log, dt_bias if dt_bias is not None else torch.zeros(H * K), H, K)
    elif A_log is not None or dt_bias is not None:
        raise ValueError("A_log/dt_bias are only used with use_gate_in_kernel=True; apply kda_gate yourself otherwise")
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] of sequence offsets")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along T: batch size must be 1, got {B}")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {offsets}")
        N = len(offsets) - 1
    if initial_state is not None:
        V = v.shape[-1]
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (N, H, K, V):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}, got {got}")
        # fla takes a state of any float dtype (its own example passes bf16) and reads it as fp32
        if initial_state.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"initial_state must be a floating tensor (fp32 recommended), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return N
