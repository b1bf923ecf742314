"""Test setup: Triton in interpreter mode without a GPU, and every test isolated from the others' global state.

``backend="auto"`` follows its order rule here (``SGFUSED_AUTO=order``, unless set outside), so
which kernel a test runs never depends on a timing; the measure rule's own tests set it.

Triton's mode must be set before triton loads. Process-wide settings (torch's thread count, default
dtype, grad mode, deterministic-algorithm and matmul-precision flags, the environment variables such
as ``SGFUSED_BACKEND``) are snapshotted around every test: a test that leaves one changed fails, and
the setting is restored so the tests after it still run as they would alone. Random states are
reseeded before and restored after every test.
"""

import importlib.util
import os
import random
import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SGFUSED_AUTO", "order")

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


# Variables the tools set for themselves, not a test's doing: pytest rewrites the first around every
# phase; torch's compiler and Triton set their cache folders (and a pointer) on first use.
TOOLS_OWN_VARIABLES = (
    "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
)


def _environ() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in TOOLS_OWN_VARIABLES}


def _set_environ(saved: dict[str, str]) -> None:
    for name in set(_environ()) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _set_deterministic(saved: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _set_cudnn(saved: tuple[bool, bool, bool, bool]) -> None:
    cudnn = torch.backends.cudnn
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32 = saved


def _set_cuda_matmul(saved: tuple[bool, bool]) -> None:
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction = saved


def _tools_own_path(entry: str) -> bool:
    """setuptools appends its vendored packages' folder on first import (torch's extension builder imports it)."""
    return entry.endswith(os.path.join("setuptools", "_vendor"))


def _sys_path() -> list[str]:
    return [entry for entry in sys.path if not _tools_own_path(entry)]


def _set_sys_path(saved: list[str]) -> None:
    sys.path[:] = saved + [entry for entry in sys.path if _tools_own_path(entry)]

# (what, read it, set it back): the process-wide settings a test must leave as it found them.
GLOBAL_SETTINGS: tuple[tuple[str, Callable[[], Any], Callable[[Any], None]], ...] = (
    ("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    ("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    ("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
    (
        "torch.use_deterministic_algorithms (enabled, warn_only)",
        lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        _set_deterministic,
    ),
    ("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    (
        "torch.backends.cudnn (enabled, benchmark, deterministic, allow_tf32)",
        lambda: (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                 torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32),
        _set_cudnn,
    ),
    (
        "torch.backends.cuda.matmul (allow_tf32, allow_fp16_reduced_precision_reduction)",
        lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        _set_cuda_matmul,
    ),
    ("os.environ", _environ, _set_environ),
    ("sgfused.measured_choices()", sgfused.measured_choices,
     lambda saved: (sgfused.forget_measurements(), sgfused._backend._MEASURED.update(saved))),
    # spawned workers inherit it: the source tree ahead of the installed package would shadow its kernels
    ("sys.path", lambda: _sys_path(), lambda saved: _set_sys_path(saved)),
)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One phrase per setting that differs; environment variables are named one by one."""
    changed = []
    for what in before:
        if before[what] == after[what]:
            continue
        if what == "os.environ":
            for name in sorted(set(before[what]) | set(after[what])):
                if before[what].get(name) != after[what].get(name):
                    changed.append(f"environment variable {name}: {before[what].get(name)!r} -> {after[what].get(name)!r}")
        else:
            changed.append(f"{what}: {before[what]!r} -> {after[what]!r}")
    return changed


def _random_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_random_states(states: tuple[Any, ...]) -> None:
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


# Set the thread count explicitly once: torch's untouched default and the same count set explicitly
# can differ in which math library threads run, so a test that sets and restores it would otherwise
# change the reductions of every later test.
torch.set_num_threads(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Seeds torch with 0, then fails the test (after restoring) if it left any GLOBAL_SETTINGS changed."""
    settings = {what: read() for what, read, _ in GLOBAL_SETTINGS}
    random_states = _random_states()
    torch.manual_seed(0)
    yield
    leaked = _changes(settings, {what: read() for what, read, _ in GLOBAL_SETTINGS})
    for what, _, restore in GLOBAL_SETTINGS:
        restore(settings[what])
    _set_random_states(random_states)
    if leaked:
        pytest.fail("the test left global state changed (now restored): " + "; ".join(leaked), pytrace=False)


@pytest.fixture
def one_thread():
    """Runs a test on one torch thread (its reductions then do not depend on the machine), and restores the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def bench_module(name: str):
    """The module ``bench/NAME.py``, imported as the bench scripts see each other (bench/ on the path).

    ``sys.path`` is put back as it was, whatever the script does to it at import: processes that the
    tests spawn inherit it, and a source checkout ahead of the installed package would shadow its kernels.
    """
    saved = list(sys.path)
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


TRAINING_FEATURE_DIM = 16


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    """The trainer tests' data: 40 synthetic scenes (seed 3) with 16-d features, as (folder, vocabulary, train
    split, dev split)."""
    from sgfused.data.precomp import PrecompSplit
    from sgfused.data.synthetic import generate
    from sgfused.data.vocab import Vocabulary

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, 40, seed=3, feature_dim=TRAINING_FEATURE_DIM, progress=False)
    vocab = Vocabulary.load(root / "vocab.json")
    return root, vocab, PrecompSplit(root, "train", vocab), PrecompSplit(root, "dev", vocab)

# TF32 products round both operands to 10 mantissa bits (unit roundoff 2^-11 ~ 4.9e-4); relative to
# the largest magnitude, sums of them stay well inside this where the kernels' intermediates
# (softmax weights, upstream gradients) are rounded too.
TF32_TOL = 1e-2


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` rounded to nearest even at TF32's 10 mantissa bits: inputs whose TF32 products are exact.

    With such inputs a TF32 kernel differs from the fp64 reference only through its rounded
    intermediates, so no near-tie (argmax, hinge) flips between the two, on a GPU or in the
    interpreter (which computes every product in full precision).
    """
    bits = t.float().contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


@pytest.fixture
def tf32_launches(monkeypatch):
    """TF32 allowed for fp32 matmuls (``torch.set_float32_matmul_precision("high")``) during the test.

    Yields the list of the ``PRECISION`` constexpr of every Triton kernel launched meanwhile
    (None for kernels without a ``tl.dot``), so a test can check that the setting reached them.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen: list = []
    for kind in (JITFunction, InterpretedFunction):
        def spy(self, *args, _run=kind.run, **kwargs):
            seen.append(kwargs.get("PRECISION"))
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(kind, "run", spy)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield seen
    torch.set_float32_matmul_precision(saved)


def assert_tf32_reached_the_kernels(backend: str, seen: list) -> None:
    """On the Triton backend, every launched kernel with a ``tl.dot`` ran its TF32 specialisation."""
    if backend == "triton":
        assert "tf32" in seen and "ieee" not in seen, f"PRECISION of the launched kernels: {seen}"
