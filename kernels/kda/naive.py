"""Plain-torch references for Kimi Delta Attention (KDA); also the CPU training path of the model.

Per head, with ``S`` a ``[K, V]`` state, for every token t::

    S <- exp(g_t)[:, None] * S                      # per-channel decay
    S <- S + beta_t * k_t (v_t - S^T k_t)^T         # delta-rule update
    o_t = S^T (q_t * scale)

Both functions compute in fp32 (fp64 when the inputs are fp64), return ``o`` in q's dtype and the
final state in fp32 (fp64), and are differentiable by autograd.
"""

from __future__ import annotations

from typing import Callable

import torch

from .utils import check_kda_inputs

_Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _recurrent_core(q, k, v, g, beta, scale: float, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token loop for one batch of equal-length sequences.

    q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]`` (compute dtype), S ``[B, H, K, V]``.
    Returns o ``[B, T, H, V]`` and the final state.
    """
    outs = []
    for t in range(q.shape[1]):
        S = S * g[:, t, :, :, None].exp()
        residual = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t] * beta[:, t, :, None], residual)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, S


def _intra_chunk_scores(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M_ab[i, j] = sum_d a_id b_jd exp(G_id - G_jd)`` for (a, b) = (q, k) with j <= i and (k, k) with j < i.

    q, k, G: ``[..., C, K]`` with C a multiple of ``sub``. Blocks of ``sub`` rows I use the decay at
    their first row r as a pivot: for j < r <= i, ``exp(G_i - G_j) = exp(G_i - G_r) * exp(G_r - G_j)``,
    both factors <= 1 for a decaying G, which turns off-diagonal blocks into matmuls. Diagonal blocks
    take the exact ``[sub, sub, K]`` differences, shared by both products.
    Returns ``(A_qk, A_kk)``, each ``[..., C, C]``, zero above (A_kk: on and above) the diagonal.
    """
    *lead, C, K = q.shape
    nb = C // sub
    q, k, G = (x.reshape(*lead, nb, sub, K) for x in (q, k, G))
    neg_inf = G.new_tensor(float("-inf"))
    # Diagonal blocks: exact differences; the masked ones (j past i) are positive and could overflow,
    # so they are replaced before exp instead of being multiplied by 0 after it.
    on_or_below = torch.ones(sub, sub, dtype=torch.bool, device=G.device).tril()
    diff = G[..., :, None, :] - G[..., None, :, :]  # [..., nb, sub(i), sub(j), K]
    k_decayed = k[..., None, :, :] * torch.where(on_or_below[:, :, None], diff, neg_inf).exp()
    diag_qk = (q[..., :, None, :] * k_decayed).sum(-1)  # [..., nb, sub, sub]
    diag_kk = (k[..., :, None, :] * k_decayed).sum(-1).tril(-1)
    # Off-diagonal blocks J < I, pivoted at the first row of block I.
    pivot = G[..., :1, :]  # [..., nb(I), 1, K]
    to_row = (G - pivot).exp()
    earlier = torch.ones(nb, nb, dtype=torch.bool, device=G.device).tril(-1)  # [I, J]
    to_pivot = pivot[..., :, None, :, :] - G[..., None, :, :, :]  # [..., nb(I), nb(J), sub(j), K]
    k_piv = k[..., None, :, :, :] * torch.where(earlier[:, :, None, None], to_pivot, neg_inf).exp()
    eye = torch.eye(nb, dtype=G.dtype, device=G.device)
    out = []
    for a, diag in ((q, diag_qk), (k, diag_kk)):
        off = torch.einsum("...Iid,...IJjd->...IiJj", a * to_row, k_piv)
        out.append((off + torch.einsum("...Iij,IJ->...IiJj", diag, eye)).reshape(*lead, C, C))
    return out[0], out[1]


