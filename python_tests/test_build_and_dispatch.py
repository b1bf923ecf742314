"""Build facts, the torch-version guard and backend dispatch."""

from __future__ import annotations

import pytest
import torch

import sgfused
from sgfused._backend import choose_backend
from sgfused._build import BuildMismatch, check_torch_version
from conftest import backend_device

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


def test_compiled_code_reads_the_backend_variable_when_traced(monkeypatch):
    """README: a compiled function keeps the backend SGFUSED_BACKEND named when it was traced, and takes the new
    one after torch.compiler.reset()."""
    import importlib

    module = importlib.import_module("sgfused.ops.max_sim")
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    served = []
    for name in ("cpu", "reference"):
        kernel = module._IMPLEMENTATIONS[name]
        monkeypatch.setitem(module._IMPLEMENTATIONS, name, lambda *args, k=kernel, n=name: served.append(n) or k(*args))
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.compiler.reset()
    compiled = torch.compile(lambda a, b: sgfused.ops.max_sim(a, b), fullgraph=True, backend="aot_eager")
    compiled(x, y)
    assert set(served) == {"cpu"}
    monkeypatch.setenv("SGFUSED_BACKEND", "reference")
    served.clear()
    compiled(x, y)
    assert "reference" not in served  # the traced graph runs the kernel chosen at trace time
    torch.compiler.reset()
    served.clear()
    compiled(x, y)
    assert set(served) == {"reference"}
    torch.compiler.reset()


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


# ---------------------------------------------------------------- auto's measure rule
def _two_kernels_on_cpu(monkeypatch) -> None:
    """Let auto see two kernels for CPU tensors (C++ and Triton in interpreter mode), as it does for CUDA ones."""
    from sgfused import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SGFUSED_AUTO", "measure")
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("cpu", "triton", "reference"))
    monkeypatch.setattr(_backend, "_MEASURED", {})


def test_measure_rule_keeps_the_faster_kernel_for_each_kind_of_call(monkeypatch):
    from sgfused import _backend

    _two_kernels_on_cpu(monkeypatch)
    seconds = {"cpu": 2.0, "triton": 1.0}
    implementations = {"reference": None, "cpu": "cpu", "triton": "triton"}  # _seconds is faked: names suffice
    timed = []
    monkeypatch.setattr(_backend, "_seconds", lambda impl, args, backward, device: timed.append(impl) or seconds[impl])

    def choose(*args):
        return choose_backend("op", "auto", torch.device("cpu"), implementations, args)

    assert choose(torch.zeros(100, 8), "distance") == "triton" and timed == ["cpu", "triton"]
    seconds.update(cpu=0.5)
    assert choose(torch.zeros(128, 8), "distance") == "triton" and len(timed) == 2  # same bucket: kept, not timed
    assert choose(torch.zeros(129, 8), "distance") == "cpu" and len(timed) == 4  # the next power of two: timed
    assert choose(torch.zeros(100, 8), "direction") == "cpu"  # another option
    assert choose(torch.zeros(100, 8, dtype=torch.float64), "distance") == "cpu"  # another dtype
    assert choose(torch.zeros(100, 8, requires_grad=True), "distance") == "cpu"  # fwd+bwd
    with torch.no_grad():  # no backward: the forward's choice
        assert choose(torch.zeros(100, 8, requires_grad=True), "distance") == "triton"
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products: another kind of call
        assert choose(torch.zeros(100, 8), "distance") == "cpu" and len(timed) == 12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert len(sgfused.measured_choices()) == 6
    first = sgfused.measured_choices()[("op", "cpu", "fwd", "ieee", (("float32", (128, 8), False), "distance"))]
    assert first == ("triton", {"cpu": 2.0, "triton": 1.0})
    monkeypatch.setenv("SGFUSED_AUTO", "order")
    assert choose(torch.zeros(100, 8), "distance") == "cpu" and len(timed) == 12  # the order, nothing timed
    assert choose_backend("op", "auto", torch.device("cpu"), implementations) == "cpu"  # no arguments to time
    monkeypatch.setenv("SGFUSED_AUTO", "fastest")
    with pytest.raises(ValueError, match=r"SGFUSED_AUTO must be one of \('measure', 'order'\), got 'fastest'"):
        choose(torch.zeros(100, 8), "distance")
    sgfused.forget_measurements()
    assert sgfused.measured_choices() == {}


def test_measure_rule_passes_over_a_kernel_that_runs_out_of_memory(monkeypatch):
    from sgfused import _backend

    _two_kernels_on_cpu(monkeypatch)
    short = {"triton"}

    def seconds(impl, args, backward, device):
        if impl in short:
            raise torch.OutOfMemoryError(f"{impl}: out of memory")
        return 1.0

    monkeypatch.setattr(_backend, "_seconds", seconds)
    implementations = {"reference": None, "cpu": "cpu", "triton": "triton"}
    assert choose_backend("op", "auto", torch.device("cpu"), implementations, (torch.zeros(3),)) == "cpu"
    assert list(sgfused.measured_choices().values()) == [("cpu", {"cpu": 1.0, "triton": float("inf")})]
    short.add("cpu")
    with pytest.raises(torch.OutOfMemoryError, match="triton: out of memory"):  # neither fits: the call's own error
        choose_backend("op", "auto", torch.device("cpu"), implementations, (torch.zeros(5),))
    short.discard("triton")
    assert choose_backend("op", "auto", torch.device("cpu"), implementations, (torch.zeros(9),)) == "triton"


