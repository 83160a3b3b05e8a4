"""Plain-torch references of LoRA's branch in a wider dtype than its activations (PEFT's fp32 adapters on a bf16 model).

Each follows PEFT LoRA's own sequence of torch ops (the 16-bit tensor widened, then the GEMM in the branch's dtype),
so that the layer that calls them computes what PEFT does on every device; the Triton kernels compute the same
values without the widened copies (see :mod:`.triton_kernels`).
"""

from __future__ import annotations

import torch


def naive_lora_down(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x [T, N] @ (scale * weight [R, N])^T`` in ``weight``'s dtype: ``[T, R]``."""
    weight_t = weight.T if scale == 1.0 else weight.T * scale  # the small operand scaled
    return x.to(weight.dtype) @ weight_t


def naive_lora_up_add_(
    out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, round_first: bool = False
) -> torch.Tensor:
    """``out [T, M] += scale * y [T, R] @ weight [M, R]^T``, in place; returns ``out``.

    The branch is computed in ``y``'s dtype. ``round_first=False`` adds it to ``out`` widened and rounds the sum once
    (PEFT's forward: ``result + lora_B(...) * scaling``, then ``.to(result's dtype)``); ``True`` rounds the branch to
    ``out``'s dtype first and adds in that dtype (PEFT's backward: the branch's input gradient is cast back to ``x``'s
    dtype, then accumulated with the base layer's).
    """
    if round_first:
        branch = y @ weight.T
        if scale != 1.0:
            branch.mul_(scale)
        return out.add_(branch.to(out.dtype))
    return out.copy_(torch.addmm(out.to(y.dtype), y, weight.T, alpha=scale))


def naive_lora_weight_grad(
    y: torch.Tensor, x: torch.Tensor, scale: float = 1.0, transpose: bool = False
) -> torch.Tensor:
    """``scale * y [T, R]^T @ x [T, N]`` in ``y``'s dtype: ``[R, N]``, or ``[N, R]`` with ``transpose``."""
    x = x.to(y.dtype)
    first, second = (x.T, y) if transpose else (y.T, x)
    if scale == 1.0:
        return first @ second
    # beta=0: the input only needs to broadcast to the output, and is never read
    return torch.addmm(y.new_empty(()), first, second, beta=0, alpha=scale)
