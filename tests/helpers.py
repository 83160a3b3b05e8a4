"""Assertions shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path;
the repository root must not be on it, or its `kernels/` folder would shadow Hugging Face's `kernels`)."""

import torch


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Assert ``||actual - expected|| <= rtol * ||expected||`` (Frobenius norms, in float64).

    NaN or inf in either tensor always fails: a relative error computed from NaN compares False,
    and we check finiteness explicitly so that it cannot pass by accident.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: result has NaN/inf")
    if not torch.isfinite(e).all():
        raise AssertionError(f"{name}: reference has NaN/inf")
    err = (a - e).norm().item()
    ref = e.norm().item()
    rel = err / max(ref, 1e-30)
    if not rel <= rtol:
        raise AssertionError(f"{name}: relative error {rel:.3e} > {rtol:.1e} (abs {err:.3e}, ref norm {ref:.3e})")
