// CUDA kernels of hardest_negative_forward / hardest_negative_backward (the
// scores entry points; docs/hardest_negative_contract.md has the exact math).
//
// Algorithm
// - Positives without N x N masks: the ids are sorted once (stable, at::sort) and
//   at::searchsorted gives, for every caption c, the range of the sorted image ids
//   equal to cap_img_ids[c] (its positive rows, ascending) and, for every row i,
//   the range of sorted caption ids equal to img_ids[i] (its positive captions).
// - Hardest negatives, one pass over S: each block reads a 64 x 128 tile and
//   reduces the negative cells of each row and each column to a 64-bit key (an
//   order-preserving image of the value, then 0xFFFFFFFF - index so that the
//   lowest index wins ties); one atomicMax per row and per column per block
//   merges the tiles. fp64 values need all 64 bits, so fp64 takes two passes:
//   atomicMax of the value keys, then atomicMax of the index keys of the cells
//   equal to that maximum.
// - per_caption: max_violation re-reads row_max[i] = S[i, hard_cap[i]] and
//   col_max[c] = S[hard_img[c], c]; the sum of hinges gives each caption a
//   block that scans, for each of its positive rows, that row and its column.
// - backward, max_violation: a row kernel (positive cells, per-row sums of the
//   active row hinges), a column kernel (per-column sums), then one write per
//   hardest-negative cell. Sum of hinges: the caption blocks write the positive
//   cells (minus g_c times the number of active hinges), a dense kernel writes
//   every negative cell from the positives of its row and of its column.
//
// Determinism: atomicMax on integer keys gives the same result in any order;
// every floating-point sum is made by one thread in a fixed order or by a
// fixed-shape block reduction; every output cell is written by exactly one
// thread. No floating-point atomics, so equal inputs give bit-identical outputs.
// Non-finite scores are refused up front (check_finite, shared by every backend).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../input_checks.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace sgfused {
namespace {

using at::Tensor;
using Key = unsigned long long;  // what the 64-bit atomicMax takes

constexpr int kThreads = 256;  // every kernel's block size
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- small device helpers

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> load(const scalar_t* s, int64_t n_cap, int64_t i, int64_t c) {
  return static_cast<at::opmath_type<scalar_t>>(s[i * n_cap + c]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t hinge(acc_t x) {
  return x > acc_t(0) ? x : acc_t(0);
}

__device__ __forceinline__ bool valid_index(int64_t index, int64_t size) {
  return index >= 0 && index < size;
}

// Unsigned images of the values that compare like the values (-0 counts as +0,
// as torch.argmax sees them). Nonzero for every non-NaN value, so 0 means "none".
__device__ __forceinline__ Key ordered_bits(float v) {
  const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ Key ordered_bits(double v) {
  const Key u = static_cast<Key>(__double_as_longlong(v == 0.0 ? 0.0 : v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Larger for lower indices (indices are < 2^31, so never 0).
__device__ __forceinline__ Key index_key(int64_t index) {
  return 0xffffffffull - static_cast<Key>(index);
}

__device__ __forceinline__ Key max_key(Key a, Key b) {
  return a > b ? a : b;
}

__device__ __forceinline__ Key warp_max(Key key) {
  for (int offset = 16; offset > 0; offset /= 2) key = max_key(key, __shfl_xor_sync(kFullMask, key, offset));
  return key;
}

// ---------------------------------------------------------------- hardest negatives

// Key functors of the tile kernel: the key of negative cell (i, c) with value v
// in the reduction of row i (row) and of column c (col); 0 = not a candidate.

// fp32 accumulation: value in the high 32 bits, index in the low 32 bits, so a
// single max yields the maximum and its lowest index together.
struct PackedKeys {
  __device__ Key row(float v, int64_t, int64_t c) const { return (ordered_bits(v) << 32) | index_key(c); }
  __device__ Key col(float v, int64_t i, int64_t) const { return (ordered_bits(v) << 32) | index_key(i); }
};

// fp64, pass 1: the value alone (its ordered bits fill the key).
struct ValueKeys {
  __device__ Key row(double v, int64_t, int64_t) const { return ordered_bits(v); }
  __device__ Key col(double v, int64_t, int64_t) const { return ordered_bits(v); }
};

// fp64, pass 2: the index of the cells whose value equals the pass-1 maximum.
struct IndexAtMaxKeys {
  const Key* row_max;
  const Key* col_max;
  __device__ Key row(double v, int64_t i, int64_t c) const { return ordered_bits(v) == row_max[i] ? index_key(c) : 0; }
  __device__ Key col(double v, int64_t i, int64_t c) const { return ordered_bits(v) == col_max[c] ? index_key(i) : 0; }
};

// Block: 32 x 8 threads (one warp per threadIdx.y); tile: 64 rows x 128 columns,
// each thread owns 4 columns (lane + 32 j) of 8 rows (threadIdx.y + 8 r).
constexpr int kColsPerThread = 4;
constexpr int kRowsPerThread = 8;
constexpr int kTileCols = 32 * kColsPerThread;
constexpr int kTileRows = kWarps * kRowsPerThread;

template <typename scalar_t, typename Keys>
__global__ void __launch_bounds__(kThreads)
    hardest_tile_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ img_ids,
                        const int64_t* __restrict__ cap_img_ids, int64_t n_img, int64_t n_cap, int64_t n_col_tiles,
                        Keys keys, Key* __restrict__ row_keys, Key* __restrict__ col_keys) {
  __shared__ Key col_partial[kWarps][kTileCols];
  const int64_t col0 = (blockIdx.x % n_col_tiles) * kTileCols;
  const int64_t row0 = (blockIdx.x / n_col_tiles) * kTileRows;
  const int lane = threadIdx.x, warp = threadIdx.y;

  int64_t cap_id[kColsPerThread];
  Key col_best[kColsPerThread];
  for (int j = 0; j < kColsPerThread; ++j) {
    const int64_t c = col0 + lane + 32 * j;
    cap_id[j] = c < n_cap ? cap_img_ids[c] : 0;
    col_best[j] = 0;
  }
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t i = row0 + warp + kWarps * r;
    Key row_best = 0;
    if (i < n_img) {  // uniform across the warp
      const int64_t img_id = img_ids[i];
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t c = col0 + lane + 32 * j;
        if (c < n_cap && cap_id[j] != img_id) {
          const auto v = load(s, n_cap, i, c);
          row_best = max_key(row_best, keys.row(v, i, c));
          col_best[j] = max_key(col_best[j], keys.col(v, i, c));
        }
      }
    }
    row_best = warp_max(row_best);
    if (lane == 0 && row_best != 0) atomicMax(&row_keys[i], row_best);
  }

  for (int j = 0; j < kColsPerThread; ++j) col_partial[warp][lane + 32 * j] = col_best[j];
  __syncthreads();
  const int t = warp * 32 + lane;
  if (t < kTileCols && col0 + t < n_cap) {
    Key best = 0;
    for (int w = 0; w < kWarps; ++w) best = max_key(best, col_partial[w][t]);
    if (best != 0) atomicMax(&col_keys[col0 + t], best);
  }
}

// The value field of a key: the high half of a packed fp32 key, all of a fp64 value key.
template <typename acc_t>
__device__ __forceinline__ Key value_field(Key key) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return key >> 32;
  } else {
    return key;
  }
}

// hard index = lowest index of the maximum; -1 where there was no negative or
// every negative is -inf (as the reference reports it).
template <typename acc_t>
__global__ void hardest_index_kernel(const Key* __restrict__ value_keys, const Key* __restrict__ index_keys,
                                     int64_t n, int64_t* __restrict__ hard) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  const Key value = value_field<acc_t>(value_keys[k]);
  const bool none = value == 0 || value == ordered_bits(-static_cast<acc_t>(INFINITY));
  hard[k] = none ? -1 : static_cast<int64_t>(0xffffffffull - (index_keys[k] & 0xffffffffull));
}

// ---------------------------------------------------------------- per-caption losses

// max_violation: one thread per caption, its positive rows in ascending order.
template <typename scalar_t>
__global__ void max_violation_loss_kernel(const scalar_t* __restrict__ s, int64_t n_img, int64_t n_cap,
                                          const int64_t* __restrict__ img_perm, const int64_t* __restrict__ cap_lo,
                                          const int64_t* __restrict__ cap_hi, const int64_t* __restrict__ hard_cap,
                                          const int64_t* __restrict__ hard_img, double margin,
                                          at::opmath_type<scalar_t>* __restrict__ per_caption) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= n_cap) return;
  const acc_t m = static_cast<acc_t>(margin);
  const int64_t hi = hard_img[c];
  acc_t total = 0;
  for (int64_t q = cap_lo[c]; q < cap_hi[c]; ++q) {
    const int64_t i = img_perm[q];
    const int64_t hc = hard_cap[i];
    const acc_t u = m - load(s, n_cap, i, c);
    const acc_t cost_cap = valid_index(hc, n_cap) ? hinge(u + load(s, n_cap, i, hc)) : acc_t(0);
    const acc_t cost_img = valid_index(hi, n_img) ? hinge(u + load(s, n_cap, hi, c)) : acc_t(0);
    total += cost_cap + cost_img;
  }
  per_caption[c] = total;
}

