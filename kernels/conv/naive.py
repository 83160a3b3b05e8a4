"""Plain-torch reference for the short causal depthwise convolution used by KDA layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(z) if activation == "silu" else z


def _conv_one(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    history: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolve one sequence.

    x ``[L, D]``, weight ``[D, W]``, history ``[D, W]`` (the W inputs before t=0, oldest first).
    Returns y ``[L, D]`` and the new state ``[D, W]`` (the last W inputs, history included).
    """
    width = weight.shape[1]
    padded = torch.cat([history.t(), x], dim=0)  # [W + L, D]
    length = x.shape[0]
    # y[t] = sum_j weight[:, j] * x[t - W + 1 + j]; padded[i] holds x[i - W].
    z = sum(weight[:, j] * padded[j + 1 : j + 1 + length] for j in range(width))
    if bias is not None:
        z = z + bias
    return _activate(z, activation), padded[padded.shape[0] - width :].t()


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv1d (+ optional SiLU), computed in float32 (float64 stays float64).

    x ``[B, T, D]``; weight ``[D, W]``; bias ``[D]``; initial_state ``[N, D, W]`` (the W inputs
    before t=0 of each sequence, oldest first). With ``cu_seqlens`` (``[N + 1]``, B must be 1) the
    sequences are packed along T and never see each other's inputs.
    Returns y ``[B, T, D]`` in x's dtype and, if asked, the final state ``[N, D, W]`` in x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, wc = x.to(compute), weight.to(compute)
    bc = bias.to(compute) if bias is not None else None
    width = weight.shape[1]
    if cu_seqlens is None:
        pieces = list(xc.unbind(0))
    else:
        bounds = cu_seqlens.tolist()
        pieces = [xc[0, bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    ys, states = [], []
    for n, piece in enumerate(pieces):
        if initial_state is None:
            history = xc.new_zeros(x.shape[-1], width)
        else:
            history = initial_state[n].to(compute)
        y, state = _conv_one(piece, wc, bc, activation, history)
        ys.append(y)
        states.append(state)
    if not pieces:  # an empty batch (B = 0) or no sequences
        y, final_state = xc.new_empty(x.shape), x.new_empty(0, x.shape[-1], width) if output_final_state else None
        return y.to(x.dtype), final_state
    y = torch.stack(ys, 0) if cu_seqlens is None else torch.cat(ys, 0).unsqueeze(0)
    final_state = torch.stack(states, 0).to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final_state


def naive_causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decode step: x ``[N, D]``, conv_state ``[N, D, W]`` updated in place (shift left, append x).

    Returns y ``[N, D]`` in x's dtype.
    """
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = (conv_state.to(compute) * weight.to(compute)).sum(-1)
    if bias is not None:
        z = z + bias.to(compute)
    return _activate(z, activation).to(x.dtype)
