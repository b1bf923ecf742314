// CUDA kernels of max_sim_forward / max_sim_backward (docs/max_sim_contract.md, SGM Eq. 6-7):
//   S[a, b] = (1 / y_lens[b]) * sum_{t < y_lens[b]} max_{o < x_lens[a]} <y[b, t], x[a, o]>.
//
// Forward: one block per (image a, caption block). A caption block is `caps` whole
// captions, i.e. the caps * Ly consecutive rows of y seen as a (Ny * Ly, d) matrix
// (caps = kRows / Ly, at least 1), taken kRows rows at a time. For each tile of
// kNodes image nodes the block computes the (rows x nodes) dot products over d in
// chunks of kChunk staged in shared memory - on the tensor cores (WMMA 16x16x16,
// fp32 accumulation) for fp16 / bf16 on sm_80 and later, by fp32 (fp64) FMA
// otherwise - then one thread per row scans its row in ascending node order with a
// strict comparison (running max / argmax over the tiles: lowest index on ties).
// One thread per caption sums its rows' maxima in node order. Padded caption and
// image nodes are never read (their staged values are 0) and padded image nodes
// are never scanned, so whatever they hold cannot leak. The (Nx, Ny, Ly, Lx)
// table never exists: per block, a (kRows x kNodes) tile in shared memory.
//
// Backward (the subgradient at the argmax the forward returned), w = grad / y_lens:
//   grad_y[b, t] = sum_a w[a, b] x[a, indices[a, b, t]]                  - one block per caption b,
//   grad_x[a, o] = sum_b sum_t w[a, b] [indices[a, b, t] == o] y[b, t]  - one block per image a
//                                                                        and tile of kNodeTile nodes,
// one thread per embedding column, each sum in a fixed order: no atomics, deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../input_checks.h"
#include "common.cuh"

