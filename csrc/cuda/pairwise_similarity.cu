// CUDA kernels of pairwise_similarity_forward / pairwise_similarity_backward
// (docs/pairwise_similarity_contract.md has the exact math).
//
// Algorithm
// - Everything runs in the accumulation dtype acc (fp32; fp64 for fp64 input):
//   x, y, weight and bias are converted once; for "direction" the rows of x and
//   y are l2-normalised once (xhat, yhat) by a warp-per-row kernel.
// - The pairs are processed in blocks, never all at once: all-pairs mode tiles
//   the (Nx, Ny) pair grid into rectangles of ni x nj pairs (near-square unless
//   Nx or Ny is small), aligned mode takes ranges of ni pairs. Block pair p is
//   (i0 + p / nj, j0 + p % nj) (aligned: (i0 + p, i0 + p)). Per block:
//     forward : E = e rows of the block (np, d) by an elementwise kernel;
//               Z = E @ W^T (cuBLAS); one warp per pair adds the bias, takes
//               ||z||, writes out (input dtype) and norm (acc).
//     backward: E again; one warp per pair forms dZ from grad_out, out and norm
//               (z = out * r for fp32 / fp64; for fp16 / bf16, whose out was
//               rounded, z is recomputed exactly as in the forward: Z = E @ W^T
//               + bias); grad_weight += dZ^T @ E; grad_bias += sum_p dZ;
//               dE = dZ @ W; then grad_x rows (sum over the block's j) and
//               grad_y rows (sum over the block's i) of the e-gradients by a
//               reduction kernel (aligned: one pair per row, elementwise).
//     "direction" accumulates gradients w.r.t. xhat / yhat and maps them
//     through l2norm at the end (warp per row).
// - Memory: a block holds at most kBlockBytes (64 MiB) per (pairs x max(d, m))
//   acc buffer: E and Z in the forward, E, dZ, dE (and Z for fp16 / bf16) in
//   the backward, i.e. at most 2 x 64 MiB / 4 x 64 MiB beyond the inputs, their
//   acc copies and the outputs (and (Nx + Ny + m) x d acc gradient buffers).
//
// Determinism: the block plan depends only on the shapes; blocks run in a fixed
// order on one stream; every kernel writes each element from exactly one thread
// (cross-block sums such as grad_x += block part are read-modify-writes by one
// thread per element per launch, launches ordered by the stream); warp sums use
// a fixed xor butterfly and block sums a fixed-order shared-memory pass; the
// GEMMs are cuBLAS (bitwise reproducible on one GPU model / toolkit with a
// single stream) and grad_bias uses at::sum (fixed-order, no atomics). No
// floating-point atomics anywhere.
//
// Precision: the fp32 GEMMs are at::mm calls, so they follow torch's TF32
// setting as torch.matmul does: full fp32 by default, TF32 tensor-core products
// when the user allows them (torch.set_float32_matmul_precision("high") or
// torch.backends.cuda.matmul.allow_tf32). fp16 / bf16 inputs run the GEMMs on the
// tensor cores (common.cuh gemm): W as given, E and dZ rounded to the input dtype
// (as the Triton kernels round them), fp32 output; the rest is fp32. fp16 distance runs them in fp32
// (common.cuh w_gemm_dtype): its E would overflow fp16.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace sgfused {
namespace {

using at::Tensor;
using namespace cuda_common;

constexpr int kThreads = 256;  // every kernel's block size
constexpr int kWarps = kThreads / 32;
constexpr int64_t kBlockBytes = int64_t(64) << 20;  // bound of each per-block (pairs x width) buffer

// ---------------------------------------------------------------- device helpers

// The pairs of one block. All pairs: p -> (i0 + p / nj, j0 + p % nj), an ni x nj
// rectangle of the (Nx, Ny) grid; aligned: p -> (i0 + p, i0 + p).
struct PairBlock {
  int64_t i0, j0, nj, ny;
  bool aligned;
  __device__ __forceinline__ int64_t x_of(int64_t p) const { return aligned ? i0 + p : i0 + p / nj; }
  __device__ __forceinline__ int64_t y_of(int64_t p) const { return aligned ? i0 + p : j0 + p % nj; }
  // Row of the pair in out viewed as (pairs, m) and in norm viewed as (pairs,).
  __device__ __forceinline__ int64_t row_of(int64_t p) const { return aligned ? i0 + p : x_of(p) * ny + y_of(p); }
};

// ---------------------------------------------------------------- row l2norm

// vhat[r] = v[r] / (||v[r]|| + eps), one warp per row.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    l2norm_rows_kernel(const acc_t* __restrict__ v, int64_t n, int64_t d, acc_t eps, acc_t* __restrict__ vhat) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = global_thread() / 32; r < n; r += global_threads() / 32) {
    const acc_t* row = v + r * d;
    acc_t ss = 0;
    for (int64_t k = lane; k < d; k += 32) ss += row[k] * row[k];
    const acc_t denom = acc_sqrt(warp_sum(ss)) + eps;
    for (int64_t k = lane; k < d; k += 32) vhat[r * d + k] = row[k] / denom;
  }
}

