// Helpers shared by the CUDA kernels: accumulation-type math, deterministic warp
// reductions, grid-stride indexing and the host-side launch arithmetic.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sgfused {
namespace cuda_common {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridStrideBlocks = int64_t(1) << 16;

__device__ __forceinline__ float acc_sqrt(float v) {
  return sqrtf(v);
}
__device__ __forceinline__ double acc_sqrt(double v) {
  return ::sqrt(v);
}

// Sum over the warp by a fixed xor butterfly: every lane gets the same, bit-identical total.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Grid-stride index helpers.
__device__ __forceinline__ int64_t global_thread() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t global_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Blocks of a grid-stride kernel over `items` items of `per_block` each (>= 1 block).
inline unsigned int grid_stride_blocks(int64_t items, int64_t per_block) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(items, per_block), 1, kMaxGridStrideBlocks));
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The operand dtype of the GEMMs with W: the input dtype, except fp16 with the distance feature, whose
// E = (x - y)^2 passes fp16's largest value (65504) from |x - y| = 256: there W, E and dZ meet in acc.
inline at::ScalarType w_gemm_dtype(at::ScalarType input, bool distance, at::ScalarType acc) {
  return input == at::kHalf && distance ? acc : input;
}

// out = a @ b, or out += a @ b (accumulate), for matrices or batches of them, out in acc. Operands
// in acc run as they are (fp32 follows torch's TF32 flag); fp16 / bf16 operands (the caller rounds
// them, as the Triton kernels round theirs) run on the tensor cores with fp32 output through
// mm / bmm's out_dtype overloads (accumulated through a temporary: addmm has no mixed-dtype form).
// Those overloads refuse fp16 while torch.backends.cuda.matmul.allow_fp16_accumulation is set, so
// fp16 then runs in acc as before (that flag asks for fp16 accumulation, which this op never does).
inline void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false) {
  const at::ScalarType acc = out.scalar_type();
  const bool batched = a.dim() == 3;
  const bool fp16_refused = a.scalar_type() == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS();
  if (a.scalar_type() == acc || fp16_refused || a.size(-1) == 0 || out.numel() == 0) {  // empty: any dtype will do
    const at::Tensor aa = a.to(acc), ba = b.to(acc);
    if (accumulate) {
      batched ? out.baddbmm_(aa, ba) : out.addmm_(aa, ba);
    } else {
      batched ? at::bmm_out(out, aa, ba) : at::mm_out(out, aa, ba);
    }
  } else if (accumulate) {
    out.add_(batched ? at::bmm(a, b, acc) : at::mm(a, b, acc));
  } else {
    batched ? at::bmm_out(out, a, b, acc) : at::mm_out(out, a, b, acc);
  }
}

}  // namespace cuda_common
}  // namespace sgfused
