"""Short causal depthwise convolution (+ SiLU) of KDA layers: prefill/training and one-token decode.

``causal_conv1d`` runs a whole (optionally packed, variable-length) batch and can return the conv
state for decoding; ``causal_conv1d_update`` consumes one token per sequence and updates that state
in place. Both dispatch to the Triton kernels or to the plain-torch reference (``naive.py``), and take fla 0.6.0's
arguments in fla's positional order with fla's defaults (``activation=None``; ``"swish"`` is ``"silu"``), so that a
call written for ``fla.modules.causal_conv1d`` means the same here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import resolve_backend
from .autograd import CausalConv1dFunction
from .naive import naive_causal_conv1d, naive_causal_conv1d_update
from .triton_kernels import causal_conv1d_update_fwd, causal_conv1d_update_group_fwd

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_conv1d_update_group",
    "naive_causal_conv1d",
    "naive_causal_conv1d_update",
]

_ACTIVATIONS = ("silu", "swish", None)


def _check_params(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, dim: int, activation: str | None
) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """Validate x's dtype and return weight as ``[D, W]`` (the checkpoint's ``[D, 1, W]`` is accepted) and bias,
    both contiguous (the Triton kernels index them as such), and the activation (``"swish"`` read as ``"silu"``)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a tensor, got {_described(weight)}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a tensor or None, got {_described(bias)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be [D, W] or [D, 1, W] with D={dim}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must be [D] with D={dim}, got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    bias = None if bias is None else bias.contiguous()
    return weight.contiguous(), bias, "silu" if activation == "swish" else activation


def _described(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def _add_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """fla's ``residual``: added to the activated output."""
    if residual is None:
        return y
    if not isinstance(residual, torch.Tensor) or residual.shape != y.shape:
        raise ValueError(
            f"residual must be a tensor of the output's shape {tuple(y.shape)}, got {_described(residual)}"
        )
    return y + residual


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t] = act(sum_{j<W} weight[:, j] * x[t - W + 1 + j] + bias) + residual[t], per channel, causal.

    fla 0.6.0's ``causal_conv1d`` arguments, order and defaults (its further options, e.g. ``cu_seqlens_cpu``, are
    not taken).

    Args:
        x: ``[B, T, D]`` (B must be 1 when ``cu_seqlens`` is given).
        weight: ``[D, W]`` or ``[D, 1, W]`` (required).
        bias: ``[D]`` or None.
        residual: ``[B, T, D]`` added to the output, or None.
        initial_state: ``[N, D, W]``, the last W inputs before t=0 of each sequence (oldest first),
            or None for zero history. N = B, or ``len(cu_seqlens) - 1``.
        output_final_state: also return the state ``[N, D, W]`` after the last token (x's dtype).
        activation: ``"silu"`` (or ``"swish"``, the same) or None (fla's default).
        backend: ``"triton"``, ``"torch"`` or None (see :func:`kimi_hf.kernels.resolve_backend`).
        cu_seqlens: ``[N + 1]`` integer offsets of packed sequences along T (rising from 0 to T; checked on the
            torch path, not on the Triton path, where it would need a host sync), or None.

    Returns:
        ``(y [B, T, D] in x's dtype, final_state or None)``. Differentiable w.r.t. x, weight, bias, residual and
        initial_state.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, T, D] tensor, got {_described(x)}")
    batch, seq_len, dim = x.shape
    weight, bias, activation = _check_params(x, weight, bias, dim, activation)
    if cu_seqlens is not None:
        # int32/int64 only (as chunk_kda and fla): the Triton path numbers the rows in cu_seqlens' dtype, which
        # wrapped past 32767 tokens in int16 and silently mixed sequences
        if not isinstance(cu_seqlens, torch.Tensor):
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got {_described(cu_seqlens)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")  # fmt: skip
        if batch != 1:
            raise ValueError(f"packed input (cu_seqlens) needs B == 1, got B={batch}")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        want = (num_seqs, dim, weight.shape[1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [N, D, W] = {want}, got {_described(initial_state)}")
        # The Triton kernels would read a state on another device through a bad pointer
        if not initial_state.is_floating_point() or initial_state.device != x.device:
            raise ValueError(f"initial_state must be a floating-point tensor on x's device {x.device}, got "
                             f"{initial_state.dtype} on {initial_state.device}")  # fmt: skip
    if resolve_backend(backend, x) == "torch":
        if cu_seqlens is not None and (
            int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len or bool((cu_seqlens.diff() < 0).any())
        ):
            raise ValueError(f"cu_seqlens must rise from 0 to T={seq_len}, got {cu_seqlens.tolist()}")
        y, final_state = naive_causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    else:
        if cu_seqlens is not None:  # the kernels read the offsets at unit stride
            cu_seqlens = cu_seqlens.contiguous()
        y, final_state = CausalConv1dFunction.apply(
            x, weight, bias, initial_state, activation == "silu", output_final_state, cu_seqlens
        )
    return _add_residual(y, residual), final_state


def _update_args(
    x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, activation: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str | None, torch.Size]:
    """Validate one decode update's arguments: returns x as ``[N, D]``, weight ``[D, W]``, bias, the activation
    (``"swish"`` read as ``"silu"``) and x's shape as given (``[N, D]``, ``[N, 1, D]`` or ``[1, N, D]``, as fla
    takes them), which the output gets back."""
    if not isinstance(x, torch.Tensor) or not isinstance(cache, torch.Tensor):
        raise ValueError(f"x and cache must be tensors, got {_described(x)} and {_described(cache)}")
    shape = x.shape
    if x.dim() == 3:
        if 1 not in shape[:2]:
            raise ValueError(f"x must be [N, D], [N, 1, D] or [1, N, D] (one token each), got shape {tuple(shape)}")
        x = x.squeeze(1) if shape[1] == 1 else x.squeeze(0)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], [N, 1, D] or [1, N, D], got shape {tuple(shape)}")
    num_seqs, dim = x.shape
    weight, bias, activation = _check_params(x, weight, bias, dim, activation)
    if tuple(cache.shape) != (num_seqs, dim, weight.shape[1]):
        raise ValueError(
            f"cache (the conv state) must be [N, D, W] = {(num_seqs, dim, weight.shape[1])}, got {tuple(cache.shape)}"
        )
    # x is written into the cache: an integer cache truncated it silently; the kernels cannot reach another device
    if not cache.is_floating_point() or cache.device != x.device:
        raise ValueError(f"cache must be a floating-point tensor on x's device {x.device}, got {cache.dtype} on "
                         f"{cache.device}")  # fmt: skip
    return x if x.stride(-1) == 1 else x.contiguous(), weight, bias, activation, shape


def causal_conv1d_update(
    x: torch.Tensor,
    cache: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token per sequence with the short conv; the conv state ``cache`` is updated in place.

    fla 0.6.0's ``causal_conv1d_update`` arguments, order, defaults and results, plus ``backend``.

    Args:
        x: ``[N, D]``, ``[N, 1, D]`` or ``[1, N, D]``: one token of each of N sequences.
        cache: the conv state ``[N, D, W]`` (the last W inputs, oldest first); shifted left and x appended.
        residual: added to the output (x's shape), or None.
        weight: ``[D, W]`` or ``[D, 1, W]`` (required); bias ``[D]`` or None.
        activation: ``"silu"`` (or ``"swish"``) or None (fla's default).
        backend: ``"triton"``, ``"torch"`` or None.

    Returns:
        ``(y, cache)``, as fla returns them: y with x's shape and dtype, act(sum(cache * weight, -1) + bias) after
        the update, plus the residual; and ``cache`` itself, updated.
    """
    x, weight, bias, activation, shape = _update_args(x, cache, weight, bias, activation)
    if resolve_backend(backend, x) == "torch":
        y = naive_causal_conv1d_update(x, cache, weight, bias, activation)
    else:
        y = causal_conv1d_update_fwd(x, cache, weight, bias, activation == "silu")
    return _add_residual(y.reshape(shape), residual), cache


def causal_conv1d_update_group(
    xs: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Several independent :func:`causal_conv1d_update` calls, up to three per launch on the Triton path (KDA's q, k
    and v convs at a decode step: a step is bound by its launches and their host time).

    Args:
        xs, caches, weights: one entry per convolution, each as in :func:`causal_conv1d_update`.
        biases: one ``[D]`` or None per convolution, or None for none.
        activation: ``"silu"`` (or ``"swish"``) or None, for all.
        backend: ``"triton"``, ``"torch"`` or None.

    Returns:
        one y per convolution (its x's shape and dtype). Convolutions of different shapes, dtypes or strides are
        launched one by one.
    """
    biases = [None] * len(xs) if biases is None else list(biases)
    if not len(xs) == len(caches) == len(weights) == len(biases):
        raise ValueError(f"xs, caches, weights and biases must have one entry per convolution, got {len(xs)}, "
                         f"{len(caches)}, {len(weights)} and {len(biases)}")  # fmt: skip
    args = [_update_args(*one, activation) for one in zip(xs, caches, weights, biases)]
    if not args:
        return []
    backend = resolve_backend(backend, args[0][0])
    x0, weight0, bias0, activation, _ = args[0]
    together = backend == "triton" and all(
        x.shape == x0.shape and x.dtype == x0.dtype and x.stride() == x0.stride() and w.shape == weight0.shape
        and (b is None) == (bias0 is None) and c.dtype == caches[0].dtype and c.stride() == caches[0].stride()
        for (x, w, b, _, _), c in zip(args, caches)
    )  # fmt: skip
    if together:
        ys = []
        for start in range(0, len(args), 3):
            group = args[start : start + 3]
            ys += causal_conv1d_update_group_fwd([a[0] for a in group], caches[start : start + 3],
                                                 [a[1] for a in group], [a[2] for a in group], activation == "silu")
    else:
        ys = [
            naive_causal_conv1d_update(x, c, w, b, activation) if backend == "torch"
            else causal_conv1d_update_fwd(x, c, w, b, activation == "silu")
            for (x, w, b, _, _), c in zip(args, caches)
        ]  # fmt: skip
    return [y.reshape(shape) for y, (_, _, _, _, shape) in zip(ys, args)]