// For u = v / (||v|| + eps): dv = du / r - v (v . du) / (r^2 ||v||) with r = ||v|| + eps
// (second term 0 where ||v|| == 0), one warp per row, written in the input dtype.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    l2norm_backward_rows_kernel(const acc_t* __restrict__ v, const acc_t* __restrict__ du, int64_t n, int64_t d,
                                acc_t eps, scalar_t* __restrict__ dv) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = global_thread() / 32; r < n; r += global_threads() / 32) {
    const acc_t* vr = v + r * d;
    const acc_t* ur = du + r * d;
    acc_t ss = 0, dot = 0;
    for (int64_t k = lane; k < d; k += 32) {
      ss += vr[k] * vr[k];
      dot += vr[k] * ur[k];
    }
    const acc_t norm = acc_sqrt(warp_sum(ss));
    dot = warp_sum(dot);
    const acc_t rr = norm + eps;
    const acc_t coef = norm > acc_t(0) ? dot / rr / rr / norm : acc_t(0);
    for (int64_t k = lane; k < d; k += 32) dv[r * d + k] = static_cast<scalar_t>(ur[k] / rr - vr[k] * coef);
  }
}

// ---------------------------------------------------------------- per-block kernels

// e rows of the block: (x_i - y_j)^2 ("distance", a = x, b = y) or xhat_i * yhat_j
// ("direction", a = xhat, b = yhat), elementwise over np x d.
template <typename acc_t, bool kDistance>
__global__ void __launch_bounds__(kThreads)
    build_e_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, PairBlock pb, int64_t np, int64_t d,
                   acc_t* __restrict__ e) {
  const int64_t total = np * d;
  for (int64_t t = global_thread(); t < total; t += global_threads()) {
    const int64_t p = t / d, k = t % d;
    const acc_t av = a[pb.x_of(p) * d + k], bv = b[pb.y_of(p) * d + k];
    if constexpr (kDistance) {
      const acc_t diff = av - bv;
      e[t] = diff * diff;
    } else {
      e[t] = av * bv;
    }
  }
}

// Forward epilogue, one warp per pair: z = Z[p] + bias, norm = ||z||, out = z / (norm + eps).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_epilogue_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ bias, PairBlock pb, int64_t np,
                            int64_t m, acc_t eps, scalar_t* __restrict__ out, acc_t* __restrict__ norm) {
  const int lane = threadIdx.x % 32;
  for (int64_t p = global_thread() / 32; p < np; p += global_threads() / 32) {
    const acc_t* zp = z + p * m;
    acc_t ss = 0;
    for (int64_t k = lane; k < m; k += 32) {
      const acc_t v = zp[k] + (bias != nullptr ? bias[k] : acc_t(0));
      ss += v * v;
    }
    const acc_t n = acc_sqrt(warp_sum(ss));
    const acc_t r = n + eps;
    const int64_t row = pb.row_of(p);
    scalar_t* o = out + row * m;
    for (int64_t k = lane; k < m; k += 32) {
      const acc_t v = zp[k] + (bias != nullptr ? bias[k] : acc_t(0));
      o[k] = static_cast<scalar_t>(v / r);
    }
    if (lane == 0) norm[row] = n;
  }
}

