"""Backend choice for every op: which implementation serves a call, and why not the others.

``backend="auto"`` tries, in order, CUDA C++ -> Triton -> reference for CUDA
tensors and C++ CPU -> reference for CPU tensors. The environment variable
``SGFUSED_BACKEND`` replaces ``"auto"`` globally. A backend that was asked for by
name but cannot serve the call raises :class:`BackendUnavailable` with the reason;
under ``"auto"`` it is skipped silently.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import torch

from . import _build

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot serve this call."""


# Import-time constants, so torch.compile traces backend choice as plain Python.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs in interpreter mode (kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_bf16_dot() -> str | None:
    """The CPU's bf16 dot-product instructions ("amx_bf16" or "avx512_bf16"), or None.

    Only with them does a bf16 GEMM on the CPU beat fp32 (without them PyTorch's is a scalar loop,
    about 100x slower), so the C++ kernels run bf16 GEMMs only then (``SGFUSED_CPU_BF16_GEMM=0/1``
    forces either way) and ``sgfused eval --similarity-dtype bf16`` says when it will be slow.
    """
    return _build._load_extension().cpu_bf16_dot() or None


def _why_not(backend: str, device: torch.device, has: Iterable[str]) -> str | None:
    """None if ``backend`` can serve a call on ``device``, else the reason it cannot."""
    if backend not in has:
        return "this op has no such implementation"
    if backend == "reference":
        return None
    if backend == "triton":
        if not TRITON_AVAILABLE:
            return "the triton package is not installed"
        if device.type != "cuda" and not triton_interpreting():
            return f"Triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1"
        return None
    if backend not in _build.COMPILED_BACKENDS:
        return f"sgfused was built without the {backend} backend (see sgfused.build_info())"
    if device.type != backend:
        return f"the {backend} backend needs {backend} tensors, got {device.type}"
    return None


def choose_backend(op: str, requested: str, device: torch.device, has: Iterable[str]) -> str:
    """The backend that serves a call of ``op`` on ``device``.

    ``has`` lists the implementations ``op`` provides.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = os.environ.get("SGFUSED_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"SGFUSED_BACKEND must be one of {BACKENDS}, got {requested!r}")
    has = tuple(has)
    if requested != "auto":
        reason = _why_not(requested, device, has)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot serve this call: {reason}")
        return requested
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if _why_not(candidate, device, has) is None:
            return candidate
    return "reference"

