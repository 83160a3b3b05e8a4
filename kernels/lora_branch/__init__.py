"""LoRA's branch in fp32 on 16-bit activations (PEFT's default adapters on a bf16 or fp16 model), without fp32 copies.

Three ops, each the plain torch sequence PEFT LoRA runs (:mod:`.naive`) or a Triton kernel that reads the 16-bit
tensors as they are (:mod:`.triton_kernels`):

* :func:`lora_down` -- ``x A^T`` (forward) and ``dY s B`` (backward);
* :func:`lora_up_add_` -- the branch added to the base output (forward) and LoRA's input gradient added to the base
  layer's (backward), in place;
* :func:`lora_weight_grad` -- the gradients of ``A`` and ``B``.

``backend=None`` follows :func:`kimi_hf.kernels.resolve_backend` (Triton for CUDA tensors). The kernels cover fp32
LoRA factors with bf16 or fp16 activations, the case whose fp32 copies they avoid; every other combination of
dtypes runs the torch sequence, whichever backend was asked for: it has no copies to avoid (one dtype throughout)
or is not PEFT's default layout.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .naive import naive_lora_down, naive_lora_up_add_, naive_lora_weight_grad

__all__ = [
    "lora_down",
    "lora_up_add_",
    "lora_weight_grad",
    "naive_lora_down",
    "naive_lora_up_add_",
    "naive_lora_weight_grad",
]

_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


def _use_triton(activations: torch.Tensor, branch: torch.Tensor, backend: str | None) -> bool:
    """Whether the kernels run: 16-bit ``activations`` with a unit column stride, an fp32 ``branch`` operand."""
    if activations.dtype not in _ACTIVATION_DTYPES or branch.dtype != torch.float32:
        return False
    return resolve_backend(backend, activations) == "triton" and activations.stride(-1) == 1


def _check_2d(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def lora_down(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """``x [T, N] @ (scale * weight [R, N])^T`` in ``weight``'s dtype: ``[T, R]``.

    LoRA's ``x A^T`` (``weight = A``) and, in backward, ``dY s B`` (``weight = B^T``, a view).
    """
    _check_2d(x=x, weight=weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [T, N] and weight [R, N] must share N, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if _use_triton(x, weight, backend):
        from .triton_kernels import lora_down_fwd  # triton is imported only when used

        return lora_down_fwd(x, weight, scale)
    return naive_lora_down(x, weight, scale)


def lora_up_add_(
    out: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    scale: float = 1.0,
    round_first: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``out [T, M] += scale * y [T, R] @ weight [M, R]^T`` in place, the branch in ``y``'s dtype; returns ``out``.

    ``round_first=False``: the sum rounded once to ``out``'s dtype (PEFT's forward adds the fp32 branch to the widened
    base output). ``True``: the branch rounded to ``out``'s dtype, then added (PEFT's backward casts LoRA's input
    gradient back to the activations' dtype before it meets the base layer's).
    """
    _check_2d(out=out, y=y, weight=weight)
    if y.shape[0] != out.shape[0] or weight.shape != (out.shape[1], y.shape[1]):
        raise ValueError(
            f"out [T, M], y [T, R] and weight [M, R] must agree, got {tuple(out.shape)}, {tuple(y.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if y.dtype != weight.dtype:
        raise ValueError(f"y and weight must share the branch's dtype, got {y.dtype} and {weight.dtype}")
    if out.shape[0] > 1 and out.stride(1) == 1 and out.stride(0) < out.shape[1]:  # as torch's in-place ops refuse
        raise ValueError(f"out's rows overlap in memory (shape {tuple(out.shape)}, strides {out.stride()})")
    if _use_triton(out, weight, backend):
        from .triton_kernels import lora_up_add_fwd

        return lora_up_add_fwd(out, y.contiguous(), weight, scale, round_first)
    return naive_lora_up_add_(out, y, weight, scale, round_first)


def lora_weight_grad(
    y: torch.Tensor, x: torch.Tensor, scale: float = 1.0, transpose: bool = False, backend: str | None = None
) -> torch.Tensor:
    """``scale * y [T, R]^T @ x [T, N]`` in ``y``'s dtype: ``[R, N]``, or ``[N, R]`` with ``transpose``.

    LoRA's ``dA = (dY s B)^T x`` and ``dB = s dY^T (x A^T)`` (``transpose``).
    """
    _check_2d(y=y, x=x)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y [T, R] and x [T, N] must share T, got {tuple(y.shape)} and {tuple(x.shape)}")
    if _use_triton(x, y, backend):
        from .triton_kernels import lora_weight_grad_fwd

        return lora_weight_grad_fwd(y.contiguous(), x, scale, transpose)
    return naive_lora_weight_grad(y, x, scale, transpose)
