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

// Z = E @ W^T into acc z, with W in the input dtype. fp16 / bf16: E rounded to that dtype and
// the GEMM on the tensor cores with fp32 output (mm's out_dtype overload), as the Triton kernels
// round their operands; fp32 / fp64: E as it is (fp32 follows torch's TF32 flag). The forwards
// and the backwards' recomputation of z share it, so both see the same z.
inline void project_rows(at::Tensor& z, const at::Tensor& e, const at::Tensor& weight) {
  if (weight.scalar_type() == z.scalar_type() || e.size(1) == 0) {
    at::mm_out(z, e, weight.to(z.scalar_type()).t());
  } else {
    at::mm_out(z, e.to(weight.scalar_type()), weight.t(), z.scalar_type());
  }
}

}  // namespace cuda_common
}  // namespace sgfused