namespace sgfused {
namespace {

using at::Tensor;
using cuda_common::ceil_div;

constexpr int kThreads = 256;                  // forward block size (8 warps)
constexpr int kRows = 64;                      // caption-node rows of a score tile
constexpr int kNodes = 64;                     // image nodes of a score tile
constexpr int kChunk = 32;                     // embedding columns staged per step
constexpr int kStageLd = kChunk + 8;           // staged row stride: a multiple of 8 elements (WMMA ldm)
constexpr int kScoreLd = kNodes + 4;           // score tile row stride: a multiple of 4 floats (WMMA ldm)
constexpr int kBackwardThreads = 128;          // backward: embedding columns per block
constexpr int kNodeTile = 32;                  // grad_x: image nodes per block
constexpr int kWmma = 16;                      // WMMA tile edge
constexpr int kFmaSpan = kThreads / 16;        // FMA path: a thread owns rows tr + 16 i, nodes tc + 16 j
constexpr int kFmaPerThread = kRows / kFmaSpan;  // 4 x 4 outputs per thread

static_assert(kRows == kNodes && kRows * kNodes == kThreads * kFmaPerThread * kFmaPerThread, "FMA tiling");
static_assert((kRows / kWmma) * (kNodes / kWmma) == 2 * (kThreads / 32), "two WMMA tiles per warp");

// The CUDA type WMMA takes for a tensor-core dtype.
template <typename scalar_t>
struct MmaType {
  using type = void;
};
template <>
struct MmaType<at::Half> {
  using type = __half;
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// fp16 / bf16 products on the tensor cores where the device code has them (bf16 WMMA needs sm_80).
template <typename scalar_t>
__device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return !std::is_void_v<typename MmaType<scalar_t>::type>;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- forward

// Per block, shared: the staged chunks of y rows and x nodes, then (aliasing them) the score tile.
template <typename acc_t>
struct ForwardShared {
  static constexpr size_t kStageBytes = 2 * kRows * kStageLd * sizeof(acc_t);  // upper bound of both paths
  static constexpr size_t kScoreBytes = kRows * kScoreLd * sizeof(acc_t);
  alignas(128) unsigned char tiles[kStageBytes > kScoreBytes ? kStageBytes : kScoreBytes];
  acc_t row_best[kRows];
  int64_t row_arg[kRows];
  acc_t cap_total[kRows];  // caps <= kRows
  bool row_ok[kRows];
};

// v as the staging type (fp16 / bf16 through their intrinsics: torch builds without implicit conversions).
template <typename stage_t, typename acc_t>
__device__ __forceinline__ stage_t to_stage(acc_t v) {
  if constexpr (std::is_same_v<stage_t, __half>) {
    return __float2half(static_cast<float>(v));
  } else if constexpr (std::is_same_v<stage_t, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(v));
  } else {
    return static_cast<stage_t>(v);
  }
}

// Stages y rows [r0, r0 + kRows) and x nodes [o0, o0 + kNodes) of columns [k0, k0 + kChunk) as stage_t,
// zero outside the valid rows (row_ok), the valid nodes (< len_x) and d.
template <typename stage_t, typename scalar_t>
__device__ __forceinline__ void stage_chunk(const scalar_t* __restrict__ y, const scalar_t* __restrict__ xa,
                                            const bool* row_ok, int64_t r0, int64_t o0, int64_t len_x, int64_t d,
                                            int64_t k0, stage_t* ys, stage_t* xs) {
  for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
    const int r = e / kChunk, k = e % kChunk;
    const bool in_d = k0 + k < d;
    const bool y_ok = in_d && row_ok[r];
    const bool x_ok = in_d && o0 + r < len_x;
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t yv = y_ok ? static_cast<acc_t>(y[(r0 + r) * d + k0 + k]) : acc_t(0);
    const acc_t xv = x_ok ? static_cast<acc_t>(xa[(o0 + r) * d + k0 + k]) : acc_t(0);
    ys[r * kStageLd + k] = to_stage<stage_t>(yv);
    xs[r * kStageLd + k] = to_stage<stage_t>(xv);
  }
}

// scores[r][o] = <y row r0 + r, x node o0 + o> in acc_t by FMA, written to the shared score tile.
template <typename scalar_t, typename acc_t>
__device__ void score_tile_fma(const scalar_t* __restrict__ y, const scalar_t* __restrict__ xa,
                               ForwardShared<acc_t>& sh, int64_t r0, int64_t o0, int64_t len_x, int64_t d) {
  acc_t* ys = reinterpret_cast<acc_t*>(sh.tiles);
  acc_t* xs = ys + kRows * kStageLd;
  const int tr = threadIdx.x / kFmaSpan, tc = threadIdx.x % kFmaSpan;
  acc_t acc[kFmaPerThread][kFmaPerThread] = {};
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    stage_chunk(y, xa, sh.row_ok, r0, o0, len_x, d, k0, ys, xs);
    __syncthreads();
    for (int k = 0; k < kChunk; ++k) {
      acc_t yv[kFmaPerThread], xv[kFmaPerThread];
      for (int i = 0; i < kFmaPerThread; ++i) {
        yv[i] = ys[(tr + kFmaSpan * i) * kStageLd + k];
        xv[i] = xs[(tc + kFmaSpan * i) * kStageLd + k];
      }
      for (int i = 0; i < kFmaPerThread; ++i)
        for (int j = 0; j < kFmaPerThread; ++j) acc[i][j] += yv[i] * xv[j];
    }
    __syncthreads();
  }
  acc_t* scores = reinterpret_cast<acc_t*>(sh.tiles);
  for (int i = 0; i < kFmaPerThread; ++i)
    for (int j = 0; j < kFmaPerThread; ++j) scores[(tr + kFmaSpan * i) * kScoreLd + tc + kFmaSpan * j] = acc[i][j];
}