// Sum and number of the active hinges of some positive pairs.
template <typename acc_t>
struct HingeTotals {
  acc_t sum;
  long long count;
};

// The totals of the whole block, returned to every thread (fixed reduction shape).
template <typename acc_t>
__device__ HingeTotals<acc_t> block_total(HingeTotals<acc_t> t) {
  __shared__ acc_t warp_sum[kWarps];
  __shared__ long long warp_count[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    t.sum += __shfl_down_sync(kFullMask, t.sum, offset);
    t.count += __shfl_down_sync(kFullMask, t.count, offset);
  }
  if (threadIdx.x % 32 == 0) {
    warp_sum[threadIdx.x / 32] = t.sum;
    warp_count[threadIdx.x / 32] = t.count;
  }
  __syncthreads();
  HingeTotals<acc_t> total{0, 0};
  for (int w = 0; w < kWarps; ++w) {
    total.sum += warp_sum[w];
    total.count += warp_count[w];
  }
  __syncthreads();  // warp_sum / warp_count are reused by the next call
  return total;
}

// Sum of hinges of the positive pair (i, c), by the whole block: hinges
// (margin - S[i,c]) + S[i,c'] over the negative c' of row i and
// (margin - S[i,c]) + S[i',c] over the negative i' of column c.
template <typename scalar_t>
__device__ HingeTotals<at::opmath_type<scalar_t>> pair_hinges(const scalar_t* __restrict__ s,
                                                              const int64_t* __restrict__ img_ids,
                                                              const int64_t* __restrict__ cap_img_ids, int64_t n_img,
                                                              int64_t n_cap, int64_t i, int64_t c, double margin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t id = img_ids[i];
  const acc_t u = static_cast<acc_t>(margin) - load(s, n_cap, i, c);
  HingeTotals<acc_t> t{0, 0};
  for (int64_t c2 = threadIdx.x; c2 < n_cap; c2 += kThreads) {
    const acc_t x = u + load(s, n_cap, i, c2);
    if (cap_img_ids[c2] != id && x > acc_t(0)) {
      t.sum += x;
      ++t.count;
    }
  }
  for (int64_t i2 = threadIdx.x; i2 < n_img; i2 += kThreads) {
    const acc_t x = u + load(s, n_cap, i2, c);
    if (img_ids[i2] != id && x > acc_t(0)) {
      t.sum += x;
      ++t.count;
    }
  }
  return block_total(t);
}