def _chunk_core(
    q, k, v, g, beta, scale: float, S: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (WY) form for one batch of equal-length sequences; same layout as :func:`_recurrent_core`.

    Within a chunk with cumulative log-decay G (G_i includes g_i):
      A[i, j] = beta_i * sum_d k_id k_jd exp(G_id - G_jd) for j < i;  T = (I + A)^-1 Diag(beta)
      W = T (exp(G) * K), U = T V;  V' = U - W S
      O = scale * ((Q * exp(G)) S + tril(sum_d q_id k_jd exp(G_id - G_jd)) V')
      S <- exp(G_last) * S + (K * exp(G_last - G))^T V'
    Decays only enter as differences G_i - G_j with i >= j (<= 0), so nothing overflows.
    The intra-chunk part is batched over all chunks; only the state recurrence loops.
    """
    B, T, H, K = q.shape
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    # Zero padding is inert: k = 0 adds nothing to the state and g = 0 decays nothing.
    q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))
    # [B, H, NT, C, D]: heads and chunks become batch dims of the matmuls below.
    q, k, v, g = (x.transpose(1, 2).reshape(B, H, NT, C, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.transpose(1, 2).reshape(B, H, NT, C, 1)
    G = g.cumsum(3)
    sub = 16 if C % 16 == 0 else C
    A_qk, A_kk = _intra_chunk_scores(q * scale, k, G, sub)
    A_kk = A_kk * beta
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    # T = (I + A_kk)^-1 Diag(beta): one unit lower-triangular solve for W and U together.
    rhs = torch.cat([k * G.exp(), v], dim=-1) * beta
    WU = torch.linalg.solve_triangular(eye + A_kk, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :K], WU[..., K:]
    q_decayed = q * scale * G.exp()
    G_last = G[..., -1:, :]  # [B, H, NT, 1, K]
    k_to_end = k * (G_last - G).exp()
    outs = []
    for n in range(NT):
        v_new = U[:, :, n] - W[:, :, n] @ S
        outs.append(q_decayed[:, :, n] @ S + A_qk[:, :, n] @ v_new)
        S = S * G_last[:, :, n].transpose(-1, -2).exp() + k_to_end[:, :, n].transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, C, v.shape[-1])
    o = o.reshape(B, H, NT * C, v.shape[-1])[:, :, :T]
    return o.transpose(1, 2), S


def _run(
    core: _Core,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    **core_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cast, pick the initial states and run ``core`` on the whole batch or on each packed sequence."""
    N = check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, False, None, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, out_dtype = _compute_dtype(q), q.dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if initial_state is None:
        S0 = q.new_zeros(N, H, K, V)
    else:
        S0 = initial_state.to(dtype)
    if cu_seqlens is None:
        o, S = core(q, k, v, g, beta, scale, S0, **core_kwargs)
    else:
        offsets = cu_seqlens.tolist()
        pieces, states = [], []
        for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            sl = slice(bos, eos)
            o_n, S_n = core(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale, S0[n : n + 1], **core_kwargs)
            pieces.append(o_n)
            states.append(S_n)
        o, S = torch.cat(pieces, dim=1), torch.cat(states, dim=0)
    return o.to(out_dtype), (S if output_final_state else None)


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA token by token (the definition). Slow for long T; used for decode and as the ground truth.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` log-decay; beta: ``[B, T, H]``.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``; N = B, or ``len(cu_seqlens) - 1`` with packed sequences.
        output_final_state: also return the final ``[N, H, K, V]`` state.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (B must be 1).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final state or None)``.
    """
    return _run(_recurrent_core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def naive_chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA in chunkwise (WY) form: same arguments and results as :func:`naive_recurrent_kda`.

    fla's ``naive_chunk_kda`` order (``chunk_size`` after ``output_final_state``; a positional chunk size was taken
    as ``cu_seqlens``), with ``cu_seqlens`` keyword-only.

    The intra-chunk part is batched over batch, heads and chunks (T is zero-padded to a multiple of
    ``chunk_size``); only the state recurrence loops over chunks. Memory: about
    ``B * H * T * 16 * K`` exact in-block decay factors, plus pivoted ones of the same order.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _run(
        _chunk_core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size=chunk_size
    )