// The same tile on the tensor cores: warp w owns row band w / 2 and node bands 2 (w % 2) + {0, 1}.
template <typename scalar_t>
__device__ void score_tile_mma(const scalar_t* __restrict__ y, const scalar_t* __restrict__ xa,
                               ForwardShared<float>& sh, int64_t r0, int64_t o0, int64_t len_x, int64_t d) {
  using namespace nvcuda;
  using mma_t = typename MmaType<scalar_t>::type;
  mma_t* ys = reinterpret_cast<mma_t*>(sh.tiles);
  mma_t* xs = ys + kRows * kStageLd;
  const int warp = threadIdx.x / 32, band = warp / 2, node_band = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, kWmma, kWmma, kWmma, float> acc[2];
  for (auto& f : acc) wmma::fill_fragment(f, 0.0f);
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    stage_chunk(y, xa, sh.row_ok, r0, o0, len_x, d, k0, ys, xs);
    __syncthreads();
    for (int kk = 0; kk < kChunk; kk += kWmma) {
      wmma::fragment<wmma::matrix_a, kWmma, kWmma, kWmma, mma_t, wmma::row_major> yf;
      wmma::load_matrix_sync(yf, ys + band * kWmma * kStageLd + kk, kStageLd);
      for (int j = 0; j < 2; ++j) {
        // x staged as (node, k) rows is x^T in column-major order
        wmma::fragment<wmma::matrix_b, kWmma, kWmma, kWmma, mma_t, wmma::col_major> xf;
        wmma::load_matrix_sync(xf, xs + (node_band + j) * kWmma * kStageLd + kk, kStageLd);
        wmma::mma_sync(acc[j], yf, xf, acc[j]);
      }
    }
    __syncthreads();
  }
  float* scores = reinterpret_cast<float*>(sh.tiles);
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(scores + band * kWmma * kScoreLd + (node_band + j) * kWmma, acc[j], kScoreLd,
                            wmma::mem_row_major);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                   const int64_t* __restrict__ x_lens, const int64_t* __restrict__ y_lens, int64_t lx, int64_t ny,
                   int64_t ly, int64_t d, int64_t caps, int64_t n_cap_blocks, at::opmath_type<scalar_t>* scores,
                   int64_t* indices) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ ForwardShared<acc_t> sh;
  const int tid = threadIdx.x;
  const int64_t a = blockIdx.x / n_cap_blocks;
  const int64_t b0 = (blockIdx.x % n_cap_blocks) * caps, b1 = std::min(b0 + caps, ny);
  const int64_t row_end = b1 * ly, len_x = x_lens[a];
  const scalar_t* xa = x + a * lx * d;
  if (tid < kRows) sh.cap_total[tid] = acc_t(0);
  for (int64_t r0 = b0 * ly; r0 < row_end; r0 += kRows) {
    if (tid < kRows) {
      const int64_t g = r0 + tid;
      sh.row_ok[tid] = g < row_end && g % ly < y_lens[g / ly];
      sh.row_best[tid] = -std::numeric_limits<acc_t>::infinity();
      sh.row_arg[tid] = 0;  // len_x >= 1: node 0 is valid
    }
    __syncthreads();
    for (int64_t o0 = 0; o0 < len_x; o0 += kNodes) {
      if constexpr (use_tensor_cores<scalar_t>()) {
        score_tile_mma(y, xa, sh, r0, o0, len_x, d);
      } else {
        score_tile_fma(y, xa, sh, r0, o0, len_x, d);
      }
      __syncthreads();
      if (tid < kRows) {
        const acc_t* row = reinterpret_cast<const acc_t*>(sh.tiles) + tid * kScoreLd;
        acc_t best = sh.row_best[tid];
        int64_t arg = sh.row_arg[tid];
        const int64_t count = std::min<int64_t>(kNodes, len_x - o0);
        for (int64_t j = 0; j < count; ++j)
          if (row[j] > best) {  // strict: the lowest node keeps a tie
            best = row[j];
            arg = o0 + j;
          }
        sh.row_best[tid] = best;
        sh.row_arg[tid] = arg;
      }
      __syncthreads();  // the next tile overwrites the scores
    }
    const int64_t rows = std::min<int64_t>(kRows, row_end - r0);
    if (indices != nullptr && tid < rows) {
      const int64_t g = r0 + tid, b = g / ly, t = g % ly;
      indices[(a * ny + b) * ly + t] = sh.row_ok[tid] ? sh.row_arg[tid] : -1;
    }
    // one thread per caption with rows in this tile, its rows in order
    const int64_t first = r0 / ly, last = (r0 + rows - 1) / ly;
    if (tid <= last - first) {
      const int64_t b = first + tid;
      const int64_t lo = std::max(b * ly, r0), hi = std::min((b + 1) * ly, r0 + rows);
      acc_t total = sh.cap_total[b - b0];
      for (int64_t g = lo; g < hi; ++g)
        if (sh.row_ok[g - r0]) total += sh.row_best[g - r0];
      sh.cap_total[b - b0] = total;
    }
    __syncthreads();
  }
  if (tid < b1 - b0) scores[a * ny + b0 + tid] = sh.cap_total[tid] / static_cast<acc_t>(y_lens[b0 + tid]);
}

// ---------------------------------------------------------------- backward

// grad_y[b, t, k] for the block's column k: images in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kBackwardThreads)
    grad_y_kernel(const at::opmath_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ x,
                  const int64_t* __restrict__ y_lens, const int64_t* __restrict__ indices, int64_t nx, int64_t lx,
                  int64_t ny, int64_t ly, int64_t d, scalar_t* __restrict__ grad_y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x, k = blockIdx.y * static_cast<int64_t>(kBackwardThreads) + threadIdx.x;
  if (k >= d) return;
  const int64_t len_y = y_lens[b];
  for (int64_t t = 0; t < ly; ++t) {
    acc_t total = 0;
    if (t < len_y) {
      for (int64_t a = 0; a < nx; ++a) {
        const acc_t w = grad[a * ny + b] / static_cast<acc_t>(len_y);
        const int64_t o = indices[(a * ny + b) * ly + t];
        total += w * static_cast<acc_t>(x[(a * lx + o) * d + k]);
      }
    }
    grad_y[(b * ly + t) * d + k] = static_cast<scalar_t>(total);
  }
}

