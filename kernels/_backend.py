"""Choosing between the Triton kernels and the plain-torch references."""

from __future__ import annotations

import os

import torch

BACKEND_ENV_VAR = "KIMI_HF_KERNEL_BACKEND"
_BACKENDS = ("triton", "torch")


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op called on ``tensor``.

    Priority: the explicit ``backend`` argument, then the ``KIMI_HF_KERNEL_BACKEND`` environment
    variable, then the default: Triton on CUDA tensors other than fp64, the torch reference otherwise. Triton on
    CPU tensors must be asked for explicitly and needs Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR) or None
    if choice is None:
        # fp64 goes to the references, which compute in fp64. The kernels compute in fp32 (fused_recurrent_kda,
        # the conv and gated_rms_norm returned fp32-accurate results in fp64 tensors) or refuse fp64 (chunk_kda,
        # the MoE ops): a float64 model on a GPU stopped in its first KDA layer.
        return "triton" if tensor.is_cuda and tensor.dtype != torch.float64 else "torch"
    # Errors name where the choice came from: a call that passed no backend and meets an error about
    # backend='triton' cannot tell that a forgotten environment variable forced it.
    source = "backend" if backend is not None else BACKEND_ENV_VAR
    if choice not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (from {source}): expected one of {_BACKENDS}")
    if choice == "triton" and not (tensor.is_cuda or _triton_interpreter_on()):
        raise ValueError(
            f"{source}={choice!r} needs CUDA tensors (got device {tensor.device}); set TRITON_INTERPRET=1 before "
            "triton is first imported (it is read then) to run the kernels on CPU under Triton's interpreter"
        )
    return choice


def refuse_create_graph(op: str) -> None:
    """Raise in a Triton backward run with ``create_graph=True`` (grad mode is on inside backward only then).

    The Triton backward kernels are not differentiable: a second derivative would take their gradients as constants,
    silently wrong. ``once_differentiable`` is not enough: it marks only the gradients computed from grad outputs
    that require grad, while the kernels' gradients also depend on the saved forward tensors (a loss ``out.sum()``
    has a constant grad output).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the Triton {op} backward is not differentiable (create_graph=True, a second derivative): use "
            f"backend='torch' ({BACKEND_ENV_VAR}=torch), whose backward autograd differentiates"
        )
