"""Plain-torch depth attention of Attention Residuals (arXiv 2603.15031).

For one sublayer with pseudo-query ``w`` [D] and key-norm gain ``g`` [D], over sources ``v_i`` [..., D]:

    s_i   = w . (g * v_i * rsqrt(mean(v_i^2) + eps))      (no 1/sqrt(D) scale)
    alpha = softmax_i(s_i)
    h     = sum_i alpha_i v_i

``naive_depth_attention`` is the paper's formula written out (stacks the sources: a reference only).
``torch_depth_attention`` / ``torch_phase1`` / ``torch_phase2`` are the plain-torch backend the module uses
off-GPU: they loop over the sources (no stacking copy) and reuse per-source rsqrt statistics computed once.
All score/softmax arithmetic is float32 (float64 for float64 inputs); outputs come back in the sources' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def source_rstd(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(v^2, -1) + eps)`` in float32 (float64 for float64 ``v``), shape ``[..., 1]`` for ``v`` [..., D]."""
    sq_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=_acc(v)).square()
    return torch.rsqrt(sq_norm / v.shape[-1] + eps)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A sublayer's PreNorm as transformers writes it: ``weight * (h * rsqrt(mean(h^2) + eps)).to(h.dtype)``."""
    hf = h.to(_acc(h))
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def naive_depth_attention(
    sources: Sequence[torch.Tensor] | torch.Tensor, query: torch.Tensor, gain: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Reference depth attention.

    Args:
        sources: N tensors [..., D] (or one stacked tensor [N, ..., D]).
        query: pseudo-query w [D].
        gain: RMSNorm gain g [D] of the keys.
    Returns:
        h [..., D] in the sources' dtype.
    """
    values = torch.stack(list(sources)) if not isinstance(sources, torch.Tensor) else sources
    acc = torch.promote_types(_acc(values), query.dtype)
    v = values.to(acc)
    keys = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain.to(acc)
    scores = keys @ query.to(acc)  # [N, ...]
    alpha = torch.softmax(scores, dim=0)
    return (alpha.unsqueeze(-1) * v).sum(0).to(values.dtype)


def _scores(sources: Sequence[torch.Tensor], rstds: Sequence[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """Scores [..., N] of the sources against ``u`` [D, Q] (``w * g`` per query): r_i * (v_i @ u)."""
    # In the statistics' dtype (fp32): in fp16 a dot of large activations overflows, and bf16 loses 2^-8 of it.
    return torch.stack([r * (v.to(r.dtype) @ u.to(r.dtype)) for v, r in zip(sources, rstds)], dim=-2)


def torch_depth_attention(
    sources: Sequence[torch.Tensor],
    rstds: Sequence[torch.Tensor],
    query: torch.Tensor,
    gain: torch.Tensor,
) -> torch.Tensor:
    """Depth attention over ``sources`` (each [..., D]) with their cached ``rstds`` (each [..., 1] float32).

    Differentiable (the rstds carry their own graph back to the sources). Returns h [..., D].
    """
    u = (query.to(_acc(query)) * gain.to(_acc(query))).unsqueeze(-1)  # [D, 1]
    alpha = torch.softmax(_scores(sources, rstds, u).squeeze(-1), dim=-1)  # [..., N]
    out = sum(alpha[..., i : i + 1] * v for i, v in enumerate(sources))
    return out.to(sources[0].dtype)


def torch_phase1(
    sources: Sequence[torch.Tensor], rstds: Sequence[torch.Tensor], queries: torch.Tensor, gains: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 of two-phase inference: Q pseudo-queries against the completed sources in one pass.

    Args:
        sources / rstds: N tensors [..., D] and their float32 rstd [..., 1].
        queries, gains: [Q, D].
    Returns:
        out [Q, ..., D] (softmax-normalised over the sources, sources' dtype) and lse [Q, ...] float32.
    """
    u = (queries.to(_acc(queries)) * gains.to(_acc(queries))).t()  # [D, Q]
    scores = _scores(sources, rstds, u)  # [..., N, Q]
    lse = torch.logsumexp(scores, dim=-2)  # [..., Q]
    alpha = torch.exp(scores - lse.unsqueeze(-2))
    out = sum(alpha[..., i, :].unsqueeze(-1) * v.unsqueeze(-2) for i, v in enumerate(sources))  # [..., Q, D]
    return out.movedim(-2, 0).to(sources[0].dtype), lse.movedim(-1, 0)


def _source_score(v: torch.Tensor, query: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """The score [...] of one source v [..., D]: rstd(v) * (v . (query * gain)), in float32 (float64 for float64)."""
    rstd = source_rstd(v, eps).squeeze(-1)
    return rstd * (v.to(rstd.dtype) @ (query.to(rstd.dtype) * gain.to(rstd.dtype)))


def torch_phase2(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Phase 2: merge one query's phase-1 result (out [..., D], lse [...]) with the intra-block partial sum.

    The partial sum is one more source; online-softmax merging of the two parts is exact. ``lse=None``: out is a
    lone source, whose lse is its own score.
    """
    s_p = _source_score(partial, query, gain, eps)
    if lse is None:
        lse = _source_score(out, query, gain, eps)
    new_lse = torch.logaddexp(lse, s_p)
    h = torch.exp(lse - new_lse).unsqueeze(-1) * out + torch.exp(s_p - new_lse).unsqueeze(-1) * partial
    return h.to(out.dtype)