// Sum of hinges: one block per caption, its positive rows in ascending order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    hinge_sum_loss_kernel(const scalar_t* __restrict__ s, const int64_t* __restrict__ img_ids,
                          const int64_t* __restrict__ cap_img_ids, int64_t n_img, int64_t n_cap,
                          const int64_t* __restrict__ img_perm, const int64_t* __restrict__ cap_lo,
                          const int64_t* __restrict__ cap_hi, double margin,
                          at::opmath_type<scalar_t>* __restrict__ per_caption) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  acc_t total = 0;
  for (int64_t q = cap_lo[c]; q < cap_hi[c]; ++q) {
    total += pair_hinges(s, img_ids, cap_img_ids, n_img, n_cap, img_perm[q], c, margin).sum;
  }
  if (threadIdx.x == 0) per_caption[c] = total;
}

// ---------------------------------------------------------------- backward, max_violation

// One thread per row i: writes its positive cells, -g_c per active hinge, and
// row_grad[i] = sum of g_c over the active row hinges (which reach (i, hard_cap[i])).
template <typename scalar_t>
__global__ void max_violation_rows_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                          const scalar_t* __restrict__ s, int64_t n_img, int64_t n_cap,
                                          const int64_t* __restrict__ cap_perm, const int64_t* __restrict__ img_lo,
                                          const int64_t* __restrict__ img_hi, const int64_t* __restrict__ hard_cap,
                                          const int64_t* __restrict__ hard_img, double margin,
                                          at::opmath_type<scalar_t>* __restrict__ row_grad,
                                          scalar_t* __restrict__ grad_scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_img) return;
  const acc_t m = static_cast<acc_t>(margin);
  const int64_t hc = hard_cap[i];
  const bool has_row_max = valid_index(hc, n_cap);
  const acc_t row_max = has_row_max ? load(s, n_cap, i, hc) : acc_t(0);
  acc_t total = 0;
  for (int64_t q = img_lo[i]; q < img_hi[i]; ++q) {
    const int64_t c = cap_perm[q];
    const int64_t hi = hard_img[c];
    const acc_t u = m - load(s, n_cap, i, c);
    const bool cap_active = has_row_max && u + row_max > acc_t(0);
    const bool img_active = valid_index(hi, n_img) && u + load(s, n_cap, hi, c) > acc_t(0);
    if (cap_active) total += grad[c];
    const int active = int(cap_active) + int(img_active);
    if (active > 0) grad_scores[i * n_cap + c] = static_cast<scalar_t>(-grad[c] * static_cast<acc_t>(active));
  }
  row_grad[i] = total;
}

