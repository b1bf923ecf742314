"""pytest plugin: compile every Triton kernel the tests launch for a CUDA GPU, on a machine without one.

Triton's interpreter (how the suite runs Triton without a GPU) never runs the GPU compiler, whose
passes can reject a kernel the interpreter accepts (Triton 3.6's layout pass did, see
LAYOUT_SAFE_WARPS in sgfused/triton/hardest_negative.py). With this plugin each launch first
compiles the kernel to a cubin for ``SGFUSED_COMPILE_ARCH`` (default 90, Hopper) through Triton's
own pipeline, ptxas included, then runs it in the interpreter, so the tests still check values
and also fail on any compile error (scripts/check_triton_compile.sh).

What is compiled is what a GPU would launch: ``sgfused.triton._common.compiles_for_gpu`` is made
true, so fp16 / bf16 kernels get their tensor-core specialisation (``NATIVE_DOT``); the
interpreter runs the same launch with ``NATIVE_DOT`` off (fp32 products of the same operands).
bench/triton_sm90_resources.py reads the compiled kernels through ``on_compiled``.

    python -m pytest -p triton_compile_only python_tests -k triton   (scripts/ on PYTHONPATH)
"""

from __future__ import annotations

import os
from typing import Callable

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: kernels are JIT functions

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class TargetOnlyDriver(DriverBase):
    """A driver that names a CUDA target and owns no device: enough for Triton to compile."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("compile only")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("compile only")

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError("compile only")

    def clear_cache(self, cache) -> None:
        pass


_launch = JITFunction.run
_twins: dict[int, InterpretedFunction] = {}
# called as on_compiled(kernel function name, compiled kernel, launch keyword arguments) after each compile
on_compiled: Callable[[str, object, dict], None] | None = None


def _twin(kernel: JITFunction) -> InterpretedFunction:
    """The interpreter's version of a kernel (or of a helper it calls)."""
    if id(kernel) not in _twins:
        _twins[id(kernel)] = InterpretedFunction(kernel.fn)
    return _twins[id(kernel)]


def _compile_then_interpret(self, *args, grid, warmup, **kwargs):
    """JITFunction.run: compile the kernel for the GPU target, then run it in the interpreter."""
    compiled = _launch(self, *args, grid=grid, warmup=True, **kwargs)
    if on_compiled is not None:
        on_compiled(self.fn.__name__, compiled, kwargs)
    if not warmup:
        if "NATIVE_DOT" in kwargs:  # the interpreter's 16-bit tl.dot is wrong: fp32 products instead
            kwargs = {**kwargs, "NATIVE_DOT": False}
        os.environ["TRITON_INTERPRET"] = "1"  # the interpreter's semantics (scalars, loop bounds)
        try:
            _twin(self).run(*args, grid=grid, warmup=False, **kwargs)
        finally:
            os.environ["TRITON_INTERPRET"] = "0"


def _call_in_interpreter(self, *args, **kwargs):
    """JITFunction.__call__: a helper called from an interpreted kernel is interpreted too.

    InterpretedFunction.__call__ would patch triton.language for the interpreter and leave it
    patched, breaking the next compile; this restores it, as an interpreted launch does.
    """
    twin = _twin(self)
    scope = _patch_lang(twin.fn)
    try:
        return twin.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


def install(arch: int) -> None:
    """From now on every Triton launch compiles for the CUDA ``arch`` and then runs in the interpreter."""
    driver.set_active(TargetOnlyDriver(arch))
    JITFunction.run = _compile_then_interpret
    JITFunction.__call__ = _call_in_interpreter
    import sgfused._backend
    import sgfused.triton._common

    # CPU tensors stand in for CUDA ones: the op wrappers accept them as in interpreter mode
    sgfused._backend.triton_interpreting = lambda: True
    # and the launchers choose what they would on a GPU (NATIVE_DOT)
    sgfused.triton._common.compiles_for_gpu = lambda device: True


def pytest_configure(config) -> None:
    install(int(os.environ.get("SGFUSED_COMPILE_ARCH", "90")))