// dZ of the block, one warp per pair: dz = g / r - z (z . g) / (r^2 norm), r = norm + eps
// (second term 0 where norm == 0). z = Z[p] + bias when z_block is given (recomputed
// exactly as in the forward), else z = out * r.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dz_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out, const acc_t* __restrict__ norm,
              const acc_t* __restrict__ z_block, const acc_t* __restrict__ bias, PairBlock pb, int64_t np, int64_t m,
              acc_t eps, acc_t* __restrict__ dz) {
  const int lane = threadIdx.x % 32;
  for (int64_t p = global_thread() / 32; p < np; p += global_threads() / 32) {
    const int64_t row = pb.row_of(p);
    const acc_t n = norm[row];
    const acc_t r = n + eps;
    const scalar_t* g = grad_out + row * m;
    const scalar_t* u = out + row * m;
    const acc_t* zp = z_block != nullptr ? z_block + p * m : nullptr;
    auto z_at = [&](int64_t k) -> acc_t {
      if (zp != nullptr) return zp[k] + (bias != nullptr ? bias[k] : acc_t(0));
      return static_cast<acc_t>(u[k]) * r;
    };
    acc_t dot = 0;
    for (int64_t k = lane; k < m; k += 32) dot += z_at(k) * static_cast<acc_t>(g[k]);
    dot = warp_sum(dot);
    const acc_t coef = n > acc_t(0) ? dot / r / r / n : acc_t(0);
    for (int64_t k = lane; k < m; k += 32) dz[p * m + k] = static_cast<acc_t>(g[k]) / r - z_at(k) * coef;
  }
}

// All-pairs block: gradient of the e rows onto x rows (kXSide) or y rows.
//   x side: grad[i0 + il] += sum_{jl < nj} c(i, j) * dE[il * nj + jl]
//   y side: grad[j0 + jl] += sum_{il < ni} c(i, j) * dE[il * nj + jl]
// c = 2 (x_i - y_j) (x side) / -2 (x_i - y_j) (y side) for "distance" (a = x, b = y);
// c = yhat_j (x side) / xhat_i (y side) for "direction" (a = xhat, b = yhat).
// Thread block: 32 lanes over a 32-wide column tile of d times 8 warps that split
// the summed index (warp w takes w, w + 8, ...); the 8 partial sums are combined
// in warp order through shared memory and added by one thread per element.
template <typename acc_t, bool kDistance, bool kXSide>
__global__ void __launch_bounds__(kThreads)
    reduce_block_kernel(const acc_t* __restrict__ de, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                        int64_t i0, int64_t j0, int64_t ni, int64_t nj, int64_t d, int64_t k_tiles,
                        acc_t* __restrict__ grad) {
  __shared__ acc_t partial[kWarps][32];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t o = blockIdx.x / k_tiles;  // local index of the output row
  const int64_t k = (blockIdx.x % k_tiles) * 32 + lane;
  const int64_t len = kXSide ? nj : ni;
  acc_t sum = 0;
  if (k < d) {
    // The factor of the output row itself, fixed along the loop.
    const acc_t own = kXSide ? a[(i0 + o) * d + k] : b[(j0 + o) * d + k];
    for (int64_t t = warp; t < len; t += kWarps) {
      const int64_t il = kXSide ? o : t, jl = kXSide ? t : o;
      const acc_t g = de[(il * nj + jl) * d + k];
      if constexpr (kDistance) {
        const acc_t diff = kXSide ? own - b[(j0 + jl) * d + k] : a[(i0 + il) * d + k] - own;  // x_i - y_j
        sum += acc_t(2) * diff * g;
      } else {
        sum += g * (kXSide ? b[(j0 + jl) * d + k] : a[(i0 + il) * d + k]);
      }
    }
  }
  partial[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && k < d) {
    acc_t total = partial[0][lane];
    for (int w = 1; w < kWarps; ++w) total += partial[w][lane];
    acc_t* target = grad + (kXSide ? i0 + o : j0 + o) * d + k;
    if constexpr (kDistance && !kXSide) {
      *target -= total;
    } else {
      *target += total;
    }
  }
}

