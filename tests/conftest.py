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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
