"""Triton helpers shared by the kernels."""

import torch
import triton
import triton.language as tl


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
    return "tf32" if dtype == torch.float32 and _tf32_allowed() else "ieee"


def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: reflects the new and the legacy settings alike
        return matmul.fp32_precision == "tf32"  # (get_float32_matmul_precision raises once both were used)
    return torch.get_float32_matmul_precision() != "highest"


@triton.jit
def cast_rounded(v, DST: tl.constexpr):
    """v in DST, rounded to nearest even (bf16 by hand: the interpreter's fp32 -> bf16 cast truncates)."""
    if DST == tl.bfloat16:
        f = v.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        v = tl.where(f == f, u.to(tl.float32, bitcast=True), f)  # NaN stays NaN
    return v.to(DST)
