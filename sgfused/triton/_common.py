"""Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rounded(v, DST: tl.constexpr):
    """v in DST, rounded to nearest even (bf16 by hand: the interpreter's fp32 -> bf16 cast truncates)."""
    if DST == tl.bfloat16:
        f = v.to(tl.float32)
        u = f.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        v = tl.where(f == f, u.to(tl.float32, bitcast=True), f)  # NaN stays NaN
    return v.to(DST)
