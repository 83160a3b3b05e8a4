"""kimi_hf's Triton kernels, one folder per op, each with a plain-torch reference.

Every public op takes a ``backend`` argument (``"triton"`` or ``"torch"``); left as ``None`` it follows
:func:`resolve_backend`: Triton for CUDA tensors (but fp64 ones), the torch reference elsewhere.
"""

from ._backend import BACKEND_ENV_VAR, resolve_backend

__all__ = ["BACKEND_ENV_VAR", "resolve_backend"]
