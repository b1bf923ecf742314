// Whether bf16 inputs run their CPU GEMMs in bf16.
//
// Only a CPU with bf16 dot-product instructions (avx512_bf16 or AMX) runs a bf16 GEMM fast: there
// PyTorch's bf16 matmul is several times the fp32 rate, while without them it falls back to a scalar
// loop at about 1 GFLOP/s (measured on an avx2-only EPYC, against about 170 GFLOP/s in fp32). So the
// kernels that can run bf16 GEMMs do so only where the instructions exist, and otherwise convert
// their operands to fp32. SGFUSED_CPU_BF16_GEMM=1 (or 0) forces the bf16 (or fp32) GEMMs; the tests
// run both paths on any machine.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace sgfused {

// The CPU's bf16 dot-product instructions, "amx_bf16" or "avx512_bf16", or "" (sgfused._C exposes it).
inline const char* cpu_bf16_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("amx-bf16")) return "amx_bf16";
  if (__builtin_cpu_supports("avx512bf16")) return "avx512_bf16";
#endif
  return "";
}

inline bool bf16_gemm_on_cpu() {
  const char* force = std::getenv("SGFUSED_CPU_BF16_GEMM");
  if (force == nullptr || *force == '\0') return *cpu_bf16_dot() != '\0';
  TORCH_CHECK(std::strcmp(force, "0") == 0 || std::strcmp(force, "1") == 0,
              "SGFUSED_CPU_BF16_GEMM must be 0 or 1 (or unset), got '", force, "'");
  return force[0] == '1';
}

// Whether inputs of `dtype` run their GEMMs in bf16: bf16 inputs, where bf16_gemm_on_cpu().
inline bool bf16_gemm_for(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && bf16_gemm_on_cpu();
}

// fn(gemm_t()) with gemm_t the GEMM dtype of scalar_t inputs: bf16 when `bf16` (bf16_gemm_for), else
// the accumulation type.
template <typename scalar_t, typename Fn>
void with_gemm_type(bool bf16, Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16) return fn(at::BFloat16());
  }
  fn(at::opmath_type<scalar_t>());
}

}  // namespace sgfused
