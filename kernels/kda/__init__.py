"""Kimi Delta Attention (KDA): chunked (training/prefill) and recurrent (decode) ops.

Layout as in fla: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]`` (post-sigmoid, or its logits
with ``use_beta_sigmoid_in_kernel``),
states ``[N, H, K, V]`` fp32. ``backend=None`` picks Triton for CUDA tensors (not fp64) and the plain-torch
reference otherwise (see :func:`kimi_hf.kernels.resolve_backend`).
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .naive import naive_chunk_kda, naive_recurrent_kda
from .utils import beta_sigmoid, check_kda_inputs, default_dt_bias, kda_gate, l2norm

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda_gate", "naive_chunk_kda", "naive_recurrent_kda"]


def _torch_prologue(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the Triton kernels fuse, done in plain torch for the reference path."""
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if use_gate_in_kernel:
        g = kda_gate(g, A_log, dt_bias)
    return q, k, g


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA over whole sequences in chunks of 64 tokens (training and prefill). Differentiable.

    fla 0.6.0's ``chunk_kda`` signature: the same positional arguments up to ``use_beta_sigmoid_in_kernel``, the
    rest keyword-only (fla's next positions are options we do not have).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. beta: ``[B, T, H]``, already sigmoid.
        g: ``[B, T, H, K]`` natural-log decay, <= 0 (fp32 recommended; the kernels factor in-chunk
            decays through pivots, exact and overflow-free for decays); with ``use_gate_in_kernel``
            the raw gate pre-activation, turned into ``-exp(A_log) * softplus(g + dt_bias)`` by the op.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``, fp32 (bf16/fp16, as fla takes them, are read as fp32; the gradient comes
            back in its dtype); N = B, or ``len(cu_seqlens) - 1``.
        output_final_state: also return the final ``[N, H, K, V]`` fp32 state.
        use_qk_l2norm_in_kernel: L2-normalise q and k over K inside the op.
        use_gate_in_kernel: compute the decay from raw ``g`` with ``A_log`` (``[H]`` or ``[1, 1, H, 1]``)
            and ``dt_bias`` (``[H*K]`` or ``[H, K]``; None: no bias, as in fla).
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the op applies the sigmoid (in fp32; here before the
            chunk kernels, an elementwise op autograd differentiates).
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of sequences packed along T (B must be 1).
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final state [N, H, K, V] or None)``.
    """
    check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias)
    dt_bias = default_dt_bias(dt_bias, g, use_gate_in_kernel)
    if use_beta_sigmoid_in_kernel:
        beta = beta_sigmoid(beta)
    if resolve_backend(backend, q) == "triton":
        from .chunk import chunk_kda_triton

        return chunk_kda_triton(
            q, k, v, g, beta, scale, initial_state, output_final_state,
            use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias, cu_seqlens,
        )  # fmt: skip
    q, k, g = _torch_prologue(q, k, g, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias)
    return naive_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    *,
    cu_seqlens: torch.Tensor | None = None,
    inplace_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA token by token, for decoding (small T). Same arguments and math as :func:`chunk_kda`, in the order of
    fla 0.6.0's ``fused_recurrent_kda`` (``A_log`` and ``dt_bias`` after ``beta``; keyword-only from
    ``cu_seqlens``, where fla's positions are options we do not have; the Triton kernel applies
    ``use_beta_sigmoid_in_kernel``'s sigmoid itself, saving a decode step two launches), plus:

    Args:
        inplace_final_state: write the final state into ``initial_state`` (which must be given,
            fp32 and contiguous) and return that same tensor as the final state. Not under autograd: the
            backward would need the state it overwrites.

    The Triton path is forward-only (decoding); the torch path is differentiable.
    """
    check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, use_gate_in_kernel, A_log, dt_bias)
    dt_bias = default_dt_bias(dt_bias, g, use_gate_in_kernel)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, A_log, dt_bias, initial_state)
    )
    if inplace_final_state:
        if initial_state is None:
            raise ValueError("inplace_final_state=True needs an initial_state to write into")
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError(
                f"inplace_final_state=True needs a contiguous fp32 initial_state, got {initial_state.dtype}"
                f"{'' if initial_state.is_contiguous() else ' (non-contiguous)'}"
            )
        if needs_grad:
            raise ValueError(
                "inplace_final_state=True overwrites initial_state, which the backward needs: under autograd "
                "use output_final_state=True, or call it under torch.no_grad() to decode"
            )
    if resolve_backend(backend, q) == "triton":
        from .fused_recurrent import fused_recurrent_kda_fwd

        if needs_grad:
            raise ValueError(
                "the Triton fused_recurrent_kda is forward-only (decoding): call it under torch.no_grad(), "
                "use chunk_kda for training, or backend='torch' for a differentiable recurrence"
            )

        return fused_recurrent_kda_fwd(
            q, k, v, g, beta,
            # float(): a 0-d tensor scale (which chunk_kda and the torch path take) reached the kernel as a pointer
            scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, A_log=A_log, dt_bias=dt_bias,
            cu_seqlens=cu_seqlens, inplace_final_state=inplace_final_state,
        )  # fmt: skip
    q, k, g = _torch_prologue(q, k, g, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = beta_sigmoid(beta)
    o, final = naive_recurrent_kda(
        q, k, v, g, beta, scale, initial_state, output_final_state or inplace_final_state, cu_seqlens
    )
    if inplace_final_state:
        initial_state.copy_(final)
        return o, initial_state
    return o, final
