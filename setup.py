"""Package layout: ``src/kimi_hf`` is the import package; the Triton code in the top-level ``kernels/``
folder ships inside it as ``kimi_hf.kernels`` (never as a top-level ``kernels`` module, which is
Hugging Face's kernel loader's name)."""

from setuptools import find_packages, setup

kernel_packages = ["kimi_hf.kernels"] + [f"kimi_hf.kernels.{p}" for p in find_packages("kernels")]
setup(
    packages=find_packages("src") + kernel_packages,
    package_dir={"": "src", "kimi_hf.kernels": "kernels"},
)
