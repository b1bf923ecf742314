"""Backend choice for every op: which implementation serves a call, and why not the others.

``backend="auto"`` takes the fused kernels that can serve the call (CUDA C++ and Triton for
CUDA tensors, C++ for CPU tensors), never the reference while one can: the reference's memory
grows with the pairs times the feature size, which is what the kernels exist to avoid. Where
two can serve (CUDA tensors of an op with both kernels), the rule ``SGFUSED_AUTO`` says which:

- ``measure`` (the default): the first eager call of each kind times both on its own inputs
  (forward, and backward too when the inputs require grad, to the op's inputs only, so that the
  caller's graph and ``.grad`` are untouched) and keeps the faster for every later call of that
  kind: same op, device, options, dtypes, grad mode, TF32 setting and sizes rounded up to
  powers of two.
  Under ``torch.compile`` tracing or CUDA-graph capture nothing is timed: the order rule applies.
- ``order``: CUDA C++ before Triton, always (the same backend on every run, nothing timed).

The environment variable ``SGFUSED_BACKEND`` replaces ``"auto"`` globally. A backend that was
asked for by name but cannot serve the call raises :class:`BackendUnavailable` with the reason;
under ``"auto"`` it is skipped silently. Besides the device and the build, an op may name backends
that cannot serve one call's arguments (``refusals``: CUDA C++ ``cross_attention`` with
``clipped_l2`` over very long contexts), so that ``"auto"`` takes the next one.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch

from . import _build

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
AUTO_RULES = ("measure", "order")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
TIMED_RUNS = 3  # after one untimed run (Triton compiles then); one if a run takes over ONE_RUN_SECONDS
ONE_RUN_SECONDS = 0.1


class Choice(NamedTuple):
    """The measure rule's pick for one kind of call, and the median seconds it measured per kernel."""

    backend: str
    seconds: dict[str, float]


_MEASURED: dict[tuple, Choice] = {}  # the measure rule's choices, by kind of call


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


def _why_not(backend: str, device: torch.device, has: Iterable[str], refusals: Mapping[str, str]) -> str | None:
    """None if ``backend`` can serve a call on ``device``, else the reason it cannot."""
    if backend not in has:
        return "this op has no such implementation"
    if backend in refusals:
        return refusals[backend]
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


def tf32_allowed() -> bool:
    """Whether the user allows TF32 for fp32 CUDA matmuls (torch's products and the Triton kernels follow it)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: reflects the new and the legacy settings alike
        return matmul.fp32_precision == "tf32"  # (get_float32_matmul_precision raises once both were used)
    return torch.get_float32_matmul_precision() != "highest"


def auto_rule() -> str:
    """How ``"auto"`` chooses between two kernels that can serve a call: ``SGFUSED_AUTO``, default "measure"."""
    rule = os.environ.get("SGFUSED_AUTO", "measure") or "measure"
    if rule not in AUTO_RULES:
        raise ValueError(f"SGFUSED_AUTO must be one of {AUTO_RULES}, got {rule!r}")
    return rule


def measured_choices() -> dict[tuple, Choice]:
    """The measure rule's choices so far, kind of call -> :class:`Choice` (a copy)."""
    return dict(_MEASURED)


def forget_measurements() -> None:
    """Drop the measure rule's choices, so that the next call of each kind is timed again."""
    _MEASURED.clear()


def choices_state() -> list[tuple[tuple, str, dict[str, float]]]:
    """The measure rule's choices as plain tuples (``torch.load(weights_only=True)`` reads them back)."""
    return [(kind, choice.backend, choice.seconds) for kind, choice in _MEASURED.items()]


def restore_choices(state: list[tuple[tuple, str, dict[str, float]]]) -> None:
    """Put back the choices of :func:`choices_state`: a resumed run runs the kernels its first part chose."""
    for kind, backend, seconds in state:
        _MEASURED[kind] = Choice(backend, dict(seconds))