// One thread per column c: col_grad[c] = sum of g_c over its active column hinges.
template <typename scalar_t>
__global__ void max_violation_cols_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                          const scalar_t* __restrict__ s, int64_t n_img, int64_t n_cap,
                                          const int64_t* __restrict__ img_perm, const int64_t* __restrict__ cap_lo,
                                          const int64_t* __restrict__ cap_hi, const int64_t* __restrict__ hard_img,
                                          double margin, at::opmath_type<scalar_t>* __restrict__ col_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= n_cap) return;
  const int64_t hi = hard_img[c];
  acc_t total = 0;
  if (valid_index(hi, n_img)) {
    const acc_t m = static_cast<acc_t>(margin);
    const acc_t col_max = load(s, n_cap, hi, c);
    for (int64_t q = cap_lo[c]; q < cap_hi[c]; ++q) {
      if ((m - load(s, n_cap, img_perm[q], c)) + col_max > acc_t(0)) total += grad[c];
    }
  }
  col_grad[c] = total;
}

// Threads 0..n_img-1 write (i, hard_cap[i]), adding the column sum when the cell
// is also (hard_img[c], c); threads n_img.. write the other (hard_img[c], c).
// So every hardest-negative cell is written once, with its full sum.
template <typename scalar_t>
__global__ void max_violation_hardest_cells_kernel(const at::opmath_type<scalar_t>* __restrict__ row_grad,
                                                   const at::opmath_type<scalar_t>* __restrict__ col_grad,
                                                   int64_t n_img, int64_t n_cap, const int64_t* __restrict__ hard_cap,
                                                   const int64_t* __restrict__ hard_img,
                                                   scalar_t* __restrict__ grad_scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < n_img) {
    const int64_t i = t, c = hard_cap[i];
    if (!valid_index(c, n_cap)) return;
    const acc_t shared_col = hard_img[c] == i ? col_grad[c] : acc_t(0);
    grad_scores[i * n_cap + c] = static_cast<scalar_t>(row_grad[i] + shared_col);
  } else if (t < n_img + n_cap) {
    const int64_t c = t - n_img, i = hard_img[c];
    if (!valid_index(i, n_img) || hard_cap[i] == c) return;
    grad_scores[i * n_cap + c] = static_cast<scalar_t>(col_grad[c]);
  }
}

