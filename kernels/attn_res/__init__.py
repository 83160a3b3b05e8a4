"""Depth attention of Attention Residuals (arXiv 2603.15031): public ops.

A :class:`SourceBank` holds the completed depth sources of one forward pass (the embedding, then one
representation per finished block) exactly once; it is immutable (``append_source`` returns a new bank
sharing the buffers), which keeps decoder layers re-runnable under gradient checkpointing.

    bank = new_source_bank(num_slots, embeddings)            # backend chosen here (resolve_backend)
    bank = append_source(bank, embeddings)                   # v_0
    h = depth_attention(bank, query, gain, partial)          # training / general path, differentiable
    x = depth_attention(bank, query, gain, partial, norm_weight=w)  # ... with the sublayer's PreNorm fused
    bank = append_source(bank, partial, last_output)         # b_n = partial + f(h), stored once
    out, lse = depth_attention_phase1(bank, queries, gains)  # inference: a block's Q queries at once
    h = depth_attention_phase2(out[j], lse[j], partial, queries[j], gains[j], eps, norm_weight=w)
    x = prenorm(h, w, eps)                                   # standard residual: the same PreNorm, one kernel

Inference with the residual bookkeeping fused into the reads (one launch per sublayer on Triton):

    bank, out, lse, x0 = append_source_phase1(bank, partial, last_output, queries, gains, w0)  # block boundary
    # (first_out=False: out holds queries 1 .. Q - 1 only, query 0 is read through x0)
    x, partial = depth_attention_phase2_add(out[j], lse[j], partial, last_output, queries[j], gains[j], eps, w)
    h, x = add_prenorm(h, last_output, w, eps)               # standard residual: add + PreNorm

Triton backend (CUDA, or CPU under TRITON_INTERPRET=1): fused kernels (``fused.py``, ``two_phase.py``);
torch backend: ``naive.py``. ``naive_depth_attention`` is the stacking reference used by the tests.
``prenorm`` (Triton: ``norm.py``) is the standard residual's PreNorm, so that the baseline gets a fused norm
as AttnRes's read does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .._backend import resolve_backend
from .naive import naive_depth_attention, rms_norm, source_rstd, torch_depth_attention, torch_phase1, torch_phase2


@dataclass(frozen=True)
class SourceBank:
    """Completed sources of one forward pass.

    Attributes:
        backend: "triton" or "torch".
        eps: epsilon of the key RMSNorm.
        dtype: dtype the sources are kept in.
        shape: shape of every source [..., D].
        capacity: number of slots.
        handles: per source, the tensor autograd tracks (torch: the source itself; triton: a view of its slot).
        rstds: torch backend: per-source cached rsqrt(mean(v^2) + eps) [..., 1] float32.
        storage: triton backend: the shared ``SourceStorage`` ([capacity, M, D] store, rstd, grads).
    """

    backend: str
    eps: float
    capacity: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    handles: tuple[torch.Tensor, ...] = ()
    rstds: tuple[torch.Tensor, ...] = ()
    storage: object | None = None

    @property
    def num_sources(self) -> int:
        return len(self.handles)


def new_source_bank(num_slots: int, like: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> SourceBank:
    """An empty bank for ``num_slots`` sources shaped like ``like`` [..., D] (same dtype/device)."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    choice = resolve_backend(backend, like)
    storage = None
    if choice == "triton":
        from .fused import SourceStorage

        storage = SourceStorage(num_slots, like, eps)
    return SourceBank(
        backend=choice, eps=eps, capacity=num_slots, dtype=like.dtype, shape=tuple(like.shape), storage=storage
    )


def _check_shape(bank: SourceBank, t: torch.Tensor, name: str) -> None:
    if tuple(t.shape) != bank.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, the bank's sources have {bank.shape}")


def append_source(bank: SourceBank, x: torch.Tensor, y: torch.Tensor | None = None) -> SourceBank:
    """Return a bank with one more source, ``x + y`` (or ``x``), and its normalisation statistic cached.

    Sources are kept in the dtype of the bank's ``like`` tensor (e.g. float32 embeddings while autocast
    produces bfloat16 sublayer outputs); depth-attention outputs come back in that dtype too.
    """
    if bank.num_sources >= bank.capacity:
        raise ValueError(f"source bank is full ({bank.capacity} slots)")
    _check_shape(bank, x, "source")
    if y is not None:
        _check_shape(bank, y, "second summand")
    if bank.backend == "triton":
        from .fused import StoreSourceFunction

        handle = StoreSourceFunction.apply(bank.storage, bank.num_sources, x, y)
        return replace(bank, handles=bank.handles + (handle,))
    # summed in the wider dtype: a bf16 block sum stored in an fp32 bank would otherwise be rounded first
    v = x.to(bank.dtype) if y is None else x.to(torch.promote_types(bank.dtype, x.dtype)) + y
    v = v.to(bank.dtype)
    return replace(bank, handles=bank.handles + (v,), rstds=bank.rstds + (source_rstd(v, bank.eps),))


