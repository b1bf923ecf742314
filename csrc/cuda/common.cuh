// Helpers shared by the CUDA kernels: accumulation-type math, deterministic warp
// reductions, grid-stride indexing and the host-side launch arithmetic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
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

// The fp32 GEMMs run under at::NoTF32Guard, which the default cuBLAS path honours;
// cublasLt does not, so say so once when it is preferred and TF32 is allowed.
inline void warn_if_tf32_possible(const char* op, at::ScalarType acc) {
  if (acc == at::kFloat && at::globalContext().allowTF32CuBLAS() &&
      at::globalContext().blasPreferredBackend() == at::BlasBackend::Cublaslt) {
    TORCH_WARN_ONCE(op, " (CUDA): the preferred BLAS library is cublasLt and TF32 matmuls are allowed; the fp32 "
                    "GEMMs of this operator may then run in TF32 (the default cuBLAS library computes them in fp32).");
  }
}

}  // namespace cuda_common
}  // namespace sgfused