// ---------------------------------------------------------------- backward, sum of hinges

// One block per caption: each positive cell (i, c) gets -g_c times its number of active hinges.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    hinge_sum_positive_cells_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                    const scalar_t* __restrict__ s, const int64_t* __restrict__ img_ids,
                                    const int64_t* __restrict__ cap_img_ids, int64_t n_img, int64_t n_cap,
                                    const int64_t* __restrict__ img_perm, const int64_t* __restrict__ cap_lo,
                                    const int64_t* __restrict__ cap_hi, double margin,
                                    scalar_t* __restrict__ grad_scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  for (int64_t q = cap_lo[c]; q < cap_hi[c]; ++q) {
    const int64_t i = img_perm[q];
    const long long active = pair_hinges(s, img_ids, cap_img_ids, n_img, n_cap, i, c, margin).count;
    if (threadIdx.x == 0) grad_scores[i * n_cap + c] = static_cast<scalar_t>(-grad[c] * static_cast<acc_t>(active));
  }
}

// One thread per negative cell (i, c'): sum of g_c over the positives c of row i
// with (margin - S[i,c]) + S[i,c'] > 0, then of g_c' over the positives i2 of
// column c' with (margin - S[i2,c']) + S[i,c'] > 0. Blocks of 32 x 8 cells.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    hinge_sum_negative_cells_kernel(const at::opmath_type<scalar_t>* __restrict__ grad,
                                    const scalar_t* __restrict__ s, const int64_t* __restrict__ img_ids,
                                    const int64_t* __restrict__ cap_img_ids, int64_t n_img, int64_t n_cap,
                                    int64_t n_col_tiles, const int64_t* __restrict__ img_perm,
                                    const int64_t* __restrict__ cap_lo, const int64_t* __restrict__ cap_hi,
                                    const int64_t* __restrict__ cap_perm, const int64_t* __restrict__ img_lo,
                                    const int64_t* __restrict__ img_hi, double margin,
                                    scalar_t* __restrict__ grad_scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = (blockIdx.x % n_col_tiles) * 32 + threadIdx.x;
  const int64_t i = (blockIdx.x / n_col_tiles) * kWarps + threadIdx.y;
  if (i >= n_img || c >= n_cap || img_ids[i] == cap_img_ids[c]) return;
  const acc_t m = static_cast<acc_t>(margin);
  const acc_t v = load(s, n_cap, i, c);
  acc_t total = 0;
  for (int64_t q = img_lo[i]; q < img_hi[i]; ++q) {
    const int64_t c_pos = cap_perm[q];
    if ((m - load(s, n_cap, i, c_pos)) + v > acc_t(0)) total += grad[c_pos];
  }
  for (int64_t q = cap_lo[c]; q < cap_hi[c]; ++q) {
    if ((m - load(s, n_cap, img_perm[q], c)) + v > acc_t(0)) total += grad[c];
  }
  grad_scores[i * n_cap + c] = static_cast<scalar_t>(total);
}

// ---------------------------------------------------------------- host side

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "hardest_negative (CUDA): the score matrix is too large (",
              blocks, " thread blocks)");
  return static_cast<unsigned int>(blocks);
}

void check_on_device(const Tensor& t, const char* name, const Tensor& scores) {
  TORCH_CHECK(t.is_cuda(), "hardest_negative (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == scores.device(), "hardest_negative (CUDA): ", name, " is on ", t.device(),
              " but scores is on ", scores.device());
}