// grad_x[a, o0 + j, k] for j < kNodeTile and the block's column k: caption nodes in order. Each thread
// accumulates its own column of the shared tile, so no synchronisation is needed.
template <typename scalar_t>
__global__ void __launch_bounds__(kBackwardThreads)
    grad_x_kernel(const at::opmath_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ y,
                  const int64_t* __restrict__ y_lens, const int64_t* __restrict__ indices, int64_t lx, int64_t ny,
                  int64_t ly, int64_t d, int64_t n_node_tiles, scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile[kNodeTile][kBackwardThreads];
  const int64_t a = blockIdx.x / n_node_tiles, o0 = (blockIdx.x % n_node_tiles) * kNodeTile;
  const int col = threadIdx.x;
  const int64_t k = blockIdx.y * static_cast<int64_t>(kBackwardThreads) + col;
  if (k >= d) return;
  for (int j = 0; j < kNodeTile; ++j) tile[j][col] = acc_t(0);
  for (int64_t b = 0; b < ny; ++b) {
    const int64_t len_y = y_lens[b];
    const acc_t w = grad[a * ny + b] / static_cast<acc_t>(len_y);
    const int64_t* index = indices + (a * ny + b) * ly;
    for (int64_t t = 0; t < len_y; ++t) {
      const int64_t j = index[t] - o0;
      if (j >= 0 && j < kNodeTile) tile[j][col] += w * static_cast<acc_t>(y[(b * ly + t) * d + k]);
    }
  }
  for (int j = 0; j < kNodeTile && o0 + j < lx; ++j)
    grad_x[(a * lx + o0 + j) * d + k] = static_cast<scalar_t>(tile[j][col]);
}

// ---------------------------------------------------------------- host

// The shared length checks (csrc/input_checks.h), on the device of x.
void check_lengths_on_device(const Tensor& lens, const char* name, int64_t count, int64_t padded, const Tensor& x) {
  TORCH_CHECK(lens.device() == x.device(), "max_sim (CUDA): ", name, " must be on ", x.device(), ", got ",
              lens.device());
  check_lengths(lens, count, padded, name);
}

// Shapes, dtypes, devices and lengths the kernels rely on.
void check_inputs(const Tensor& x, const Tensor& y, const Tensor& x_lens, const Tensor& y_lens) {
  TORCH_CHECK(x.dim() == 3, "max_sim (CUDA): x must be (Nx, Lx, d), got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 3, "max_sim (CUDA): y must be (Ny, Ly, d), got shape ", y.sizes());
  TORCH_CHECK(x.is_cuda(), "max_sim (CUDA): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(y.device() == x.device(), "max_sim (CUDA): y must be on ", x.device(), ", got ", y.device());
  TORCH_CHECK(y.size(2) == x.size(2), "max_sim (CUDA): y must have d = ", x.size(2),
              " (the feature size of x), got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "max_sim (CUDA): y must have the dtype of x (", x.scalar_type(),
              "), got ", y.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && y.size(1) >= 1, "max_sim (CUDA): x and y need at least one node per set, got shapes ",
              x.sizes(), " and ", y.sizes());
  check_lengths_on_device(x_lens, "x_lens", x.size(0), x.size(1), x);
  check_lengths_on_device(y_lens, "y_lens", y.size(0), y.size(1), x);
}

// Every valid caption node's index must name a valid image node (the backward gathers through it).
void check_indices(const Tensor& indices, const Tensor& x_lens, const Tensor& y_lens, int64_t nx, int64_t ny,
                   int64_t ly, const Tensor& x) {
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 3 && indices.size(0) == nx &&
                  indices.size(1) == ny && indices.size(2) == ly,
              "max_sim_backward (CUDA): indices must be int64 of shape (", nx, ", ", ny, ", ", ly,
              ") (call max_sim_forward with with_indices=True), got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(indices.device() == x.device(), "max_sim_backward (CUDA): indices must be on ", x.device(), ", got ",
              indices.device());
  const Tensor valid_node = at::arange(ly, y_lens.options()).unsqueeze(0) < y_lens.unsqueeze(1);  // (Ny, Ly)
  const Tensor bad = valid_node.unsqueeze(0) & ((indices < 0) | (indices >= x_lens.view({nx, 1, 1})));
  TORCH_CHECK(!bad.any().item<bool>(), "max_sim_backward (CUDA): indices must name a valid image node (0 <= index < ",
              "x_lens) at every valid caption node; pass the indices max_sim_forward returned");
}

unsigned int grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT_MAX, "max_sim (CUDA): ", what, " needs ", blocks, " blocks, more than a grid holds");
  return static_cast<unsigned int>(blocks);
}

