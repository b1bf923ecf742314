"""Build facts, the torch-version guard and backend dispatch."""

from __future__ import annotations

import pytest
import torch

import sgfused
from sgfused._backend import choose_backend
from sgfused._build import BuildMismatch, check_torch_version

ALL = ("reference", "cpu", "cuda", "triton")


def test_build_info_reports_what_was_compiled():
    info = sgfused.build_info()
    assert "cpu" in info["backends"]
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["openmp"], bool) and isinstance(info["triton"], bool)
    if "cuda" in info["backends"]:
        assert info["cuda_arch_list"]


def test_cpu_kernels_are_built_with_openmp_when_torch_has_it():
    assert sgfused.build_info()["openmp"] == torch.backends.openmp.is_available()


def test_version_mismatch_says_how_to_rebuild():
    with pytest.raises(BuildMismatch, match="compiled against torch 2.0.0 but torch 9.9.9 is installed") as info:
        check_torch_version("2.0.0", "9.9.9")
    assert "pip install --no-build-isolation" in str(info.value)
    check_torch_version(torch.__version__, torch.__version__)


def test_auto_prefers_compiled_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    assert choose_backend("op", "auto", torch.device("cpu"), ALL) == "cpu"
    assert choose_backend("op", "auto", torch.device("cpu"), ("reference", "triton")) == "reference"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("SGFUSED_BACKEND", "reference")
    assert choose_backend("op", "auto", torch.device("cpu"), ALL) == "reference"
    assert choose_backend("op", "cpu", torch.device("cpu"), ALL) == "cpu"  # an explicit argument wins
    monkeypatch.setenv("SGFUSED_BACKEND", "fast")
    with pytest.raises(ValueError, match="SGFUSED_BACKEND must be one of"):
        choose_backend("op", "auto", torch.device("cpu"), ALL)


def test_forced_backend_that_cannot_serve_says_why():
    with pytest.raises(sgfused.BackendUnavailable, match="backend 'cuda' cannot serve this call"):
        sgfused.ops.hardest_negative_loss(torch.randn(3, 3), backend="cuda")
    with pytest.raises(sgfused.BackendUnavailable, match="has no such implementation"):
        sgfused.ops.hardest_negative_loss_from_embeddings(torch.randn(3, 2), torch.randn(3, 2), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        sgfused.ops.hardest_negative_loss(torch.randn(3, 3), backend="gpu")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sgfused.BackendUnavailable, match="TRITON_INTERPRET=1"):
        choose_backend("op", "triton", torch.device("cpu"), ALL)


def test_every_op_in_the_op_list_registers_and_has_a_test_file():
    """sgfused.ops.OPS is the one op list (docs/adding_an_op.md): scripts and tests derive theirs from it."""
    import importlib
    import pathlib

    tests = pathlib.Path(__file__).parent
    for name in sgfused.ops.OPS:
        assert callable(importlib.import_module(f"sgfused.ops.{name}").register), name
        assert (tests / f"test_{name}.py").is_file(), f"op {name} has no python_tests/test_{name}.py"


def test_triton_dot_precision_follows_torch_matmul():
    """fp32 products go to TF32 exactly when torch.matmul's setting allows it; other dtypes never."""
    from sgfused.triton._common import dot_precision

    saved = torch.get_float32_matmul_precision()
    try:
        assert [dot_precision(t) for t in (torch.float32, torch.float64, torch.bfloat16)] == ["ieee"] * 3
        for allowing in ("high", "medium"):
            torch.set_float32_matmul_precision(allowing)
            assert dot_precision(torch.float32) == "tf32"
            assert dot_precision(torch.float64) == dot_precision(torch.float16) == "ieee"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True  # the older switch says the same
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