def _check_hidden_size(queries: torch.Tensor, d: int, name: str) -> None:
    if queries.shape[-1] != d:
        raise ValueError(f"{name} has size {queries.shape[-1]} in its last dimension, expected hidden size {d}")


def _fuses_prenorm(norm_weight: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether a kernel can fuse the PreNorm: its output is in the sources' dtype, which the PreNorm keeps only
    for a weight of that dtype (another promotes it, as :func:`prenorm` does; that case runs the two apart)."""
    return norm_weight is None or norm_weight.dtype == dtype


def _check_vectors(d: int, **vectors: torch.Tensor | None) -> None:
    """Per-channel parameters (one pseudo-query, gains, PreNorm weights) must be exactly [D]: a batched one would
    broadcast on the torch path and be read as its first row by the kernels."""
    for name, vector in vectors.items():
        if vector is not None and tuple(vector.shape) != (d,):
            raise ValueError(f"{name} must be [D] = [{d}] (the hidden size), got shape {tuple(vector.shape)}")


def depth_attention(
    bank: SourceBank,
    query: torch.Tensor,
    gain: torch.Tensor,
    partial: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """softmax_i(w . RMSNorm_g(v_i)) weighted sum over the bank's sources (+ ``partial``), differentiable.

    Args:
        bank: completed sources, each [..., D].
        query: pseudo-query w [D]; gain: key RMSNorm gain g [D].
        partial: optional extra source [..., D] (the partial sum of the running block).
        norm_weight: optional [D]: return the sublayer's PreNorm of h instead of h,
            ``norm_weight * (h * rsqrt(mean(h^2) + norm_eps)).to(h.dtype)`` (fused on the Triton backend,
            where h is recomputed in backward rather than stored).
    Returns:
        h [..., D] (or its PreNorm).
    """
    if bank.num_sources == 0 and partial is None:
        raise ValueError("depth_attention needs at least one source")
    if partial is not None:
        _check_shape(bank, partial, "partial")
    _check_vectors(bank.shape[-1], query=query, gain=gain, norm_weight=norm_weight)
    if bank.backend == "triton":
        if not _fuses_prenorm(norm_weight, bank.dtype):
            return prenorm(depth_attention(bank, query, gain, partial), norm_weight, norm_eps, backend="triton")
        from .fused import DepthAttentionFunction

        return DepthAttentionFunction.apply(
            bank.storage, bank.num_sources, query, gain, partial, norm_weight, norm_eps, *bank.handles
        )
    sources, rstds = list(bank.handles), list(bank.rstds)
    if partial is not None:
        sources.append(partial)
        rstds.append(source_rstd(partial, bank.eps))
    h = torch_depth_attention(sources, rstds, query, gain)
    return rms_norm(h, norm_weight, norm_eps) if norm_weight is not None else h


def prenorm(h: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """A sublayer's PreNorm, RMSNorm as transformers writes it: ``weight * (h * rsqrt(mean(h^2) + eps)).to(h.dtype)``.

    Args:
        h: [..., D]; weight: [D]; eps: added to the mean square.
        backend: "triton" (one kernel forward, one backward; keeps h and a float32 rstd per row),
            "torch" (:func:`rms_norm`) or None (:func:`kimi_hf.kernels.resolve_backend`).
    Returns:
        [..., D] in the promotion of h's and weight's dtypes, differentiable w.r.t. h and weight.
    """
    if h.dim() < 1 or tuple(weight.shape) != (h.shape[-1],):
        raise ValueError(f"prenorm needs h [..., D] and weight [D], got {tuple(h.shape)} / {tuple(weight.shape)}")
    if resolve_backend(backend, h) == "torch":
        return rms_norm(h, weight, eps)
    from .norm import RMSNormFunction

    return RMSNormFunction.apply(h, weight, eps)


def _inference_only(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError("the two-phase depth attention is inference-only: call it under torch.no_grad()")


def depth_attention_phase1(
    bank: SourceBank, queries: torch.Tensor, gains: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: Q pseudo-queries [Q, D] (gains [Q, D]) against all completed sources in one pass.

    Returns out [Q, ..., D] (normalised over the sources) and lse [Q, ...] float32 (log-sum-exp of the scores).
    Over one source on the Triton backend, out is that source itself for every query, as a read-only view of the
    bank's storage (no copies are written): do not write into it.
    """
    _inference_only(queries, gains)
    if bank.num_sources == 0:
        raise ValueError("depth_attention_phase1 needs at least one completed source")
    if queries.dim() != 2 or queries.shape != gains.shape:
        raise ValueError(f"queries/gains must both be [Q, D], got {tuple(queries.shape)} / {tuple(gains.shape)}")
    d = bank.handles[0].shape[-1]
    _check_hidden_size(queries, d, "queries")
    if bank.backend == "triton":
        from .two_phase import phase1

        out, lse = phase1(bank.storage, bank.num_sources, queries, gains)
        lead = tuple(bank.storage.shape[:-1])
        return out.view(len(queries), *lead, d), lse.view(len(queries), *lead)
    return torch_phase1(bank.handles, bank.rstds, queries, gains)


def _check_phase2(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    norm_weight: torch.Tensor | None,
) -> None:
    if (lse is not None and lse.shape != out.shape[:-1]) or (partial is not None and partial.shape != out.shape):
        shape = tuple(partial.shape) if partial is not None else None
        lse_text = tuple(lse.shape) if lse is not None else None
        raise ValueError(f"phase-2 shapes disagree: out {tuple(out.shape)}, lse {lse_text}, partial {shape}")
    _check_vectors(out.shape[-1], query=query, gain=gain, norm_weight=norm_weight)


def _phase2(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor | None,
    addend: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float,
    backend: str | None,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
    keep_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both phase-2 ops, checked: (h or its PreNorm, the partial sum merged: ``partial + addend`` with ``addend``,
    None for an addend without ``keep_sum``)."""
    if resolve_backend(backend, out) == "triton":
        if not _fuses_prenorm(norm_weight, out.dtype):
            h, merged = _phase2(out, lse, partial, addend, query, gain, eps, backend, None, norm_eps, keep_sum)
            return prenorm(h, norm_weight, norm_eps, backend), merged
        from .two_phase import phase2

        d = out.shape[-1]
        out2, part2, add2 = (t.reshape(-1, d).contiguous() if t is not None else None for t in (out, partial, addend))
        lse2 = lse.reshape(-1).contiguous() if lse is not None else None
        h, merged = phase2(out2, lse2, part2, query, gain, eps, norm_weight, norm_eps, add2, keep_sum)
        return h.view(out.shape), merged.view(out.shape) if merged is not None else None
    merged = partial + addend if addend is not None else partial
    h = torch_phase2(out, lse, merged, query, gain, eps) if merged is not None else out
    h = rms_norm(h, norm_weight, norm_eps) if norm_weight is not None else h
    return h, merged if addend is None or keep_sum else None


def depth_attention_phase2(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor | None,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float = 1e-6,
    backend: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Phase 2: merge one query's phase-1 ``out`` [..., D] / ``lse`` [...] with ``partial`` [..., D] (exact).

    ``partial=None`` (first sublayer of a block) returns ``out``; ``norm_weight`` applies the sublayer's PreNorm
    as in :func:`depth_attention` (fused into the same kernel on the Triton backend). ``lse=None``: ``out`` is a
    lone source (phase 1 over one source: :func:`append_source_phase1` with ``scores=False``), whose lse is its own
    score, computed here with the key-norm epsilon ``eps``.
    """
    _inference_only(query, gain, *([partial] if partial is not None else []))
    _check_phase2(out, lse, partial, query, gain, norm_weight)
    if partial is None and norm_weight is None:
        return out
    return _phase2(out, lse, partial, None, query, gain, eps, backend, norm_weight, norm_eps)[0]


def depth_attention_phase2_add(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial: torch.Tensor,
    addend: torch.Tensor,
    query: torch.Tensor,
    gain: torch.Tensor,
    eps: float = 1e-6,
    backend: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    keep_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Phase 2 with the partial sum first brought up to date: ``partial + addend`` (the last sublayer's output).

    Returns (h [..., D], or its PreNorm with ``norm_weight``; the new partial sum ``partial + addend``); on the
    Triton backend both come from one kernel, with the sum rounded as the eager addition rounds it.
    ``keep_sum=False`` (a read that no later one needs: the final aggregation) returns None for the sum, which the
    kernel then does not write. ``lse`` as in :func:`depth_attention_phase2`.
    """
    _inference_only(query, gain, partial, addend)
    _check_phase2(out, lse, partial, query, gain, norm_weight)
    if addend.shape != partial.shape:
        raise ValueError(f"addend has shape {tuple(addend.shape)}, the partial sum {tuple(partial.shape)}")
    return _phase2(out, lse, partial, addend, query, gain, eps, backend, norm_weight, norm_eps, keep_sum)


def append_source_phase1(
    bank: SourceBank,
    x: torch.Tensor,
    y: torch.Tensor | None,
    queries: torch.Tensor,
    gains: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    first_out: bool = True,
    scores: bool = True,
) -> tuple[SourceBank, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A block boundary at inference: append ``x (+ y)`` [..., D] as the bank's next source, then phase 1 of
    ``queries``/``gains`` [Q, D] against all sources, the new one included.

    Returns (the new bank, out [Q, ..., D], lse [Q, ...] float32, query 0's sublayer input or None): with
    ``norm_weight`` [D] the last is the PreNorm of out[0], the input of the block's first sublayer (it has no
    partial sum to merge). Into an empty bank (x is the only source) out is read-only, as in
    :func:`depth_attention_phase1`. Triton: one kernel while the sources fit phase 1's register tile
    (``two_phase.fits_one_tile``), otherwise the store, phase 1 and phase 2 kernels in turn.

    ``first_out=False`` (with ``norm_weight``, for a caller that reads query 0 only through its PreNorm): out is
    [Q - 1, ..., D], queries 1 .. Q - 1, and the one-kernel path does not write query 0's output (one pass over
    [..., D] less); lse keeps all Q rows.

    ``scores=False`` (into an empty bank only): lse is None. Over the lone source, each query's lse is that source's
    score, which phase 2 computes from ``out`` itself (:func:`depth_attention_phase2` with ``lse=None``) in the
    round of reductions it makes anyway; the boundary is then a PreNorm (a launch scoring Q queries is a chain of Q
    reductions per row: the dense ~1B model's first boundary took twice its bytes' time).
    """
    _inference_only(queries, gains, x, *([y] if y is not None else []))
    if queries.dim() != 2 or queries.shape != gains.shape:
        raise ValueError(f"queries/gains must both be [Q, D], got {tuple(queries.shape)} / {tuple(gains.shape)}")
    if not first_out and norm_weight is None:
        raise ValueError("first_out=False needs norm_weight: query 0's output would be returned in no form")
    _check_hidden_size(queries, bank.shape[-1], "queries")
    _check_vectors(bank.shape[-1], norm_weight=norm_weight)
    _check_shape(bank, x, "source")
    if y is not None:
        _check_shape(bank, y, "second summand")
    n = bank.num_sources
    if not (scores or n == 0):
        raise ValueError(f"scores=False needs an empty bank (a lone source), this one holds {n} sources")
    if bank.backend == "triton" and n < bank.capacity:
        from .two_phase import fits_one_tile, store_phase1

        d = bank.shape[-1]
        if fits_one_tile(n + 1, d) and _fuses_prenorm(norm_weight, bank.dtype):
            storage = bank.storage
            out, lse, first = store_phase1(
                storage, n, x.reshape(-1, d).contiguous(), y.reshape(-1, d).contiguous() if y is not None else None,
                queries, gains, norm_weight, norm_eps, first_out, scores,
            )  # fmt: skip
            bank = replace(bank, handles=bank.handles + (storage.store[n],))
            lead = tuple(bank.shape[:-1])
            first = first.view(bank.shape) if first is not None else None
            lse = lse.view(len(queries), *lead) if lse is not None else None
            return bank, out.view(len(out), *lead, d), lse, first
    grown = append_source(bank, x, y)
    if scores:
        out, lse = depth_attention_phase1(grown, queries, gains)
    else:  # over the lone source, every query's output is that source (a read-only view, as the kernels give)
        out, lse = grown.handles[0].expand(len(queries), *grown.shape), None
    first = None
    if norm_weight is not None:  # (query 0's first sublayer has no partial sum: its lse is not read)
        first = depth_attention_phase2(
            out[0], lse[0] if scores else None, None, queries[0], gains[0], bank.eps, bank.backend, norm_weight,
            norm_eps,
        )
    return grown, out if first_out else out[1:], lse, first


def add_prenorm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: the standard residual's addition fused into the next PreNorm.

    Args:
        x, y: [..., D] (the residual stream and the last sublayer's output); weight: [D].
    Returns:
        (x + y, :func:`prenorm` of it); one kernel on the Triton backend.
    """
    _inference_only(x, y, weight)
    if x.shape != y.shape or x.dim() < 1 or tuple(weight.shape) != (x.shape[-1],):
        shapes = f"{tuple(x.shape)} / {tuple(y.shape)} / {tuple(weight.shape)}"
        raise ValueError(f"add_prenorm needs x, y [..., D] and weight [D], got {shapes}")
    if resolve_backend(backend, x) == "torch":
        total = x + y
        return total, rms_norm(total, weight, eps)
    from .norm import rms_norm_fwd

    d = x.shape[-1]
    x2, y2 = x.reshape(-1, d).contiguous(), y.reshape(-1, d).contiguous()
    normed, _, total = rms_norm_fwd(x2, weight.contiguous(), eps, y2)
    return total.view(x.shape), normed.view(x.shape)


__all__ = [
    "SourceBank",
    "add_prenorm",
    "append_source",
    "append_source_phase1",
    "depth_attention",
    "depth_attention_phase1",
    "depth_attention_phase2",
    "depth_attention_phase2_add",
    "naive_depth_attention",
    "new_source_bank",
    "prenorm",
    "rms_norm",
]