// Aligned block: pair p touches only x row and y row i0 + p, so its e-gradient is
// written straight to them (each row belongs to exactly one block).
template <typename acc_t, bool kDistance>
__global__ void __launch_bounds__(kThreads)
    aligned_grad_kernel(const acc_t* __restrict__ de, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                        int64_t i0, int64_t np, int64_t d, acc_t* __restrict__ grad_a, acc_t* __restrict__ grad_b) {
  const int64_t total = np * d;
  for (int64_t t = global_thread(); t < total; t += global_threads()) {
    const int64_t idx = i0 * d + t;  // row i0 + t / d, column t % d
    const acc_t g = de[t];
    if constexpr (kDistance) {
      const acc_t term = acc_t(2) * (a[idx] - b[idx]) * g;
      grad_a[idx] = term;
      grad_b[idx] = -term;
    } else {
      grad_a[idx] = g * b[idx];
      grad_b[idx] = g * a[idx];
    }
  }
}

// ---------------------------------------------------------------- host side

// Pair blocks: all pairs in rectangles of ni x nj, aligned in ranges of ni; each
// (pairs x max(d, m)) acc buffer of a block stays within kBlockBytes.
struct BlockPlan {
  int64_t ni, nj;
};

BlockPlan plan_blocks(int64_t nx, int64_t ny, int64_t d, int64_t m, bool aligned, int64_t acc_bytes) {
  const int64_t width = std::max<int64_t>({d, m, 1});
  const int64_t pair_budget = std::max<int64_t>(1, kBlockBytes / acc_bytes / width);
  if (aligned) return {std::max<int64_t>(1, std::min(nx, pair_budget)), 1};
  int64_t side = static_cast<int64_t>(std::sqrt(static_cast<double>(pair_budget)));
  while (side > 1 && side * side > pair_budget) --side;
  side = std::max<int64_t>(side, 1);
  int64_t nj = std::max<int64_t>(1, std::min(ny, side));
  const int64_t ni = std::max<int64_t>(1, std::min(nx, pair_budget / nj));
  nj = std::max<int64_t>(1, std::min(ny, pair_budget / ni));  // widen when Nx is small
  return {ni, nj};
}

// Calls fn(PairBlock, ni, nj, np) for every block, in a fixed order (i blocks
// outer, j blocks inner).
template <typename Fn>
void for_each_block(const BlockPlan& plan, int64_t nx, int64_t ny, bool aligned, Fn&& fn) {
  for (int64_t i0 = 0; i0 < nx; i0 += plan.ni) {
    const int64_t ni = std::min(plan.ni, nx - i0);
    if (aligned) {
      fn(PairBlock{i0, i0, ni, ny, true}, ni, ni, ni);
      continue;
    }
    for (int64_t j0 = 0; j0 < ny; j0 += plan.nj) {
      const int64_t nj = std::min(plan.nj, ny - j0);
      fn(PairBlock{i0, j0, nj, ny, false}, ni, nj, ni * nj);
    }
  }
}

bool parse_mode(std::string_view mode) {
  TORCH_CHECK(mode == "distance" || mode == "direction",
              "pairwise_similarity (CUDA): mode must be \"distance\" or \"direction\", got \"", mode, "\"");
  return mode == "distance";
}