def test_measure_rule_times_forward_and_backward_without_touching_the_callers_graph(monkeypatch):
    """A real op: both kernels are timed on the call's inputs (backward included), the caller gets the
    chosen kernel's values and gradients, and the timing neither reaches the caller's .grad nor frees the
    graph behind the inputs (tanh keeps its output for its backward), nor fires the leaf's gradient hooks."""
    from sgfused import _backend

    _two_kernels_on_cpu(monkeypatch)
    runs = []
    monkeypatch.setattr(_backend, "ONE_RUN_SECONDS", float("inf"))  # never "long" (the interpreter is slow)
    real_run = _backend._run
    monkeypatch.setattr(_backend, "_run", lambda impl, args, backward: runs.append(backward) or real_run(impl, args, backward))
    torch.manual_seed(0)
    x, y, w = torch.randn(5, 16), torch.randn(7, 16), torch.randn(8, 16) / 4
    leaves = [t.clone().requires_grad_() for t in (x, y, w)]
    out = sgfused.ops.pairwise_similarity(leaves[0].tanh(), leaves[1].tanh(), leaves[2])  # W: a leaf
    assert runs == [True] * 2 * (1 + _backend.TIMED_RUNS)  # one untimed and TIMED_RUNS timed, each kernel
    assert all(t.grad is None for t in leaves)
    ((kind, (chosen, seconds)),) = sgfused.measured_choices().items()
    assert kind[:3] == ("pairwise_similarity", "cpu", "fwd+bwd") and chosen == min(seconds, key=seconds.get)
    assert set(seconds) == {"cpu", "triton"}
    out.sum().backward()
    want = [t.clone().requires_grad_() for t in (x, y, w)]
    sgfused.ops.pairwise_similarity(want[0].tanh(), want[1].tanh(), want[2], backend=chosen).sum().backward()
    assert torch.equal(out, sgfused.ops.pairwise_similarity(x.tanh(), y.tanh(), w, backend=chosen))
    for got, ref in zip(leaves, want):
        assert torch.equal(got.grad, ref.grad)

    hooked = []
    leaf = w.clone().requires_grad_()
    leaf.register_post_accumulate_grad_hook(hooked.append)  # what DDP and optimizers-in-backward use
    sgfused.ops.pairwise_similarity(leaves[0].tanh(), leaves[1].tanh(), leaf)  # the same kind: kept, not timed
    assert len(runs) == 2 * (1 + _backend.TIMED_RUNS)
    sgfused.forget_measurements()
    sgfused.ops.pairwise_similarity(leaves[0].tanh(), leaves[1].tanh(), leaf)  # timed again, with the hook on
    assert len(runs) == 4 * (1 + _backend.TIMED_RUNS) and hooked == [] and leaf.grad is None

    runs.clear()
    monkeypatch.setattr(_backend, "ONE_RUN_SECONDS", -1.0)  # every run "long": one timed run after the untimed one
    sgfused.ops.pairwise_similarity(x, y, w)  # no grad wanted: a new kind, forward only
    assert runs == [False] * 2 * 2


def test_measure_rule_times_nothing_while_a_cuda_graph_is_captured(monkeypatch):
    from sgfused import _backend

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _backend._may_time(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _backend._may_time(torch.device("cuda", 0))


def test_a_measured_choice_belongs_to_the_kind_of_gpu_it_was_timed_on(monkeypatch):
    """The kind names the GPU, so choices restored from a last.pt written on another GPU model are not reused."""
    from sgfused import _backend

    args = (torch.randn(3, 8), 0.5)
    kinds = []
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        kinds.append(_backend._call_kind("op", torch.device("cuda:0"), args))
    assert kinds[0] != kinds[1] and "NVIDIA H200" in kinds[1][1] and "cuda:0" in kinds[1][1]


def test_measure_rule_times_nothing_under_torch_compile(monkeypatch):
    from sgfused import _backend

    _two_kernels_on_cpu(monkeypatch)
    monkeypatch.setattr(_backend, "_seconds", lambda *args: pytest.fail("timed while tracing"))
    torch._dynamo.reset()
    x, y, w = torch.randn(5, 16), torch.randn(7, 16), torch.randn(8, 16) / 4
    compiled = torch.compile(lambda a, b, c: sgfused.ops.pairwise_similarity(a, b, c), fullgraph=True)
    torch.testing.assert_close(compiled(x, y, w), sgfused.ops.pairwise_similarity(x, y, w, backend="cpu"))
    assert sgfused.measured_choices() == {}


def test_measure_rule_on_a_gpu(monkeypatch):
    """On CUDA tensors both kernels are timed between synchronisations and the faster one serves the call."""
    from sgfused import _backend

    device = backend_device("cuda")
    backend_device("triton")
    monkeypatch.setenv("SGFUSED_AUTO", "measure")
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_MEASURED", {})
    x, y, w = torch.randn(64, 256, device=device), torch.randn(96, 256, device=device), torch.randn(32, 256, device=device)
    out = sgfused.ops.pairwise_similarity(x, y, w / 16)
    ((kind, (chosen, seconds)),) = sgfused.measured_choices().items()
    assert kind[:3] == ("pairwise_similarity", str(x.device), "fwd") and set(seconds) == {"cuda", "triton"}
    assert chosen == min(seconds, key=seconds.get)
    assert torch.equal(out, sgfused.ops.pairwise_similarity(x, y, w / 16, backend=chosen))
