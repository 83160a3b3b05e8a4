"""Test set-up shared by the whole suite.

On a machine without an NVIDIA GPU the Triton kernels are tested under Triton's interpreter, which
must be switched on before triton is first imported: hence here, before anything imports torch.
Model tests are unaffected: ops default to the torch reference on CPU tensors and run Triton
only when a test asks for ``backend="triton"``.
"""

import os

if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Triton 3.6's interpreter turns one-element arrays into loop bounds with ``int()``, which numpy 2.4 rejects
    (every kernel with a runtime-length loop would fail with a TypeError deep inside the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    version = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (the CPU tests of the kernels) needs numpy < 2.4, found "
            f"numpy {numpy.__version__}: install 'numpy<2.4' or triton >= 3.7"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
