"""Test setup: Triton runs in interpreter mode when there is no GPU (must be set before triton loads)."""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sgfused  # noqa: E402  (after TRITON_INTERPRET)

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def backend_device(backend: str) -> torch.device:
    """The device a backend's tests run on; skips the test where the backend cannot run here."""
    info = sgfused.build_info()
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda":
        if "cuda" not in info["backends"] or not HAS_GPU:
            pytest.skip("CUDA backend needs a CUDA build of sgfused and a GPU")
        return torch.device("cuda")
    if backend == "triton":
        if not info["triton"]:
            pytest.skip("triton is not installed")
        return torch.device("cuda" if HAS_GPU else "cpu")
    return torch.device("cuda" if HAS_GPU else "cpu")


# Tolerances against the fp32 reference run on the same (rounded) inputs.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


# Tolerances relative to the largest reference magnitude: (values, gradients) per dtype.
SCALED_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
def assert_scaled_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    error = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-2)  # m = 1: gradients are ~0
    assert error <= tol * scale, f"max error {error:.3g} > {tol:g} x {scale:.3g}"



# Model tests: fused path against reference path.
def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = "") -> None:
    """Max error relative to the largest magnitude of ``want``."""
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), what
    scale = max(want.abs().max().item(), 1e-6)
    error = (got.double() - want.double()).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol:g} x {scale:.3g}"


def assert_gradients_close(got: dict, want: dict, tol: float) -> None:
    """Gradients of every parameter: the whole gradient within ``tol`` relative (l2), each tensor within ``10 tol``.

    A tensor is compared relative to its own norm or 5 % of the largest tensor
    norm, whichever is larger: gradients that cancel to (near) zero, such as a
    bias before a softmax or a BatchNorm, carry rounding noise of the model's
    gradient scale. A parameter without a gradient must have none in both.
    """
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
    names = [n for n in want if want[n] is not None]
    whole = torch.cat([want[n].flatten().double() for n in names])
    error = torch.cat([(got[n] - want[n]).flatten().double() for n in names])
    assert error.norm() <= tol * whole.norm(), f"whole gradient: relative error {error.norm() / whole.norm():.3g}"
    floor = 0.05 * max(want[n].norm().item() for n in names)
    for n in names:
        err = (got[n] - want[n]).double().norm().item()
        assert err <= 10 * tol * max(want[n].norm().item(), floor), f"grad {n}: error {err:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
