"""Triton helpers shared by the kernels."""

import torch
import triton
import triton.language as tl

from .._backend import tf32_allowed


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of the kernels' ``tl.dot`` for inputs of ``dtype``: torch.matmul's rule.

    "tf32" (tensor-core products of fp32 operands rounded to 10 mantissa bits, fp32
    accumulation) for fp32 inputs when the user allows TF32 for CUDA matmuls
    (``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.allow_tf32``
    or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``); "ieee" (full fp32, or fp64)
    otherwise, which is the default. fp16 / bf16 products are native whatever this says. The
    rule does not look at the device, so the CPU tests launch (and CI compiles for sm_90) the
    TF32 specialisations too; the interpreter computes every product in full precision.
    """
    return "tf32" if dtype == torch.float32 and tf32_allowed() else "ieee"


def keeps_fp32_operands(dtype: torch.dtype, distance: bool) -> bool:
    """Whether the products with W keep fp32 operands (TF32 products) instead of the input dtype's.

    True for fp16 with the distance feature: ``(x - y)^2`` passes fp16's largest value (65504) from
    ``|x - y| = 256``, and rounded to fp16 it became inf, then NaN. TF32 keeps fp16's 10 mantissa bits
    with fp32's range (the interpreter multiplies in full fp32). bf16 has fp32's range already.
    """
    return distance and dtype == torch.float16


def native_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels hand fp16 / bf16 operands to ``tl.dot`` as they are (the ``NATIVE_DOT`` constexpr).

    True for fp16 / bf16 inputs on a GPU: tensor-core products with fp32 accumulation. Elsewhere
    (the interpreter, whose 16-bit ``tl.dot`` returns garbage) the kernels widen the same operands
    to fp32 first (``dot_operand``), which computes the same products: those of two fp16 / bf16
    values are exact in fp32. scripts/triton_compile_only.py makes ``compiles_for_gpu`` true, so the
    compile check builds what a GPU runs.
    """
    return dtype in (torch.float16, torch.bfloat16) and compiles_for_gpu(device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton type of a torch floating dtype (the ``DOT`` constexpr of ``dot_operand``)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def compiles_for_gpu(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` are compiled for a GPU (not run by the interpreter)."""
    return device.type == "cuda"


def split_count(n_steps: int, other_programs: int, target: int) -> int:
    """Into how many contiguous ranges (1 to n_steps) a kernel splits a loop of n_steps, so that with
    ``other_programs`` programs per range about ``target`` programs run.

    It depends on the shapes and the target only, so the order in which the launcher sums the
    ranges' partials (and so the result) is fixed for a given problem.
    """
    if other_programs == 0:
        return 1
    return max(1, min(n_steps, triton.cdiv(target, other_programs)))


def sum_partials(part: torch.Tensor) -> torch.Tensor:
    """The sum of per-range partials over their leading axis, in a fixed order (no copy for one range)."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


@triton.jit
def cast_rounded(v, DST: tl.constexpr):
    """v in DST, rounded to nearest even (bf16 by hand: the interpreter's fp32 -> bf16 cast truncates)."""
    if DST == tl.bfloat16:
        f = v.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        v = tl.where(f == f, u.to(tl.float32, bitcast=True), f)  # NaN stays NaN
    return v.to(DST)


@triton.jit
def widened(v, ACC: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """A tile loaded from an input, as a ``tl.dot`` operand: as it is with NATIVE_DOT (tensor cores), else in ACC."""
    if not NATIVE_DOT:
        v = v.to(ACC)
    return v


@triton.jit
def dot_operand(v, DTYPE: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """v as a ``tl.dot`` operand of a kernel whose inputs are DTYPE: rounded to nearest even in DTYPE
    and kept there with NATIVE_DOT (tensor cores), else widened to fp32 (fp64 stays): the same values."""
    v = cast_rounded(v, DTYPE)
    if not NATIVE_DOT:
        if DTYPE != tl.float64:
            v = v.to(tl.float32)
    return v