def _bucket(size: int) -> int:
    """``size`` rounded up to a power of two: calls that differ only a little share a choice."""
    return 1 << max(size - 1, 0).bit_length()


def _call_kind(op: str, device: torch.device, args: tuple) -> tuple:
    """What a measured choice is kept for: op, device (with the GPU's name, so a run resumed on another
    kind of GPU times afresh), grad mode, whether TF32 is allowed, and each argument's dtype, bucketed
    sizes and whether it gets a gradient (tensors) or value (options)."""
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    described = tuple(
        (str(a.dtype)[6:], tuple(_bucket(n) for n in a.shape), grad and a.requires_grad)
        if isinstance(a, torch.Tensor) else a
        for a in args
    )
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return (op, where, "fwd+bwd" if grad else "fwd", "tf32" if tf32_allowed() else "ieee", described)


def _run(implementation: Callable[..., object], args: tuple, backward: bool) -> None:
    """One call on ``args``; with ``backward``, also the gradients of its outputs to ``args`` alone
    (``autograd.grad``: nothing reaches ``.grad``, and the graph behind ``args`` is neither run nor freed)."""
    if not backward:
        with torch.no_grad():
            implementation(*args)
        return
    out = implementation(*args)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)


def _seconds(implementation: Callable[..., object], args: tuple, backward: bool, device: torch.device) -> float:
    """Median seconds of ``implementation`` on ``args`` (after an untimed run), device work included."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _run(implementation, args, backward)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    _run(implementation, args, backward)
    times = [timed()]
    if times[0] <= ONE_RUN_SECONDS:
        times += [timed() for _ in range(TIMED_RUNS - 1)]
    return statistics.median(times)


def _measured(op: str, candidates: list[str], device: torch.device, implementations: Mapping[str, Callable[..., object]],
              args: tuple) -> str:
    """The faster of ``candidates`` for this kind of call, timed on its first call.

    A kernel that runs out of memory while timed counts as infinitely slow (the other one can serve
    the call); if every one does, the last error is raised, as the call itself would have.
    """
    kind = _call_kind(op, device, args)
    if kind not in _MEASURED:
        backward = kind[2] == "fwd+bwd"
        times, short = {}, None
        for name in candidates:
            try:
                times[name] = _seconds(implementations[name], args, backward, device)
            except torch.OutOfMemoryError as error:
                times[name], short = float("inf"), error
        if min(times.values()) == float("inf"):
            raise short
        _MEASURED[kind] = Choice(min(candidates, key=times.__getitem__), times)
    return _MEASURED[kind].backend


def _may_time(device: torch.device) -> bool:
    """Whether a call can be timed here: eagerly, and not while a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def choose_backend(op: str, requested: str, device: torch.device,
                   implementations: Iterable[str] | Mapping[str, Callable[..., object]],
                   args: tuple | None = None, refusals: Mapping[str, str] | None = None) -> str:
    """The backend that serves a call of ``op`` on ``device``.

    ``implementations`` names the backends ``op`` provides; to let the measure rule time them,
    it maps each name to its implementation and ``args`` are the call's arguments. ``refusals``
    maps the backends that cannot serve these arguments to the reason.
    """
    refusals = refusals or {}
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = os.environ.get("SGFUSED_BACKEND", "auto") or "auto"
        if requested not in BACKENDS:
            raise ValueError(f"SGFUSED_BACKEND must be one of {BACKENDS}, got {requested!r}")
        rule = auto_rule()
    names = tuple(implementations)
    if requested != "auto":
        reason = _why_not(requested, device, names, refusals)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} cannot serve this call: {reason}")
        return requested
    candidates = [c for c in _AUTO_ORDER.get(device.type, ())
                  if c != "reference" and _why_not(c, device, names, refusals) is None]
    if not candidates:
        return "reference"
    if len(candidates) > 1 and args is not None and rule == "measure" and _may_time(device):
        return _measured(op, candidates, device, implementations, args)
    return candidates[0]