void check_on_device(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "pairwise_similarity (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "pairwise_similarity (CUDA): ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

bool has_bias(const std::optional<Tensor>& bias) {
  return bias.has_value() && bias->defined();
}

void check_inputs(const Tensor& x, const Tensor& y, const Tensor& weight, const std::optional<Tensor>& bias,
                  bool aligned) {
  TORCH_CHECK(x.is_cuda(), "pairwise_similarity (CUDA): x must be a CUDA tensor, got ", x.device());
  check_on_device(y, "y", x);
  check_on_device(weight, "weight", x);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat ||
                  x.scalar_type() == at::kDouble,
              "pairwise_similarity (CUDA): x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "pairwise_similarity (CUDA): x, y and weight must share a dtype, got ", x.scalar_type(), ", ",
              y.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && weight.dim() == 2,
              "pairwise_similarity (CUDA): x (Nx, d), y (Ny, d) and weight (m, d) must be 2-D, got ", x.sizes(), ", ",
              y.sizes(), " and ", weight.sizes());
  TORCH_CHECK(y.size(1) == x.size(1) && weight.size(1) == x.size(1),
              "pairwise_similarity (CUDA): x, y and weight must share d, got ", x.sizes(), ", ", y.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(!aligned || x.size(0) == y.size(0), "pairwise_similarity (CUDA): aligned pairs need Nx == Ny, got ",
              x.size(0), " and ", y.size(0));
  if (has_bias(bias)) {
    check_on_device(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "pairwise_similarity (CUDA): bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "pairwise_similarity (CUDA): bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
  }
}

std::vector<int64_t> out_shape(int64_t nx, int64_t ny, int64_t m, bool aligned) {
  return aligned ? std::vector<int64_t>{nx, m} : std::vector<int64_t>{nx, ny, m};
}

std::vector<int64_t> norm_shape(int64_t nx, int64_t ny, bool aligned) {
  return aligned ? std::vector<int64_t>{nx} : std::vector<int64_t>{nx, ny};
}

// Rows of v (acc) l2-normalised.
template <typename acc_t>
Tensor l2norm_rows(const Tensor& v, acc_t eps, cudaStream_t stream) {
  Tensor vhat = at::empty_like(v);
  const int64_t n = v.size(0), d = v.size(1);
  if (n == 0 || d == 0) return vhat;
  l2norm_rows_kernel<acc_t><<<grid_stride_blocks(n, kWarps), kThreads, 0, stream>>>(v.data_ptr<acc_t>(), n, d, eps,
                                                                                  vhat.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return vhat;
}

template <typename acc_t>
void build_e(bool distance, const Tensor& a, const Tensor& b, const PairBlock& pb, int64_t np, int64_t d,
             const Tensor& e, cudaStream_t stream) {
  if (np * d == 0) return;
  const unsigned int blocks = grid_stride_blocks(np * d, kThreads);
  if (distance) {
    build_e_kernel<acc_t, true><<<blocks, kThreads, 0, stream>>>(a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), pb, np, d,
                                                                e.data_ptr<acc_t>());
  } else {
    build_e_kernel<acc_t, false><<<blocks, kThreads, 0, stream>>>(a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), pb, np,
                                                                 d, e.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, bool kDistance, bool kXSide>
void launch_reduce(const Tensor& de, const Tensor& a, const Tensor& b, const PairBlock& pb, int64_t ni, int64_t nj,
                   int64_t d, const Tensor& grad, cudaStream_t stream) {
  const int64_t k_tiles = ceil_div(d, 32);
  const int64_t blocks = (kXSide ? ni : nj) * k_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "pairwise_similarity (CUDA): block too large (", blocks,
              " thread blocks)");
  reduce_block_kernel<acc_t, kDistance, kXSide><<<static_cast<unsigned int>(blocks), dim3(32, kWarps), 0, stream>>>(
      de.data_ptr<acc_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), pb.i0, pb.j0, ni, nj, d, k_tiles,
      grad.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// e-gradients of one block onto grad_a (x or xhat rows) and grad_b (y or yhat rows).
template <typename acc_t>
void scatter_e_grad(bool distance, const Tensor& de, const Tensor& a, const Tensor& b, const PairBlock& pb,
                    int64_t ni, int64_t nj, int64_t np, int64_t d, const Tensor& grad_a, const Tensor& grad_b,
                    cudaStream_t stream) {
  if (np * d == 0) return;
  if (pb.aligned) {
    const unsigned int blocks = grid_stride_blocks(np * d, kThreads);
    if (distance) {
      aligned_grad_kernel<acc_t, true><<<blocks, kThreads, 0, stream>>>(
          de.data_ptr<acc_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), pb.i0, np, d, grad_a.data_ptr<acc_t>(),
          grad_b.data_ptr<acc_t>());
    } else {
      aligned_grad_kernel<acc_t, false><<<blocks, kThreads, 0, stream>>>(
          de.data_ptr<acc_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), pb.i0, np, d, grad_a.data_ptr<acc_t>(),
          grad_b.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (distance) {
    launch_reduce<acc_t, true, true>(de, a, b, pb, ni, nj, d, grad_a, stream);
    launch_reduce<acc_t, true, false>(de, a, b, pb, ni, nj, d, grad_b, stream);
  } else {
    launch_reduce<acc_t, false, true>(de, a, b, pb, ni, nj, d, grad_a, stream);
    launch_reduce<acc_t, false, false>(de, a, b, pb, ni, nj, d, grad_b, stream);
  }
}

template <typename scalar_t>
void forward_impl(const Tensor& x, const Tensor& y, const Tensor& weight, const std::optional<Tensor>& bias,
                  bool distance, double eps_in, bool aligned, Tensor& out, Tensor& norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nx = x.size(0), ny = y.size(0), d = x.size(1), m = weight.size(0);
  const int64_t pairs = aligned ? nx : nx * ny;
  const acc_t eps = static_cast<acc_t>(eps_in);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (pairs == 0) return;
  if (m == 0) {
    norm.zero_();
    return;
  }

  const Tensor xa = x.to(acc).contiguous(), ya = y.to(acc).contiguous();
  const Tensor ba = has_bias(bias) ? bias->to(acc).contiguous() : Tensor();
  const Tensor a = distance ? xa : l2norm_rows<acc_t>(xa, eps, stream);
  const Tensor b = distance ? ya : l2norm_rows<acc_t>(ya, eps, stream);

  const BlockPlan plan = plan_blocks(nx, ny, d, m, aligned, sizeof(acc_t));
  const int64_t max_np = aligned ? plan.ni : plan.ni * plan.nj;
  const Tensor e = at::empty({max_np, d}, xa.options());
  const Tensor z = at::empty({max_np, m}, xa.options());
  const Tensor wg = weight.to(w_gemm_dtype(weight.scalar_type(), distance, acc));
  const acc_t* bias_ptr = ba.defined() ? ba.data_ptr<acc_t>() : nullptr;

  for_each_block(plan, nx, ny, aligned, [&](const PairBlock& pb, int64_t, int64_t, int64_t np) {
    Tensor e_block = e.narrow(0, 0, np), z_block = z.narrow(0, 0, np);
    build_e<acc_t>(distance, a, b, pb, np, d, e_block, stream);
    gemm(z_block, e_block.to(wg.scalar_type()), wg.t());  // fp16 / bf16: E rounded; d == 0 gives zeros
    forward_epilogue_kernel<scalar_t, acc_t><<<grid_stride_blocks(np, kWarps), kThreads, 0, stream>>>(
        z_block.data_ptr<acc_t>(), bias_ptr, pb, np, m, eps, out.data_ptr<scalar_t>(), norm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor> pairwise_similarity_forward_cuda(const Tensor& x_in, const Tensor& y_in,
                                                            const Tensor& weight_in,
                                                            const std::optional<Tensor>& bias_in,
                                                            c10::string_view mode, double eps, bool aligned) {
  const bool distance = parse_mode(mode);
  check_inputs(x_in, y_in, weight_in, bias_in, aligned);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), weight = weight_in.contiguous();
  const int64_t nx = x.size(0), ny = y.size(0), m = weight.size(0);
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  Tensor out = at::empty(out_shape(nx, ny, m, aligned), x.options());
  Tensor norm = at::empty(norm_shape(nx, ny, aligned), x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pairwise_similarity_forward_cuda",
                                  [&] { forward_impl<scalar_t>(x, y, weight, bias_in, distance, eps, aligned, out, norm); });
  return {out, norm};
}

template <typename scalar_t>
void backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& y, const Tensor& weight,
                   const std::optional<Tensor>& bias, const Tensor& out, const Tensor& norm, bool distance,
                   double eps_in, bool aligned, Tensor& grad_x, Tensor& grad_y, Tensor& grad_weight,
                   Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  // fp16 / bf16 out was rounded: recompute z rather than recover it as out * r.
  constexpr bool kRecomputeZ = !std::is_same_v<scalar_t, acc_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nx = x.size(0), ny = y.size(0), d = x.size(1), m = weight.size(0);
  const int64_t pairs = aligned ? nx : nx * ny;
  const acc_t eps = static_cast<acc_t>(eps_in);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = x.options().dtype(acc);

  const Tensor xa = x.to(acc).contiguous(), ya = y.to(acc).contiguous();
  const Tensor ba = has_bias(bias) ? bias->to(acc).contiguous() : Tensor();
  // Gradients w.r.t. a, b: x, y ("distance") or xhat, yhat ("direction").
  Tensor grad_a = at::zeros({nx, d}, acc_options), grad_b = at::zeros({ny, d}, acc_options);
  Tensor grad_w = at::zeros({m, d}, acc_options);
  Tensor grad_bias_acc = at::zeros({m}, acc_options);

  if (pairs > 0 && m > 0) {
    const Tensor a = distance ? xa : l2norm_rows<acc_t>(xa, eps, stream);
    const Tensor b = distance ? ya : l2norm_rows<acc_t>(ya, eps, stream);
    const BlockPlan plan = plan_blocks(nx, ny, d, m, aligned, sizeof(acc_t));
    const int64_t max_np = aligned ? plan.ni : plan.ni * plan.nj;
    const Tensor e = at::empty({max_np, d}, acc_options);
    const Tensor de = at::empty({max_np, d}, acc_options);
    const Tensor dz = at::empty({max_np, m}, acc_options);
    const Tensor z = kRecomputeZ ? at::empty({max_np, m}, acc_options) : Tensor();
    const Tensor wg = weight.to(w_gemm_dtype(weight.scalar_type(), distance, acc));  // as in the forward
    const acc_t* bias_ptr = ba.defined() ? ba.data_ptr<acc_t>() : nullptr;

    for_each_block(plan, nx, ny, aligned, [&](const PairBlock& pb, int64_t ni, int64_t nj, int64_t np) {
      Tensor e_block = e.narrow(0, 0, np), dz_block = dz.narrow(0, 0, np), de_block = de.narrow(0, 0, np);
      build_e<acc_t>(distance, a, b, pb, np, d, e_block, stream);
      const Tensor e_gemm = e_block.to(wg.scalar_type());  // fp16 / bf16: E rounded, as in the forward
      const acc_t* z_ptr = nullptr;
      if constexpr (kRecomputeZ) {
        Tensor z_block = z.narrow(0, 0, np);
        gemm(z_block, e_gemm, wg.t());  // the forward's GEMM, same shapes and operands: the same z
        z_ptr = z_block.data_ptr<acc_t>();
      }
      dz_kernel<scalar_t, acc_t><<<grid_stride_blocks(np, kWarps), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norm.data_ptr<acc_t>(), z_ptr, bias_ptr, pb, np, m,
          eps, dz_block.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (ba.defined()) grad_bias_acc.add_(dz_block.sum(0));
      if (d == 0) return;
      const Tensor dz_gemm = dz_block.to(wg.scalar_type());  // fp16 / bf16: dZ rounded
      gemm(grad_w, dz_gemm.t(), e_gemm, true);               // (m, np) @ (np, d)
      gemm(de_block, dz_gemm, wg);                           // (np, m) @ (m, d)
      scatter_e_grad<acc_t>(distance, de_block, a, b, pb, ni, nj, np, d, grad_a, grad_b, stream);
    });
  }

  if (distance || nx == 0 || d == 0) {
    grad_x = grad_a.to(x.scalar_type());
  } else {
    grad_x = at::empty({nx, d}, x.options());
    l2norm_backward_rows_kernel<scalar_t, acc_t><<<grid_stride_blocks(nx, kWarps), kThreads, 0, stream>>>(
        xa.data_ptr<acc_t>(), grad_a.data_ptr<acc_t>(), nx, d, eps, grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (distance || ny == 0 || d == 0) {
    grad_y = grad_b.to(y.scalar_type());
  } else {
    grad_y = at::empty({ny, d}, y.options());
    l2norm_backward_rows_kernel<scalar_t, acc_t><<<grid_stride_blocks(ny, kWarps), kThreads, 0, stream>>>(
        ya.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(), ny, d, eps, grad_y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  grad_weight = grad_w.to(weight.scalar_type());
  grad_bias = ba.defined() ? grad_bias_acc.to(x.scalar_type()) : at::empty({0}, x.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pairwise_similarity_backward_cuda(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& y_in, const Tensor& weight_in,
    const std::optional<Tensor>& bias_in, const Tensor& out_in, const Tensor& norm_in, c10::string_view mode,
    double eps, bool aligned) {
  const bool distance = parse_mode(mode);
  check_inputs(x_in, y_in, weight_in, bias_in, aligned);
  const int64_t nx = x_in.size(0), ny = y_in.size(0), m = weight_in.size(0);
  const std::vector<int64_t> o_shape = out_shape(nx, ny, m, aligned), n_shape = norm_shape(nx, ny, aligned);
  check_on_device(grad_out_in, "grad_out", x_in);
  check_on_device(out_in, "out", x_in);
  check_on_device(norm_in, "norm", x_in);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(o_shape), "pairwise_similarity (CUDA): grad_out must have shape ",
              at::IntArrayRef(o_shape), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(o_shape), "pairwise_similarity (CUDA): out must have shape ",
              at::IntArrayRef(o_shape), ", got ", out_in.sizes());
  TORCH_CHECK(norm_in.sizes() == at::IntArrayRef(n_shape), "pairwise_similarity (CUDA): norm must have shape ",
              at::IntArrayRef(n_shape), ", got ", norm_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out_in.scalar_type()) && at::isFloatingType(out_in.scalar_type()) &&
                  at::isFloatingType(norm_in.scalar_type()),
              "pairwise_similarity (CUDA): grad_out, out and norm must be floating point");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType dtype = x_in.scalar_type(), acc = accumulation_type(dtype);
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), weight = weight_in.contiguous();
  // Read in the input dtype (autograd hands grad_out in out's dtype) and norm in acc.
  const Tensor grad_out = grad_out_in.to(dtype).contiguous(), out = out_in.to(dtype).contiguous();
  const Tensor norm = norm_in.to(acc).contiguous();
  Tensor grad_x, grad_y, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pairwise_similarity_backward_cuda", [&] {
    backward_impl<scalar_t>(grad_out, x, y, weight, bias_in, out, norm, distance, eps, aligned, grad_x, grad_y,
                            grad_weight, grad_bias);
  });
  return {grad_x, grad_y, grad_weight, grad_bias};
}

}  // namespace
}  // namespace sgfused

TORCH_LIBRARY_IMPL(sgfused, CUDA, m) {
  m.impl("pairwise_similarity_forward", &sgfused::pairwise_similarity_forward_cuda);
  m.impl("pairwise_similarity_backward", &sgfused::pairwise_similarity_backward_cuda);
}