void check_index_vector(const Tensor& t, const char* name, int64_t size, const Tensor& scores) {
  check_on_device(t, name, scores);
  TORCH_CHECK(t.scalar_type() == at::kLong, "hardest_negative (CUDA): ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "hardest_negative (CUDA): ", name, " must have shape (", size,
              ",), got ", t.sizes());
}

void check_inputs(const Tensor& scores, const Tensor& img_ids, const Tensor& cap_img_ids) {
  TORCH_CHECK(scores.is_cuda(), "hardest_negative (CUDA): scores must be a CUDA tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "hardest_negative (CUDA): scores must be 2-D (Ni, Nc), got ", scores.sizes());
  TORCH_CHECK(scores.size(0) < std::numeric_limits<int32_t>::max() &&
                  scores.size(1) < std::numeric_limits<int32_t>::max(),
              "hardest_negative (CUDA): scores must have fewer than 2^31 - 1 rows and columns, got ", scores.sizes());
  check_index_vector(img_ids, "img_ids", scores.size(0), scores);
  check_index_vector(cap_img_ids, "cap_img_ids", scores.size(1), scores);
}

// Where the positives are, as ranges of sorted ids: the positive rows of caption
// c are img_perm[cap_lo[c] .. cap_hi[c]) and the positive captions of row i are
// cap_perm[img_lo[i] .. img_hi[i]), both ascending (the sorts are stable).
struct Positives {
  Tensor img_perm, cap_lo, cap_hi;
  Tensor cap_perm, img_lo, img_hi;
};

Positives find_positives(const Tensor& img_ids, const Tensor& cap_img_ids) {
  auto [img_sorted, img_perm] = at::sort(img_ids, /*stable=*/std::optional<bool>(true), /*dim=*/0);
  auto [cap_sorted, cap_perm] = at::sort(cap_img_ids, /*stable=*/std::optional<bool>(true), /*dim=*/0);
  return {img_perm.contiguous(),
          at::searchsorted(img_sorted, cap_img_ids).contiguous(),
          at::searchsorted(img_sorted, cap_img_ids, /*out_int32=*/false, /*right=*/true).contiguous(),
          cap_perm.contiguous(),
          at::searchsorted(cap_sorted, img_ids).contiguous(),
          at::searchsorted(cap_sorted, img_ids, /*out_int32=*/false, /*right=*/true).contiguous()};
}

Key* key_ptr(const Tensor& keys) {
  return reinterpret_cast<Key*>(keys.data_ptr<int64_t>());
}

// hard_cap (Ni,) and hard_img (Nc,) by one pass over S (two for fp64).
template <typename scalar_t>
std::tuple<Tensor, Tensor> hardest_negatives(const Tensor& s, const Tensor& img_ids, const Tensor& cap_img_ids) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_img = s.size(0), n_cap = s.size(1);
  const int64_t n_col_tiles = ceil_div(n_cap, kTileCols);
  const unsigned int tiles = grid_size(n_col_tiles * ceil_div(n_img, kTileRows));
  const dim3 tile_block(32, kWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto key_options = img_ids.options();
  Tensor row_keys = at::zeros({n_img}, key_options), col_keys = at::zeros({n_cap}, key_options);
  Tensor row_index_keys = row_keys, col_index_keys = col_keys;

  const scalar_t* sp = s.data_ptr<scalar_t>();
  const int64_t* img = img_ids.data_ptr<int64_t>();
  const int64_t* cap = cap_img_ids.data_ptr<int64_t>();
  if constexpr (std::is_same_v<acc_t, float>) {
    hardest_tile_kernel<<<tiles, tile_block, 0, stream>>>(sp, img, cap, n_img, n_cap, n_col_tiles, PackedKeys{},
                                                         key_ptr(row_keys), key_ptr(col_keys));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    hardest_tile_kernel<<<tiles, tile_block, 0, stream>>>(sp, img, cap, n_img, n_cap, n_col_tiles, ValueKeys{},
                                                         key_ptr(row_keys), key_ptr(col_keys));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_index_keys = at::zeros({n_img}, key_options);
    col_index_keys = at::zeros({n_cap}, key_options);
    const IndexAtMaxKeys at_max{key_ptr(row_keys), key_ptr(col_keys)};
    hardest_tile_kernel<<<tiles, tile_block, 0, stream>>>(sp, img, cap, n_img, n_cap, n_col_tiles, at_max,
                                                         key_ptr(row_index_keys), key_ptr(col_index_keys));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  Tensor hard_cap = at::empty({n_img}, key_options), hard_img = at::empty({n_cap}, key_options);
  hardest_index_kernel<acc_t><<<grid_size(ceil_div(n_img, kThreads)), kThreads, 0, stream>>>(
      key_ptr(row_keys), key_ptr(row_index_keys), n_img, hard_cap.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  hardest_index_kernel<acc_t><<<grid_size(ceil_div(n_cap, kThreads)), kThreads, 0, stream>>>(
      key_ptr(col_keys), key_ptr(col_index_keys), n_cap, hard_img.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {hard_cap, hard_img};
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor, Tensor> hardest_negative_forward_cuda(const Tensor& scores_in, const Tensor& img_ids_in,
                                                                 const Tensor& cap_img_ids_in, double margin,
                                                                 bool max_violation) {
  check_inputs(scores_in, img_ids_in, cap_img_ids_in);
  check_finite(scores_in, "scores");  // as every backend checks it
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor s = scores_in.contiguous();
  const Tensor img_ids = img_ids_in.contiguous(), cap_img_ids = cap_img_ids_in.contiguous();
  const int64_t n_img = s.size(0), n_cap = s.size(1);
  Tensor per_caption = at::zeros({n_cap}, s.options().dtype(accumulation_type(s.scalar_type())));
  if (s.numel() == 0) {
    return {per_caption, at::full({n_img}, -1, img_ids.options()), at::full({n_cap}, -1, img_ids.options())};
  }
  const Positives pos = find_positives(img_ids, cap_img_ids);
  Tensor hard_cap, hard_img;
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "hardest_negative_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::tie(hard_cap, hard_img) = hardest_negatives<scalar_t>(s, img_ids, cap_img_ids);
    if (max_violation) {
      max_violation_loss_kernel<scalar_t><<<grid_size(ceil_div(n_cap, kThreads)), kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), n_img, n_cap, pos.img_perm.data_ptr<int64_t>(), pos.cap_lo.data_ptr<int64_t>(),
          pos.cap_hi.data_ptr<int64_t>(), hard_cap.data_ptr<int64_t>(), hard_img.data_ptr<int64_t>(), margin,
          per_caption.data_ptr<acc_t>());
    } else {
      hinge_sum_loss_kernel<scalar_t><<<grid_size(n_cap), kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), img_ids.data_ptr<int64_t>(), cap_img_ids.data_ptr<int64_t>(), n_img, n_cap,
          pos.img_perm.data_ptr<int64_t>(), pos.cap_lo.data_ptr<int64_t>(), pos.cap_hi.data_ptr<int64_t>(), margin,
          per_caption.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_caption, hard_cap, hard_img};
}

Tensor hardest_negative_backward_cuda(const Tensor& grad_per_caption, const Tensor& scores_in,
                                      const Tensor& img_ids_in, const Tensor& cap_img_ids_in,
                                      const Tensor& hard_cap_in, const Tensor& hard_img_in, double margin,
                                      bool max_violation) {
  check_inputs(scores_in, img_ids_in, cap_img_ids_in);
  const int64_t n_img = scores_in.size(0), n_cap = scores_in.size(1);
  check_on_device(grad_per_caption, "grad_per_caption", scores_in);
  TORCH_CHECK(grad_per_caption.dim() == 1 && grad_per_caption.size(0) == n_cap,
              "hardest_negative (CUDA): grad_per_caption must have shape (", n_cap, ",), got ",
              grad_per_caption.sizes());
  check_index_vector(hard_cap_in, "hard_cap", n_img, scores_in);
  check_index_vector(hard_img_in, "hard_img", n_cap, scores_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());

  const Tensor s = scores_in.contiguous();
  const Tensor img_ids = img_ids_in.contiguous(), cap_img_ids = cap_img_ids_in.contiguous();
  const Tensor hard_cap = hard_cap_in.contiguous(), hard_img = hard_img_in.contiguous();
  const Tensor grad = grad_per_caption.to(accumulation_type(s.scalar_type())).contiguous();
  // max_violation writes only the positive and hardest-negative cells; the sum
  // of hinges writes every cell.
  Tensor grad_scores = max_violation || s.numel() == 0 ? at::zeros_like(s) : at::empty_like(s);
  if (s.numel() == 0) return grad_scores;
  const Positives pos = find_positives(img_ids, cap_img_ids);
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "hardest_negative_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const acc_t* g = grad.data_ptr<acc_t>();
    scalar_t* out = grad_scores.data_ptr<scalar_t>();
    if (max_violation) {
      Tensor row_grad = at::empty({n_img}, grad.options()), col_grad = at::empty({n_cap}, grad.options());
      max_violation_rows_kernel<scalar_t><<<grid_size(ceil_div(n_img, kThreads)), kThreads, 0, stream>>>(
          g, sp, n_img, n_cap, pos.cap_perm.data_ptr<int64_t>(), pos.img_lo.data_ptr<int64_t>(),
          pos.img_hi.data_ptr<int64_t>(), hard_cap.data_ptr<int64_t>(), hard_img.data_ptr<int64_t>(), margin,
          row_grad.data_ptr<acc_t>(), out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      max_violation_cols_kernel<scalar_t><<<grid_size(ceil_div(n_cap, kThreads)), kThreads, 0, stream>>>(
          g, sp, n_img, n_cap, pos.img_perm.data_ptr<int64_t>(), pos.cap_lo.data_ptr<int64_t>(),
          pos.cap_hi.data_ptr<int64_t>(), hard_img.data_ptr<int64_t>(), margin, col_grad.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      max_violation_hardest_cells_kernel<scalar_t>
          <<<grid_size(ceil_div(n_img + n_cap, kThreads)), kThreads, 0, stream>>>(
              row_grad.data_ptr<acc_t>(), col_grad.data_ptr<acc_t>(), n_img, n_cap, hard_cap.data_ptr<int64_t>(),
              hard_img.data_ptr<int64_t>(), out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t* img = img_ids.data_ptr<int64_t>();
      const int64_t* cap = cap_img_ids.data_ptr<int64_t>();
      hinge_sum_positive_cells_kernel<scalar_t><<<grid_size(n_cap), kThreads, 0, stream>>>(
          g, sp, img, cap, n_img, n_cap, pos.img_perm.data_ptr<int64_t>(), pos.cap_lo.data_ptr<int64_t>(),
          pos.cap_hi.data_ptr<int64_t>(), margin, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t n_col_tiles = ceil_div(n_cap, 32);
      hinge_sum_negative_cells_kernel<scalar_t>
          <<<grid_size(n_col_tiles * ceil_div(n_img, kWarps)), dim3(32, kWarps), 0, stream>>>(
              g, sp, img, cap, n_img, n_cap, n_col_tiles, pos.img_perm.data_ptr<int64_t>(),
              pos.cap_lo.data_ptr<int64_t>(), pos.cap_hi.data_ptr<int64_t>(), pos.cap_perm.data_ptr<int64_t>(),
              pos.img_lo.data_ptr<int64_t>(), pos.img_hi.data_ptr<int64_t>(), margin, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_scores;
}

}  // namespace
}  // namespace sgfused

TORCH_LIBRARY_IMPL(sgfused, CUDA, m) {
  m.impl("hardest_negative_forward", &sgfused::hardest_negative_forward_cuda);
  m.impl("hardest_negative_backward", &sgfused::hardest_negative_backward_cuda);
}
