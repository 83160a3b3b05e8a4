"""Plain-torch reference for CE-LoRA's approximate input gradient through a frozen weight.

Notation (one ``nn.Linear``, ``y = x W^T``): ``W`` is ``[O, I]`` (out x in), ``dY`` is ``[T, O]``.
The exact input gradient is ``dX = dY W``. CE-LoRA splits ``W = B0 A0 + R`` with a rank-``r``
factorisation ``B0 [O, r]``, ``A0 [r, I]`` and keeps only a set ``S`` of output channels of the residual:

    dX ~= (dY B0) A0 + dY[:, S] R[S, :]  =  [dY B0 | dY[:, S]] @ [A0 ; R[S, :]]

The right-hand form is one GEMM of inner size ``r + |S|``: the "packed" left operand ``G`` is built from
``dY`` in one pass (:func:`naive_pack_grad_output`) and the "stacked" right operand ``M`` is rebuilt only
when ``S`` changes (:func:`build_stack`). ``A0``/``B0`` are zero-padded to ``r_pad`` columns/rows so that
the Triton kernel can use a tensor-core dot of width >= 16; the zero padding does not change the result.
"""

from __future__ import annotations

import torch

SCORES = ("activation_aware", "weight_norm")


def low_rank_factors(
    weight: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``B0 [O, rank]``, ``A0 [rank, I]`` (fp32) with ``B0 A0 ~= W``.

    A randomized range finder (Halko et al.) with a private, seeded generator: deterministic (the
    factors are recomputed identically after loading, never saved) and it leaves the global RNG
    untouched. Any factorisation is valid for CE-LoRA (the residual absorbs what it misses); a better
    one only makes dropping residual channels cheaper. Singular values are split evenly:
    ``B0 = U sqrt(S)``, ``A0 = sqrt(S) V^T`` as in the paper.
    """
    if rank <= 0:
        raise ValueError(f"SVD rank must be positive, got {rank}")
    w = weight.detach().float()
    out_features, in_features = w.shape
    rank = min(rank, out_features, in_features)
    width = rank + oversample
    if width >= min(out_features, in_features):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        gen = torch.Generator(device=w.device).manual_seed(seed)
        omega = torch.randn(in_features, width, generator=gen, device=w.device, dtype=w.dtype)
        basis = torch.linalg.qr(w @ omega).Q
        for _ in range(power_iters):  # subspace iteration sharpens the spectrum's decay
            basis = torch.linalg.qr(w @ (w.T @ basis)).Q
        ub, s, vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
        u = basis @ ub
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def residual_row_norms(weight: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``||R[i, :]||`` for ``R = W - B0 A0`` (fp32 ``[O]``), built ``block`` rows at a time to bound memory."""
    norms = []
    for start in range(0, weight.shape[0], block):
        rows = weight[start : start + block].float() - b0[start : start + block] @ a0
        norms.append(torch.linalg.vector_norm(rows, dim=1))
    return torch.cat(norms)


def channel_scores(grad_output: torch.Tensor, row_norms: torch.Tensor, score: str) -> torch.Tensor:
    """Per-output-channel importance ``[O]`` (fp32).

    ``"activation_aware"``: ``||dY[:, i]|| * ||R[i, :]||``, an upper bound on channel i's contribution
    ``||dY[:, i] R[i, :]||`` to ``dY R`` (the paper's intended score). ``"weight_norm"``: ``||R[i, :]||``
    alone, what the public code effectively computes.
    """
    if score == "weight_norm":
        return row_norms
    if score == "activation_aware":
        dtype = torch.promote_types(grad_output.dtype, torch.float32)
        return (torch.linalg.vector_norm(grad_output, dim=0, dtype=dtype) * row_norms).float()
    raise ValueError(f"unknown CE-LoRA channel score {score!r}: expected one of {SCORES}")


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring channels as sorted int64 indices (sorted: ``dY`` is read in order)."""
    return torch.topk(scores, keep, sorted=False).indices.sort().values


def pad_b0(b0: torch.Tensor, r_pad: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """Zero-pad ``B0 [O, r] -> [O, r_pad]`` (contiguous) in ``dtype``, ``B0`` in columns ``[offset, offset + r)``."""
    b0_pad = torch.zeros(b0.shape[0], r_pad, device=b0.device, dtype=dtype)
    b0_pad[:, offset : offset + b0.shape[1]] = b0
    return b0_pad


def build_stack(
    weight: torch.Tensor,
    b0: torch.Tensor,
    a0: torch.Tensor,
    index: torch.Tensor,
    r_pad: int,
    dtype: torch.dtype,
    offset: int = 0,
) -> torch.Tensor:
    """The stacked right operand ``M = [A0 (zero-padded to r_pad rows) ; R[index, :]]``, ``[r_pad + k, I]``, with
    ``A0`` in rows ``[offset, offset + r)`` (matching :func:`pad_b0`).

    Residual rows are formed in (at least) fp32 and cast once to ``dtype``.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    rows = weight.index_select(0, index).to(acc) - b0.index_select(0, index).to(acc) @ a0.to(acc)
    stack = torch.zeros(r_pad + index.numel(), weight.shape[1], device=weight.device, dtype=dtype)
    stack[offset : offset + a0.shape[0]] = a0
    stack[r_pad:] = rows
    return stack


def naive_pack_grad_output(grad_output: torch.Tensor, b0_pad: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``G = [dY B0 | dY[:, index]]``: ``[T, r_pad + k]`` from ``dY [T, O]``, ``B0 [O, r_pad]``, ``index [k]``."""
    acc = torch.promote_types(grad_output.dtype, torch.float32)
    low = (grad_output.to(acc) @ b0_pad.to(acc)).to(grad_output.dtype)
    return torch.cat([low, grad_output.index_select(1, index)], dim=1)


def naive_ce_grad_input(
    grad_output: torch.Tensor, weight: torch.Tensor, b0: torch.Tensor, a0: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Unfused reference ``dX = (dY B0) A0 + dY[:, S] (W - B0 A0)[S, :]`` in the inputs' common float dtype."""
    residual = weight - b0 @ a0
    return (grad_output @ b0) @ a0 + grad_output[:, index] @ residual[index]