std::tuple<Tensor, Tensor> max_sim_forward_cuda(const Tensor& x_in, const Tensor& y_in, const Tensor& x_lens_in,
                                                const Tensor& y_lens_in, bool with_indices) {
  check_inputs(x_in, y_in, x_lens_in, y_lens_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor x_lens = x_lens_in.contiguous(), y_lens = y_lens_in.contiguous();
  const int64_t nx = x.size(0), lx = x.size(1), ny = y.size(0), ly = y.size(1), d = x.size(2);
  Tensor scores = at::empty({nx, ny}, x.options().dtype(cuda_common::accumulation_type(x.scalar_type())));
  Tensor indices = with_indices ? at::empty({nx, ny, ly}, x.options().dtype(at::kLong))
                                : at::empty({0}, x.options().dtype(at::kLong));
  if (nx == 0 || ny == 0) return {scores, indices};
  const int64_t caps = std::max<int64_t>(1, kRows / ly), n_cap_blocks = ceil_div(ny, caps);
  const unsigned int blocks = grid_size(nx * n_cap_blocks, "the forward");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_sim_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x_lens.data_ptr<int64_t>(), y_lens.data_ptr<int64_t>(), lx,
        ny, ly, d, caps, n_cap_blocks, scores.data_ptr<acc_t>(), with_indices ? indices.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, indices};
}

std::tuple<Tensor, Tensor> max_sim_backward_cuda(const Tensor& grad_in, const Tensor& x_in, const Tensor& y_in,
                                                 const Tensor& x_lens_in, const Tensor& y_lens_in,
                                                 const Tensor& indices_in) {
  check_inputs(x_in, y_in, x_lens_in, y_lens_in);
  const int64_t nx = x_in.size(0), lx = x_in.size(1), ny = y_in.size(0), ly = y_in.size(1), d = x_in.size(2);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == nx && grad_in.size(1) == ny,
              "max_sim_backward (CUDA): grad_scores must have shape (", nx, ", ", ny, "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device() == x_in.device(), "max_sim_backward (CUDA): grad_scores must be on ", x_in.device(),
              ", got ", grad_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor x_lens = x_lens_in.contiguous(), y_lens = y_lens_in.contiguous();
  Tensor grad_x = at::zeros_like(x), grad_y = at::zeros_like(y);
  if (nx == 0 || ny == 0 || d == 0) return {grad_x, grad_y};
  check_indices(indices_in, x_lens, y_lens, nx, ny, ly, x);
  const Tensor indices = indices_in.contiguous();
  const Tensor grad = grad_in.to(cuda_common::accumulation_type(x.scalar_type())).contiguous();
  const int64_t n_node_tiles = ceil_div(lx, kNodeTile), d_blocks = ceil_div(d, kBackwardThreads);
  TORCH_CHECK(d_blocks <= 65535, "max_sim_backward (CUDA): d = ", d, " is too large (at most ", 65535 * kBackwardThreads,
              ")");
  const dim3 grid_y(grid_size(ny, "grad_y"), static_cast<unsigned int>(d_blocks));
  const dim3 grid_x(grid_size(nx * n_node_tiles, "grad_x"), static_cast<unsigned int>(d_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_sim_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_y_kernel<scalar_t><<<grid_y, kBackwardThreads, 0, stream>>>(
        grad.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), y_lens.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), nx,
        lx, ny, ly, d, grad_y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_x_kernel<scalar_t><<<grid_x, kBackwardThreads, 0, stream>>>(
        grad.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), y_lens.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), lx,
        ny, ly, d, n_node_tiles, grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace sgfused

TORCH_LIBRARY_IMPL(sgfused, CUDA, m) {
  m.impl("max_sim_forward", &sgfused::max_sim_forward_cuda);
  m.impl("max_sim_backward", &sgfused::max_sim_backward_cuda);
}
