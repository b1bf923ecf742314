// CUDA kernels of cross_attention_forward / cross_attention_backward
// (docs/cross_attention_contract.md has the exact math, sgfused/reference/cross_attention.py
// the ground truth).
//
// Algorithm
// - Inputs are converted once to the accumulation dtype acc (fp32; fp64 for fp64
//   input) with padded positions set to 0 (Qa (Nq, Lq, d), Ca (Nc, Lc, d)), so
//   whatever padded rows hold (even inf / NaN) never reaches a result; for
//   "cosine" / "direction" the query row norms ||q|| are taken once.
// - Pairs (a, b) are processed in blocks of na query sets x nb context sets
//   (nb = Nc unless that is over the budget), a outer, b inner. Per block, with
//   the block's rows ordered (b, a, j):
//     St = Qblk (na*Lq, d) @ Cblk^T (d, nb*Lc)    one GEMM holds s[k, j] of every pair
//     probs kernel (thread block per pair): leaky relu + clipped l2 over valid j
//       (thread per k), softmax over valid k (warp per j) -> P (nb, na*Lq, Lc),
//       stats[..., 1] = log-sum-exp; P = 0 at padded j or k
//     CR = P @ Cblk (batched over b): c_raw rows (nb*na*Lq, d)
//     rows kernel (warp per row): c = l2norm(c_raw), then the epilogue:
//       "context" / "cosine" write out directly; "distance" / "direction" write
//       e = (c - q)^2 / l2norm(c) * l2norm(q) in place over CR, then
//       Z = E @ W^T (cuBLAS) and a warp per row adds bias, takes ||z||
//       (stats[..., 0]) and writes out = z / (||z|| + eps).
//     Padded query positions get out = 0 and stats = 0.
// - Backward recomputes St, P and CR of each block exactly as the forward did
//   (same kernels, same block plan) and never holds more than a block:
//     distance / direction: E again, dz from grad_out, out and stats[..., 0]
//       (fp16 / bf16, whose out was rounded: z recomputed as E @ W^T + bias),
//       grad_weight += dZ^T E, grad_bias += sum dZ, dE = dZ W;
//     rows kernel: back through the epilogue (dc, and the direct dq term of the
//       pair, written per pair) and through c = l2norm(c_raw) -> dCR in place;
//     dP = dCR @ Cblk^T, grad_C[blk] += P^T dCR (batched over b);
//     pair kernel: softmax backward (warp per j), then clipped l2 and leaky relu
//       backward (thread per k) -> dSt in place over St;
//     grad_Q[blk] += dSt @ Cblk; grad_C[blk] += dSt^T @ Qblk; grad_Q[blk] += the
//       direct dq terms summed over the block's b in order by a reduction kernel.
//   Gradients are accumulated in acc and converted at the end.
// - Memory: a block is sized so that each (pairs * Lq * max(d, m, Lc)) acc
//   buffer stays within kBlockBytes (64 MiB). Forward holds St, P (pairs*Lq*Lc
//   each), CR (pairs*Lq*d) and Z (pairs*Lq*m), i.e. at most 4 x 64 MiB beyond
//   the acc copies of the inputs and the outputs; backward adds dP, E, dE, dZ
//   (and Z for fp16 / bf16, a dq buffer for "cosine"): at most 8 x 64 MiB, plus
//   acc gradient buffers of the inputs' size. fp16 / bf16 add their GEMM operands:
//   the inputs in their dtype, P, E, dZ, dCR and dS rounded (half the size of
//   their acc buffers), and a GEMM result before it is added to a gradient.
//   Nothing of size (Nq, Nc, Lq, Lc) or (Nq, Nc, Lq, d) is ever held (except
//   the "context" output itself).
//
// Determinism: the block plan depends only on the shapes; blocks run in a fixed
// order on the current stream; every kernel writes each element from exactly
// one thread; warp sums use a fixed xor butterfly, per-row / per-column sums a
// fixed sequential order; the contractions are cuBLAS GEMMs (bitwise
// reproducible for equal shapes on one GPU model / toolkit on one stream);
// cross-block sums (grad_Q over b blocks, grad_C over a blocks, grad_weight,
// grad_bias) are in-place GEMM accumulations (beta = 1; fp16 / bf16: a GEMM
// then an elementwise add) or single-thread read-modify-writes ordered by the
// stream; grad_bias uses at::sum. No floating-point atomics anywhere.
//
// Precision: the fp32 GEMMs are at::mm / bmm calls, so they follow torch's TF32
// setting as torch.matmul does: full fp32 by default, TF32 tensor-core products
// when the user allows them (torch.set_float32_matmul_precision("high") or
// torch.backends.cuda.matmul.allow_tf32). fp16 / bf16 inputs run every GEMM on
// the tensor cores (common.cuh gemm): operands in the input dtype (Q, C and W as
// given; P, E, dZ, dCR and dS rounded to it, as the Triton kernels round theirs),
// fp32 output (the mm / bmm out_dtype overloads); the elementwise kernels and the
// accumulated gradients stay fp32. Except fp16 distance: its E = (c - q)^2 passes fp16's range from
// |c - q| = 256, so the three GEMMs with W take fp32 operands there (common.cuh w_gemm_dtype).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../input_checks.h"

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

constexpr int kThreads = 256;  // block size of the row / elementwise kernels
constexpr int kWarps = kThreads / 32;
constexpr int kPairThreads = 128;  // block size of the per-pair attention kernels
constexpr int kPairWarps = kPairThreads / 32;
constexpr int64_t kBlockBytes = int64_t(64) << 20;   // bound of each per-block acc buffer
constexpr int64_t kMaxSharedBytes = int64_t(48) << 10;  // dynamic shared memory without opt-in

enum Epilogue : int { kContext = 0, kCosine = 1, kDistance = 2, kDirection = 3 };

// ---------------------------------------------------------------- device helpers

__device__ __forceinline__ float acc_exp(float v) {
  return expf(v);
}
__device__ __forceinline__ double acc_exp(double v) {
  return ::exp(v);
}
__device__ __forceinline__ float acc_log(float v) {
  return logf(v);
}
__device__ __forceinline__ double acc_log(double v) {
  return ::log(v);
}

// Max over the warp by a fixed xor butterfly (warp_sum: common.cuh): every lane gets the same result.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const acc_t o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// PyTorch's leaky_relu and its derivative (slope `leaky` at s <= 0, so leaky_relu'(0) = leaky).
template <typename acc_t>
__device__ __forceinline__ acc_t leaky_relu(acc_t s, acc_t leaky) {
  return s > acc_t(0) ? s : s * leaky;
}
template <typename acc_t>
__device__ __forceinline__ acc_t leaky_relu_grad(acc_t s, acc_t leaky) {
  return s > acc_t(0) ? acc_t(1) : leaky;
}

// Valid length clamped into [0, padded] (the Python layer guarantees 1 <= len <=
// padded; the clamp only keeps a bad length from reading out of bounds).
__device__ __forceinline__ int64_t clamp_len(int64_t len, int64_t padded) {
  return len < 0 ? 0 : (len > padded ? padded : len);
}

// One block of pairs: query sets [a0, a0 + na) x context sets [b0, b0 + nb).
// Layouts inside the block (a, b local):
//   St  (na*lq, nb*lc): s[k, j] of pair (a, b) at St[(a*lq + j) * (nb*lc) + b*lc + k]
//   P, dP (nb, na*lq, lc) and the rows of CR / E / Z (nb*na*lq, width): row (b*na + a)*lq + j
// Output row of (a, b, j): ((a0 + a) * nc + b0 + b) * lq + j in out viewed as (Nq*Nc*Lq, width)
// and in stats viewed as (Nq*Nc*Lq, 2).
struct Block {
  int64_t a0, na, b0, nb;
  int64_t nc, lq, lc;
  __host__ __device__ int64_t pairs() const { return na * nb; }
  __host__ __device__ int64_t rows() const { return na * nb * lq; }
};

struct RowIndex {
  int64_t a, b, j;  // a, b local to the block
};

__device__ __forceinline__ RowIndex row_index(const Block& blk, int64_t r) {
  const int64_t per_b = blk.na * blk.lq;
  const int64_t b = r / per_b, rem = r % per_b;
  return {rem / blk.lq, b, rem % blk.lq};
}

__device__ __forceinline__ int64_t out_row(const Block& blk, const RowIndex& ri) {
  return ((blk.a0 + ri.a) * blk.nc + blk.b0 + ri.b) * blk.lq + ri.j;
}

// ---------------------------------------------------------------- input preparation

// out[n, l, :] = in[n, l, :] in acc for l < lens[n], 0 at padded positions.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_to_acc_kernel(const scalar_t* __restrict__ in, const int64_t* __restrict__ lens, int64_t n, int64_t len,
                         int64_t d, acc_t* __restrict__ out) {
  const int64_t total = n * len * d;
  for (int64_t t = global_thread(); t < total; t += global_threads()) {
    const int64_t set = t / (len * d), pos = (t / d) % len;
    out[t] = pos < clamp_len(lens[set], len) ? static_cast<acc_t>(in[t]) : acc_t(0);
  }
}

// norms[r] = ||v[r]||, one warp per row.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const acc_t* __restrict__ v, int64_t n, int64_t d, acc_t* __restrict__ norms) {
  const int lane = threadIdx.x % 32;
  for (int64_t r = global_thread() / 32; r < n; r += global_threads() / 32) {
    acc_t ss = 0;
    for (int64_t k = lane; k < d; k += 32) ss += v[r * d + k] * v[r * d + k];
    ss = warp_sum(ss);
    if (lane == 0) norms[r] = acc_sqrt(ss);
  }
}

// ---------------------------------------------------------------- per-pair attention kernels

// Row norms N[k] = ||leaky_relu(s[k, j < lq])|| of the pair into shared memory (thread per k;
// the j loop is sequential, reads are coalesced over k).
template <typename acc_t>
__device__ __forceinline__ void clipped_row_norms(const acc_t* s, int64_t ld, int64_t lq, int64_t lc, acc_t leaky,
                                                  acc_t* row_norm) {
  for (int64_t k = threadIdx.x; k < lc; k += kPairThreads) {
    acc_t ss = 0;
    for (int64_t j = 0; j < lq; ++j) {
      const acc_t t = leaky_relu(s[j * ld + k], leaky);
      ss += t * t;
    }
    row_norm[k] = acc_sqrt(ss);
  }
}

// One thread block per pair: P = softmax over valid k of smooth * snorm[k, j] (warp per j),
// snorm = leaky_relu(s) / (N[k] + eps) ("clipped_l2") or s ("none"); P = 0 at padded j or k.
// stats[..., 1] = log-sum-exp of the logits when stats is given (forward).
template <typename acc_t, bool kClipped>
__global__ void __launch_bounds__(kPairThreads)
    attention_probs_kernel(const acc_t* __restrict__ st, const int64_t* __restrict__ q_lens,
                           const int64_t* __restrict__ c_lens, Block blk, acc_t smooth, acc_t leaky, acc_t eps,
                           acc_t* __restrict__ p, acc_t* __restrict__ stats) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* row_norm = reinterpret_cast<acc_t*>(shared_raw);
  const int64_t pair = blockIdx.x;
  const int64_t a = pair / blk.nb, b = pair % blk.nb;
  const int64_t ag = blk.a0 + a, bg = blk.b0 + b;
  const int64_t lq = clamp_len(q_lens[ag], blk.lq), lc = clamp_len(c_lens[bg], blk.lc);
  const int64_t ld = blk.nb * blk.lc;
  const acc_t* s = st + a * blk.lq * ld + b * blk.lc;  // s[k, j] = s[j * ld + k]
  if constexpr (kClipped) {
    clipped_row_norms(s, ld, lq, lc, leaky, row_norm);
    __syncthreads();
  }
  auto logit = [&](int64_t j, int64_t k) -> acc_t {
    const acc_t v = s[j * ld + k];
    if constexpr (kClipped) {
      return smooth * (leaky_relu(v, leaky) / (row_norm[k] + eps));
    } else {
      return smooth * v;
    }
  };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t j = warp; j < blk.lq; j += kPairWarps) {  // warp-uniform loop
    acc_t* prow = p + ((b * blk.na + a) * blk.lq + j) * blk.lc;
    const int64_t o = (ag * blk.nc + bg) * blk.lq + j;
    if (j >= lq || lc == 0) {
      for (int64_t k = lane; k < blk.lc; k += 32) prow[k] = acc_t(0);
      if (stats != nullptr && lane == 0) stats[2 * o + 1] = acc_t(0);
      continue;
    }
    acc_t mx = static_cast<acc_t>(-INFINITY);
    for (int64_t k = lane; k < lc; k += 32) {
      const acc_t x = logit(j, k);
      mx = x > mx ? x : mx;
    }
    mx = warp_max(mx);
    acc_t sum = 0;
    for (int64_t k = lane; k < lc; k += 32) sum += acc_exp(logit(j, k) - mx);
    sum = warp_sum(sum);
    for (int64_t k = lane; k < blk.lc; k += 32) prow[k] = k < lc ? acc_exp(logit(j, k) - mx) / sum : acc_t(0);
    if (stats != nullptr && lane == 0) stats[2 * o + 1] = mx + acc_log(sum);
  }
}

// Backward of the pair's attention, one thread block per pair. In: St (raw s), P (p), dP.
// Phase 1 (warp per j): dsn[k, j] = smooth * p (dp - sum_k p dp), written over P.
// Phase 2 (thread per k): through snorm = t / (N[k] + eps), t = leaky_relu(s) ("clipped_l2"):
//   dt = dsn / r - t (dsn . t)_k / (r^2 N[k]) (second term 0 where N[k] == 0), r = N[k] + eps,
//   ds = dt * leaky_relu'(s); written over St. 0 at padded j or k.
template <typename acc_t, bool kClipped>
__global__ void __launch_bounds__(kPairThreads)
    attention_backward_kernel(acc_t* __restrict__ st, acc_t* __restrict__ p, const acc_t* __restrict__ dp,
                              const int64_t* __restrict__ q_lens, const int64_t* __restrict__ c_lens, Block blk,
                              acc_t smooth, acc_t leaky, acc_t eps) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* row_norm = reinterpret_cast<acc_t*>(shared_raw);
  const int64_t pair = blockIdx.x;
  const int64_t a = pair / blk.nb, b = pair % blk.nb;
  const int64_t ag = blk.a0 + a, bg = blk.b0 + b;
  const int64_t lq = clamp_len(q_lens[ag], blk.lq), lc = clamp_len(c_lens[bg], blk.lc);
  const int64_t ld = blk.nb * blk.lc;
  acc_t* s = st + a * blk.lq * ld + b * blk.lc;  // s[k, j] = s[j * ld + k]
  const int64_t p_base = (b * blk.na + a) * blk.lq * blk.lc;  // p[j, k] = p[p_base + j * lc + k]
  if constexpr (kClipped) clipped_row_norms<acc_t>(s, ld, lq, lc, leaky, row_norm);

  // Phase 1: softmax backward, warp per j.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t j = warp; j < blk.lq; j += kPairWarps) {  // warp-uniform loop
    acc_t* prow = p + p_base + j * blk.lc;
    const acc_t* dprow = dp + p_base + j * blk.lc;
    if (j >= lq) {
      for (int64_t k = lane; k < blk.lc; k += 32) prow[k] = acc_t(0);
      continue;
    }
    acc_t sp = 0;
    for (int64_t k = lane; k < lc; k += 32) sp += prow[k] * dprow[k];
    sp = warp_sum(sp);
    for (int64_t k = lane; k < blk.lc; k += 32) {
      prow[k] = k < lc ? smooth * (prow[k] * (dprow[k] - sp)) : acc_t(0);
    }
  }
  __syncthreads();  // phase 1's writes (and the row norms) are visible to the whole block

  // Phase 2: normalisation and leaky relu backward, thread per k.
  for (int64_t k = threadIdx.x; k < blk.lc; k += kPairThreads) {
    if (k >= lc) {
      for (int64_t j = 0; j < blk.lq; ++j) s[j * ld + k] = acc_t(0);
      continue;
    }
    if constexpr (kClipped) {
      const acc_t n = row_norm[k], r = n + eps;
      acc_t dot = 0;
      for (int64_t j = 0; j < lq; ++j) dot += p[p_base + j * blk.lc + k] * leaky_relu(s[j * ld + k], leaky);
      const acc_t coef = n > acc_t(0) ? dot / (r * r * n) : acc_t(0);
      for (int64_t j = 0; j < blk.lq; ++j) {
        acc_t ds = 0;
        if (j < lq) {
          const acc_t sv = s[j * ld + k];
          const acc_t dt = p[p_base + j * blk.lc + k] / r - leaky_relu(sv, leaky) * coef;
          ds = dt * leaky_relu_grad(sv, leaky);
        }
        s[j * ld + k] = ds;
      }
    } else {
      for (int64_t j = 0; j < blk.lq; ++j) s[j * ld + k] = j < lq ? p[p_base + j * blk.lc + k] : acc_t(0);
    }
  }
}

// ---------------------------------------------------------------- per-row epilogue kernels

// Forward, one warp per row of the block: c = c_raw / (||c_raw|| + eps), then
//   context:   out row = c
//   cosine:    out = <c, q> / max(||c|| ||q||, eps)
//   distance:  e row = (c - q)^2
//   direction: e row = l2norm(c) * l2norm(q)
// Padded rows: out = 0 (context / cosine), e = 0 (distance / direction). e may be c_raw
// itself (in place: each lane reads and then writes only its own columns).
template <typename scalar_t, typename acc_t, int kEpi>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const acc_t* craw, acc_t* e, const acc_t* __restrict__ q, const acc_t* __restrict__ q_norm,
                        const int64_t* __restrict__ q_lens, Block blk, int64_t d, acc_t eps,
                        scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = blk.rows();
  for (int64_t r = global_thread() / 32; r < rows; r += global_threads() / 32) {  // warp-uniform loop
    const RowIndex ri = row_index(blk, r);
    const int64_t ag = blk.a0 + ri.a;
    const int64_t o = out_row(blk, ri);
    const acc_t* cr = craw + r * d;
    const acc_t* qr = q + (ag * blk.lq + ri.j) * d;
    if (ri.j >= clamp_len(q_lens[ag], blk.lq)) {
      if constexpr (kEpi == kContext) {
        for (int64_t k = lane; k < d; k += 32) out[o * d + k] = static_cast<scalar_t>(acc_t(0));
      } else if constexpr (kEpi == kCosine) {
        if (lane == 0) out[o] = static_cast<scalar_t>(acc_t(0));
      } else {
        for (int64_t k = lane; k < d; k += 32) e[r * d + k] = acc_t(0);
      }
      continue;
    }
    acc_t ss = 0;
    for (int64_t k = lane; k < d; k += 32) ss += cr[k] * cr[k];
    const acc_t rc = acc_sqrt(warp_sum(ss)) + eps;
    if constexpr (kEpi == kContext) {
      for (int64_t k = lane; k < d; k += 32) out[o * d + k] = static_cast<scalar_t>(cr[k] / rc);
    } else if constexpr (kEpi == kCosine) {
      acc_t cc = 0, cq = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t c = cr[k] / rc;
        cc += c * c;
        cq += c * qr[k];
      }
      const acc_t nc = acc_sqrt(warp_sum(cc));
      cq = warp_sum(cq);
      const acc_t prod = nc * q_norm[ag * blk.lq + ri.j];
      const acc_t den = prod < eps ? eps : prod;  // clamp(min=eps)
      if (lane == 0) out[o] = static_cast<scalar_t>(cq / den);
    } else if constexpr (kEpi == kDistance) {
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t diff = cr[k] / rc - qr[k];
        e[r * d + k] = diff * diff;
      }
    } else {
      acc_t cc = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t c = cr[k] / rc;
        cc += c * c;
      }
      const acc_t rcc = acc_sqrt(warp_sum(cc)) + eps;
      const acc_t rq = q_norm[ag * blk.lq + ri.j] + eps;
      for (int64_t k = lane; k < d; k += 32) e[r * d + k] = (cr[k] / rc / rcc) * (qr[k] / rq);
    }
  }
}

// distance / direction forward, one warp per row: z = Z[r] + bias, n = ||z||,
// out = z / (n + eps), stats[..., 0] = n; padded rows: out = 0, stats[..., 0] = 0.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    z_epilogue_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ bias, const int64_t* __restrict__ q_lens,
                      Block blk, int64_t m, acc_t eps, scalar_t* __restrict__ out, acc_t* __restrict__ stats) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = blk.rows();
  for (int64_t r = global_thread() / 32; r < rows; r += global_threads() / 32) {
    const RowIndex ri = row_index(blk, r);
    const int64_t o = out_row(blk, ri);
    scalar_t* orow = out + o * m;
    if (ri.j >= clamp_len(q_lens[blk.a0 + ri.a], blk.lq)) {
      for (int64_t k = lane; k < m; k += 32) orow[k] = static_cast<scalar_t>(acc_t(0));
      if (lane == 0) stats[2 * o] = acc_t(0);
      continue;
    }
    const acc_t* zr = z + r * m;
    acc_t ss = 0;
    for (int64_t k = lane; k < m; k += 32) {
      const acc_t v = zr[k] + (bias != nullptr ? bias[k] : acc_t(0));
      ss += v * v;
    }
    const acc_t n = acc_sqrt(warp_sum(ss));
    const acc_t rr = n + eps;
    for (int64_t k = lane; k < m; k += 32) {
      const acc_t v = zr[k] + (bias != nullptr ? bias[k] : acc_t(0));
      orow[k] = static_cast<scalar_t>(v / rr);
    }
    if (lane == 0) stats[2 * o] = n;
  }
}

// dZ of the block, one warp per row: dz = g / r - z (z . g) / (r^2 n), r = n + eps,
// n = stats[..., 0] (second term 0 where n == 0); z = Z[r] + bias when z_block is given
// (recomputed as in the forward), else z = out * r. Padded rows: dz = 0.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dz_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
              const acc_t* __restrict__ stats, const acc_t* __restrict__ z_block, const acc_t* __restrict__ bias,
              const int64_t* __restrict__ q_lens, Block blk, int64_t m, acc_t eps, acc_t* __restrict__ dz) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = blk.rows();
  for (int64_t r = global_thread() / 32; r < rows; r += global_threads() / 32) {
    const RowIndex ri = row_index(blk, r);
    acc_t* dzr = dz + r * m;
    if (ri.j >= clamp_len(q_lens[blk.a0 + ri.a], blk.lq)) {
      for (int64_t k = lane; k < m; k += 32) dzr[k] = acc_t(0);
      continue;
    }
    const int64_t o = out_row(blk, ri);
    const acc_t n = stats[2 * o];
    const acc_t rr = n + eps;
    const scalar_t* g = grad_out + o * m;
    const scalar_t* u = out + o * m;
    const acc_t* zr = z_block != nullptr ? z_block + r * m : nullptr;
    auto z_at = [&](int64_t k) -> acc_t {
      if (zr != nullptr) return zr[k] + (bias != nullptr ? bias[k] : acc_t(0));
      return static_cast<acc_t>(u[k]) * rr;
    };
    acc_t dot = 0;
    for (int64_t k = lane; k < m; k += 32) dot += z_at(k) * static_cast<acc_t>(g[k]);
    dot = warp_sum(dot);
    const acc_t coef = n > acc_t(0) ? dot / rr / rr / n : acc_t(0);
    for (int64_t k = lane; k < m; k += 32) dzr[k] = static_cast<acc_t>(g[k]) / rr - z_at(k) * coef;
  }
}

// Backward, one warp per row of the block. In: c_raw rows (craw), and ge = dE rows
// (distance / direction) or grad_out (context / cosine). Out: dc_raw over craw (in place),
// and the pair's direct query gradient into gq (cosine / distance / direction). Padded rows: 0.
//   context:   dc = g
//   cosine:    A = g / den, B = g <c,q> / den^2 if ||c|| ||q|| >= eps else 0, den = max(||c|| ||q||, eps)
//              dc = A q - B ||q|| c / ||c||,  dq = A c - B ||c|| q / ||q||  (norm terms 0 at norm 0)
//   distance:  dc = 2 (c - q) ge,  dq = -dc
//   direction: dc = l2norm_backward(c, ge * qhat),  dq = l2norm_backward(q, ge * chat)
//   then       dc_raw = l2norm_backward(c_raw, dc)
// with l2norm_backward(v, du) = du / r - v (v . du) / (r^2 ||v||), r = ||v|| + eps (0 term at ||v|| = 0).
template <typename scalar_t, typename acc_t, int kEpi>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(acc_t* __restrict__ craw, const acc_t* __restrict__ ge,
                         const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ q,
                         const acc_t* __restrict__ q_norm, const int64_t* __restrict__ q_lens, Block blk, int64_t d,
                         acc_t eps, acc_t* __restrict__ gq) {
  constexpr bool kDirectQ = kEpi != kContext;
  const int lane = threadIdx.x % 32;
  const int64_t rows = blk.rows();
  for (int64_t r = global_thread() / 32; r < rows; r += global_threads() / 32) {  // warp-uniform loop
    const RowIndex ri = row_index(blk, r);
    const int64_t ag = blk.a0 + ri.a;
    acc_t* cr = craw + r * d;
    if (ri.j >= clamp_len(q_lens[ag], blk.lq)) {
      for (int64_t k = lane; k < d; k += 32) {
        cr[k] = acc_t(0);
        if constexpr (kDirectQ) gq[r * d + k] = acc_t(0);
      }
      continue;
    }
    const int64_t o = out_row(blk, ri);
    const acc_t* qr = q + (ag * blk.lq + ri.j) * d;
    const acc_t* ger = kEpi == kDistance || kEpi == kDirection ? ge + r * d : nullptr;
    acc_t ss = 0;
    for (int64_t k = lane; k < d; k += 32) ss += cr[k] * cr[k];
    const acc_t cn = acc_sqrt(warp_sum(ss));
    const acc_t rc = cn + eps;

    // Row constants of the epilogue backward.
    acc_t c_coef = 0, q_coef = 0, qa = 0, ca = 0;  // meaning depends on the epilogue, see dc_at / dq_at
    if constexpr (kEpi == kCosine) {
      acc_t cc = 0, cq = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t c = cr[k] / rc;
        cc += c * c;
        cq += c * qr[k];
      }
      const acc_t nc = acc_sqrt(warp_sum(cc));
      cq = warp_sum(cq);
      const acc_t nq = q_norm[ag * blk.lq + ri.j];
      const acc_t prod = nc * nq;
      const acc_t den = prod < eps ? eps : prod;
      const acc_t g = static_cast<acc_t>(grad_out[o]);
      const acc_t big_a = g / den;
      const acc_t big_b = prod >= eps ? g * cq / (den * den) : acc_t(0);
      qa = big_a;  // dc = A q - c_coef c
      ca = big_a;  // dq = A c - q_coef q
      c_coef = nc > acc_t(0) ? big_b * nq / nc : acc_t(0);
      q_coef = nq > acc_t(0) ? big_b * nc / nq : acc_t(0);
    } else if constexpr (kEpi == kDirection) {
      acc_t cc = 0;
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t c = cr[k] / rc;
        cc += c * c;
      }
      const acc_t nc = acc_sqrt(warp_sum(cc));
      const acc_t rcc = nc + eps;
      const acc_t nq = q_norm[ag * blk.lq + ri.j];
      const acc_t rq = nq + eps;
      acc_t dot_c = 0, dot_q = 0;  // c . (ge * qhat), q . (ge * chat)
      for (int64_t k = lane; k < d; k += 32) {
        const acc_t c = cr[k] / rc;
        dot_c += c * (ger[k] * (qr[k] / rq));
        dot_q += qr[k] * (ger[k] * (c / rcc));
      }
      dot_c = warp_sum(dot_c);
      dot_q = warp_sum(dot_q);
      qa = rq;   // qhat = q / qa
      ca = rcc;  // chat = c / ca
      c_coef = nc > acc_t(0) ? dot_c / (rcc * rcc * nc) : acc_t(0);
      q_coef = nq > acc_t(0) ? dot_q / (rq * rq * nq) : acc_t(0);
    }
    // dc and dq at column k, from c_raw[k] (read by this lane only).
    auto dc_at = [&](int64_t k, acc_t crk) -> acc_t {
      if constexpr (kEpi == kContext) {
        return static_cast<acc_t>(grad_out[o * d + k]);
      } else if constexpr (kEpi == kCosine) {
        return qa * qr[k] - c_coef * (crk / rc);
      } else if constexpr (kEpi == kDistance) {
        return acc_t(2) * (crk / rc - qr[k]) * ger[k];
      } else {
        return ger[k] * (qr[k] / qa) / ca - (crk / rc) * c_coef;
      }
    };
    auto dq_at = [&](int64_t k, acc_t crk) -> acc_t {
      if constexpr (kEpi == kCosine) {
        return ca * (crk / rc) - q_coef * qr[k];
      } else if constexpr (kEpi == kDistance) {
        return -(acc_t(2) * (crk / rc - qr[k]) * ger[k]);
      } else if constexpr (kEpi == kDirection) {
        return ger[k] * ((crk / rc) / ca) / qa - qr[k] * q_coef;
      } else {
        return acc_t(0);
      }
    };
    acc_t dot = 0;  // c_raw . dc
    for (int64_t k = lane; k < d; k += 32) {
      const acc_t crk = cr[k];
      dot += crk * dc_at(k, crk);
    }
    dot = warp_sum(dot);
    const acc_t coef = cn > acc_t(0) ? dot / (rc * rc * cn) : acc_t(0);
    for (int64_t k = lane; k < d; k += 32) {
      const acc_t crk = cr[k];
      if constexpr (kDirectQ) gq[r * d + k] = dq_at(k, crk);
      cr[k] = dc_at(k, crk) / rc - crk * coef;
    }
  }
}

// grad_q rows of the block's query sets += sum over the block's b (in order) of the
// pairs' direct query gradients gq (rows (b*na + a)*lq + j).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_direct_q_kernel(const acc_t* __restrict__ gq, Block blk, int64_t d, acc_t* __restrict__ grad_q) {
  const int64_t per_b = blk.na * blk.lq * d;
  for (int64_t t = global_thread(); t < per_b; t += global_threads()) {
    acc_t sum = 0;
    for (int64_t b = 0; b < blk.nb; ++b) sum += gq[b * per_b + t];
    grad_q[blk.a0 * blk.lq * d + t] += sum;
  }
}

// ---------------------------------------------------------------- host side

struct Config {
  bool clipped;
  Epilogue epilogue;
  int64_t nq, lq, nc, lc, d, m;
  bool linear() const { return epilogue == kDistance || epilogue == kDirection; }
};

bool has_value(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

void check_on_device(const Tensor& t, const char* name, const Tensor& queries) {
  TORCH_CHECK(t.is_cuda(), "cross_attention (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == queries.device(), "cross_attention (CUDA): ", name, " is on ", t.device(),
              " but queries is on ", queries.device());
}

Config check_inputs(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                    const Tensor& context_lens, std::string_view norm, std::string_view epilogue,
                    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK(norm == "clipped_l2" || norm == "none",
              "cross_attention (CUDA): norm must be \"clipped_l2\" or \"none\", got \"", norm, "\"");
  TORCH_CHECK(epilogue == "context" || epilogue == "cosine" || epilogue == "distance" || epilogue == "direction",
              "cross_attention (CUDA): epilogue must be \"context\", \"cosine\", \"distance\" or \"direction\", got \"",
              epilogue, "\"");
  Config cfg{};
  cfg.clipped = norm == "clipped_l2";
  cfg.epilogue = epilogue == "context" ? kContext
                 : epilogue == "cosine" ? kCosine
                 : epilogue == "distance" ? kDistance
                                          : kDirection;
  TORCH_CHECK(queries.is_cuda(), "cross_attention (CUDA): queries must be a CUDA tensor, got ", queries.device());
  check_on_device(contexts, "contexts", queries);
  check_on_device(query_lens, "query_lens", queries);
  check_on_device(context_lens, "context_lens", queries);
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "cross_attention (CUDA): queries must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(contexts.scalar_type() == dtype, "cross_attention (CUDA): contexts must have the dtype of queries (",
              dtype, "), got ", contexts.scalar_type());
  TORCH_CHECK(queries.dim() == 3 && contexts.dim() == 3,
              "cross_attention (CUDA): queries (Nq, Lq, d) and contexts (Nc, Lc, d) must be 3-D, got ", queries.sizes(),
              " and ", contexts.sizes());
  TORCH_CHECK(contexts.size(2) == queries.size(2), "cross_attention (CUDA): queries and contexts must share d, got ",
              queries.sizes(), " and ", contexts.sizes());
  cfg.nq = queries.size(0), cfg.lq = queries.size(1), cfg.nc = contexts.size(0), cfg.lc = contexts.size(1);
  cfg.d = queries.size(2);
  TORCH_CHECK(cfg.nq == 0 || cfg.lq >= 1, "cross_attention (CUDA): the padded query length must be >= 1, got ",
              queries.sizes());
  TORCH_CHECK(cfg.nc == 0 || cfg.lc >= 1, "cross_attention (CUDA): the padded context length must be >= 1, got ",
              contexts.sizes());
  TORCH_CHECK(query_lens.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "cross_attention (CUDA): query_lens and context_lens must be int64, got ", query_lens.scalar_type(),
              " and ", context_lens.scalar_type());
  TORCH_CHECK(query_lens.dim() == 1 && query_lens.size(0) == cfg.nq,
              "cross_attention (CUDA): query_lens must have shape (", cfg.nq, ",), got ", query_lens.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == cfg.nc,
              "cross_attention (CUDA): context_lens must have shape (", cfg.nc, ",), got ", context_lens.sizes());
  check_lengths(query_lens, cfg.nq, cfg.lq, "query_lens");  // the values, as every backend checks them
  check_lengths(context_lens, cfg.nc, cfg.lc, "context_lens");
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;  // the clipped row norms of a pair live in shared memory
  TORCH_CHECK(!cfg.clipped || cfg.lc * acc_bytes <= kMaxSharedBytes,
              "cross_attention (CUDA): the padded context length ", cfg.lc,
              " is too long for norm=\"clipped_l2\" (at most ", kMaxSharedBytes / acc_bytes, " for ", dtype, ")");
  cfg.m = 0;
  if (cfg.linear()) {
    TORCH_CHECK(has_value(weight), "cross_attention (CUDA): the \"", epilogue, "\" epilogue needs weight (m, d)");
    check_on_device(*weight, "weight", queries);
    TORCH_CHECK(weight->scalar_type() == dtype, "cross_attention (CUDA): weight must have the dtype of queries (",
                dtype, "), got ", weight->scalar_type());
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == cfg.d, "cross_attention (CUDA): weight must have shape (m, ",
                cfg.d, "), got ", weight->sizes());
    cfg.m = weight->size(0);
    if (has_value(bias)) {
      check_on_device(*bias, "bias", queries);
      TORCH_CHECK(bias->scalar_type() == dtype, "cross_attention (CUDA): bias must have the dtype of queries (", dtype,
                  "), got ", bias->scalar_type());
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cfg.m, "cross_attention (CUDA): bias must have shape (", cfg.m,
                  ",), got ", bias->sizes());
    }
  }
  return cfg;
}

std::vector<int64_t> out_shape(const Config& cfg) {
  if (cfg.epilogue == kCosine) return {cfg.nq, cfg.nc, cfg.lq};
  return {cfg.nq, cfg.nc, cfg.lq, cfg.epilogue == kContext ? cfg.d : cfg.m};
}

// Blocks of na query sets x nb context sets: each (pairs * Lq * max(d, m, Lc)) acc
// buffer within kBlockBytes; all context sets at once unless that alone is over it.
struct BlockPlan {
  int64_t na, nb;
};

BlockPlan plan_blocks(const Config& cfg, int64_t acc_bytes) {
  const int64_t width = std::max<int64_t>({cfg.d, cfg.m, cfg.lc, 1});
  const int64_t per_pair = std::max<int64_t>(cfg.lq, 1) * width * acc_bytes;
  const int64_t budget = std::max<int64_t>(1, kBlockBytes / per_pair);
  const int64_t nb = std::max<int64_t>(1, std::min(cfg.nc, budget));
  const int64_t na = std::max<int64_t>(1, std::min(cfg.nq, budget / nb));
  return {na, nb};
}

// Calls fn(Block) for every block, query blocks outer, context blocks inner.
template <typename Fn>
void for_each_block(const BlockPlan& plan, const Config& cfg, Fn&& fn) {
  for (int64_t a0 = 0; a0 < cfg.nq; a0 += plan.na) {
    const int64_t na = std::min(plan.na, cfg.nq - a0);
    for (int64_t b0 = 0; b0 < cfg.nc; b0 += plan.nb) {
      const int64_t nb = std::min(plan.nb, cfg.nc - b0);
      fn(Block{a0, na, b0, nb, cfg.nc, cfg.lq, cfg.lc});
    }
  }
}

// Calls fn(std::integral_constant<int, E>) for the runtime epilogue E.
template <typename Fn>
void with_epilogue(Epilogue e, Fn&& fn) {
  switch (e) {
    case kContext:
      fn(std::integral_constant<int, kContext>{});
      break;
    case kCosine:
      fn(std::integral_constant<int, kCosine>{});
      break;
    case kDistance:
      fn(std::integral_constant<int, kDistance>{});
      break;
    case kDirection:
      fn(std::integral_constant<int, kDirection>{});
      break;
  }
}

// (N, L, d) input in acc with padded positions zeroed.
template <typename scalar_t, typename acc_t>
Tensor masked_to_acc(const Tensor& x, const Tensor& lens, cudaStream_t stream) {
  Tensor out = at::empty(x.sizes(), x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int64_t total = x.numel();
  if (total == 0) return out;
  masked_to_acc_kernel<scalar_t, acc_t><<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(
      x.data_ptr<scalar_t>(), lens.data_ptr<int64_t>(), x.size(0), x.size(1), x.size(2), out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ||q|| of every query row (Nq * Lq,), for "cosine" / "direction".
template <typename acc_t>
Tensor query_norms(const Tensor& qa, cudaStream_t stream) {
  const int64_t n = qa.size(0) * qa.size(1), d = qa.size(2);
  Tensor norms = at::empty({n}, qa.options());
  if (n == 0) return norms;
  row_norms_kernel<acc_t><<<grid_stride_blocks(n, kWarps), kThreads, 0, stream>>>(qa.data_ptr<acc_t>(), n, d,
                                                                                 norms.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

template <typename acc_t>
size_t pair_shared_bytes(const Config& cfg) {
  return cfg.clipped ? static_cast<size_t>(cfg.lc) * sizeof(acc_t) : 0;
}

template <typename acc_t>
void launch_probs(const Config& cfg, const Block& blk, const Tensor& st, const Tensor& q_lens, const Tensor& c_lens,
                  acc_t smooth, acc_t leaky, acc_t eps, const Tensor& p, acc_t* stats, cudaStream_t stream) {
  const auto grid = static_cast<unsigned int>(blk.pairs());
  const size_t shared = pair_shared_bytes<acc_t>(cfg);
  if (cfg.clipped) {
    attention_probs_kernel<acc_t, true><<<grid, kPairThreads, shared, stream>>>(
        st.data_ptr<acc_t>(), q_lens.data_ptr<int64_t>(), c_lens.data_ptr<int64_t>(), blk, smooth, leaky, eps,
        p.data_ptr<acc_t>(), stats);
  } else {
    attention_probs_kernel<acc_t, false><<<grid, kPairThreads, shared, stream>>>(
        st.data_ptr<acc_t>(), q_lens.data_ptr<int64_t>(), c_lens.data_ptr<int64_t>(), blk, smooth, leaky, eps,
        p.data_ptr<acc_t>(), stats);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Everything a block shares between the forward and the backward: acc inputs and scratch.
// qg, cg, pg_buf: the GEMM operands in the input dtype for fp16 / bf16 (masked inputs, P
// rounded); the acc tensors themselves otherwise.
struct Workspace {
  Tensor qa, ca, q_norm, q_lens, c_lens;
  Tensor st_buf, p_buf, cr_buf;  // St, P (pairs * lq * lc), CR (rows * d)
  Tensor qg, cg, pg_buf;
};

// St, P and CR of one block (the attention recomputed identically in the backward) in acc, with
// the block's Q, C and P as GEMM operands (q2, c3, c2, pg: in the input dtype for fp16 / bf16).
struct BlockViews {
  Tensor q2, c3, c2, st, p, cr, pg;
};

template <typename acc_t>
BlockViews attend_block(const Config& cfg, const Block& blk, const Workspace& ws, acc_t smooth, acc_t leaky, acc_t eps,
                        acc_t* stats, cudaStream_t stream) {
  BlockViews v;
  v.st = ws.st_buf.narrow(0, 0, blk.pairs() * cfg.lq * cfg.lc).view({blk.na * cfg.lq, blk.nb * cfg.lc});
  v.p = ws.p_buf.narrow(0, 0, blk.pairs() * cfg.lq * cfg.lc).view({blk.nb, blk.na * cfg.lq, cfg.lc});
  v.cr = ws.cr_buf.narrow(0, 0, blk.rows() * cfg.d).view({blk.nb, blk.na * cfg.lq, cfg.d});
  v.q2 = ws.qg.narrow(0, blk.a0, blk.na).view({blk.na * cfg.lq, cfg.d});
  v.c3 = ws.cg.narrow(0, blk.b0, blk.nb);
  v.c2 = v.c3.view({blk.nb * cfg.lc, cfg.d});
  v.pg = ws.pg_buf.narrow(0, 0, v.p.numel()).view(v.p.sizes());
  gemm(v.st, v.q2, v.c2.t());  // s of every pair of the block (d == 0 gives zeros)
  launch_probs<acc_t>(cfg, blk, v.st, ws.q_lens, ws.c_lens, smooth, leaky, eps, v.p, stats, stream);
  if (v.pg.scalar_type() != v.p.scalar_type()) v.pg.copy_(v.p);  // fp16 / bf16: P rounded to the input dtype
  gemm(v.cr, v.pg, v.c3);                                          // c_raw rows, batched over b
  return v;
}

template <typename scalar_t>
Workspace make_workspace(const Config& cfg, const BlockPlan& plan, const Tensor& queries, const Tensor& contexts,
                         const Tensor& q_lens, const Tensor& c_lens, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  Workspace ws;
  ws.q_lens = q_lens;
  ws.c_lens = c_lens;
  ws.qa = masked_to_acc<scalar_t, acc_t>(queries, q_lens, stream);
  ws.ca = masked_to_acc<scalar_t, acc_t>(contexts, c_lens, stream);
  if (cfg.epilogue == kCosine || cfg.epilogue == kDirection) ws.q_norm = query_norms<acc_t>(ws.qa, stream);
  const int64_t max_pairs = plan.na * plan.nb;
  ws.st_buf = at::empty({max_pairs * cfg.lq * cfg.lc}, ws.qa.options());
  ws.p_buf = at::empty({max_pairs * cfg.lq * cfg.lc}, ws.qa.options());
  ws.cr_buf = at::empty({max_pairs * cfg.lq * cfg.d}, ws.qa.options());
  // fp16 / bf16: the masked inputs in their dtype (exact: the values came from it); else aliases
  ws.qg = ws.qa.to(queries.scalar_type());
  ws.cg = ws.ca.to(contexts.scalar_type());
  ws.pg_buf = std::is_same_v<scalar_t, acc_t> ? ws.p_buf : at::empty({max_pairs * cfg.lq * cfg.lc}, ws.qg.options());
  return ws;
}

template <typename acc_t>
const acc_t* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

template <typename scalar_t>
void forward_impl(const Config& cfg, const Tensor& queries, const Tensor& contexts, const Tensor& q_lens,
                  const Tensor& c_lens, double smooth_in, double leaky_in, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, double eps_in, Tensor& out, Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const acc_t smooth = static_cast<acc_t>(smooth_in), leaky = static_cast<acc_t>(leaky_in);
  const acc_t eps = static_cast<acc_t>(eps_in);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (cfg.nq == 0 || cfg.nc == 0) return;

  const BlockPlan plan = plan_blocks(cfg, sizeof(acc_t));
  const Workspace ws = make_workspace<scalar_t>(cfg, plan, queries, contexts, q_lens, c_lens, stream);
  Tensor wg, ba, z_buf;
  if (cfg.linear()) {
    wg = weight->to(w_gemm_dtype(queries.scalar_type(), cfg.epilogue == kDistance, acc)).contiguous();
    if (has_value(bias)) ba = bias->to(acc).contiguous();
    z_buf = at::empty({plan.na * plan.nb * cfg.lq * cfg.m}, ws.qa.options());
  }

  with_epilogue(cfg.epilogue, [&](auto tag) {
    constexpr int kEpi = decltype(tag)::value;
    for_each_block(plan, cfg, [&](const Block& blk) {
      const BlockViews v = attend_block<acc_t>(cfg, blk, ws, smooth, leaky, eps, stats.data_ptr<acc_t>(), stream);
      const int64_t rows = blk.rows();
      acc_t* cr = v.cr.data_ptr<acc_t>();
      // context / cosine write out; distance / direction write e over c_raw (in place)
      forward_rows_kernel<scalar_t, acc_t, kEpi><<<grid_stride_blocks(rows, kWarps), kThreads, 0, stream>>>(
          cr, cr, ws.qa.data_ptr<acc_t>(), ptr_or_null<acc_t>(ws.q_norm), ws.q_lens.data_ptr<int64_t>(), blk, cfg.d,
          eps, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if constexpr (kEpi == kDistance || kEpi == kDirection) {
        Tensor z = z_buf.narrow(0, 0, rows * cfg.m).view({rows, cfg.m});
        gemm(z, v.cr.view({rows, cfg.d}).to(wg.scalar_type()), wg.t());  // fp16 / bf16: E rounded
        z_epilogue_kernel<scalar_t, acc_t><<<grid_stride_blocks(rows, kWarps), kThreads, 0, stream>>>(
            z.data_ptr<acc_t>(), ptr_or_null<acc_t>(ba), ws.q_lens.data_ptr<int64_t>(), blk, cfg.m, eps,
            out.data_ptr<scalar_t>(), stats.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

std::tuple<Tensor, Tensor> cross_attention_forward_cuda(const Tensor& queries_in, const Tensor& contexts_in,
                                                        const Tensor& query_lens_in, const Tensor& context_lens_in,
                                                        double smooth, double leaky, c10::string_view norm,
                                                        c10::string_view epilogue,
                                                        const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, double eps) {
  const Config cfg = check_inputs(queries_in, contexts_in, query_lens_in, context_lens_in,
                                  std::string_view(norm.data(), norm.size()),
                                  std::string_view(epilogue.data(), epilogue.size()), weight, bias);
  const c10::cuda::CUDAGuard guard(queries_in.device());
  const Tensor queries = queries_in.contiguous(), contexts = contexts_in.contiguous();
  const Tensor q_lens = query_lens_in.contiguous(), c_lens = context_lens_in.contiguous();
  const at::ScalarType acc = accumulation_type(queries.scalar_type());
  Tensor out = at::empty(out_shape(cfg), queries.options());
  Tensor stats = at::zeros({cfg.nq, cfg.nc, cfg.lq, 2}, queries.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "cross_attention_forward_cuda", [&] {
    forward_impl<scalar_t>(cfg, queries, contexts, q_lens, c_lens, smooth, leaky, weight, bias, eps, out, stats);
  });
  return {out, stats};
}

template <typename scalar_t>
void backward_impl(const Config& cfg, const Tensor& grad_out, const Tensor& queries, const Tensor& contexts,
                   const Tensor& q_lens, const Tensor& c_lens, double smooth_in, double leaky_in,
                   const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps_in,
                   const Tensor& out, const Tensor& stats, Tensor& grad_q_out, Tensor& grad_c_out,
                   Tensor& grad_w_out, Tensor& grad_b_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // fp16 / bf16 out was rounded: recompute z rather than recover it as out * r.
  constexpr bool kRecomputeZ = !std::is_same_v<scalar_t, acc_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const acc_t smooth = static_cast<acc_t>(smooth_in), leaky = static_cast<acc_t>(leaky_in);
  const acc_t eps = static_cast<acc_t>(eps_in);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = queries.options().dtype(acc);

  Tensor grad_q = at::zeros({cfg.nq, cfg.lq, cfg.d}, acc_options);
  Tensor grad_c = at::zeros({cfg.nc, cfg.lc, cfg.d}, acc_options);
  const at::ScalarType gemm_dtype = queries.scalar_type();  // the GEMM operands' dtype, as in the forward
  Tensor wg, ba, grad_w, grad_b;
  if (cfg.linear()) {
    wg = weight->to(w_gemm_dtype(gemm_dtype, cfg.epilogue == kDistance, acc)).contiguous();  // as in the forward
    grad_w = at::zeros({cfg.m, cfg.d}, acc_options);
    if (has_value(bias)) {
      ba = bias->to(acc).contiguous();
      grad_b = at::zeros({cfg.m}, acc_options);
    }
  }

  if (cfg.nq > 0 && cfg.nc > 0) {
    const BlockPlan plan = plan_blocks(cfg, sizeof(acc_t));
    const Workspace ws = make_workspace<scalar_t>(cfg, plan, queries, contexts, q_lens, c_lens, stream);
    const int64_t max_pairs = plan.na * plan.nb, max_rows = max_pairs * cfg.lq;
    const Tensor dp_buf = at::empty({max_pairs * cfg.lq * cfg.lc}, acc_options);
    Tensor e_buf, de_buf, dz_buf, z_buf, gq_buf;
    if (cfg.linear()) {
      e_buf = at::empty({max_rows * cfg.d}, acc_options);  // E, then the direct dq terms
      de_buf = at::empty({max_rows * cfg.d}, acc_options);
      dz_buf = at::empty({max_rows * cfg.m}, acc_options);
      if (kRecomputeZ) z_buf = at::empty({max_rows * cfg.m}, acc_options);
    } else if (cfg.epilogue == kCosine) {
      gq_buf = at::empty({max_rows * cfg.d}, acc_options);
    }

    with_epilogue(cfg.epilogue, [&](auto tag) {
      constexpr int kEpi = decltype(tag)::value;
      constexpr bool kLinear = kEpi == kDistance || kEpi == kDirection;
      for_each_block(plan, cfg, [&](const Block& blk) {
        const BlockViews v = attend_block<acc_t>(cfg, blk, ws, smooth, leaky, eps, nullptr, stream);
        const int64_t rows = blk.rows();
        const unsigned int row_blocks = grid_stride_blocks(rows, kWarps);
        acc_t* cr = v.cr.data_ptr<acc_t>();
        const acc_t* ge = nullptr;
        acc_t* gq = nullptr;
        if constexpr (kLinear) {
          Tensor e = e_buf.narrow(0, 0, rows * cfg.d).view({rows, cfg.d});
          Tensor de = de_buf.narrow(0, 0, rows * cfg.d).view({rows, cfg.d});
          Tensor dz = dz_buf.narrow(0, 0, rows * cfg.m).view({rows, cfg.m});
          forward_rows_kernel<scalar_t, acc_t, kEpi><<<row_blocks, kThreads, 0, stream>>>(
              cr, e.data_ptr<acc_t>(), ws.qa.data_ptr<acc_t>(), ptr_or_null<acc_t>(ws.q_norm),
              ws.q_lens.data_ptr<int64_t>(), blk, cfg.d, eps, static_cast<scalar_t*>(nullptr));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const Tensor eg = e.to(wg.scalar_type());  // fp16 / bf16: E rounded, as in the forward
          const acc_t* z_ptr = nullptr;
          if constexpr (kRecomputeZ) {
            Tensor z = z_buf.narrow(0, 0, rows * cfg.m).view({rows, cfg.m});
            gemm(z, eg, wg.t());  // the forward's GEMM, same shapes and operands: the same z
            z_ptr = z.data_ptr<acc_t>();
          }
          dz_kernel<scalar_t, acc_t><<<row_blocks, kThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), z_ptr,
              ptr_or_null<acc_t>(ba), ws.q_lens.data_ptr<int64_t>(), blk, cfg.m, eps, dz.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (ba.defined()) grad_b.add_(dz.sum(0));
          const Tensor dzg = dz.to(wg.scalar_type());  // fp16 / bf16: rounded, as the Triton kernels round dz
          gemm(grad_w, dzg.t(), eg, true);       // (m, rows) @ (rows, d)
          gemm(de, dzg, wg);                     // (rows, m) @ (m, d)
          ge = de.data_ptr<acc_t>();
          gq = e.data_ptr<acc_t>();  // E is no longer needed: it takes the direct dq terms
        } else if constexpr (kEpi == kCosine) {
          gq = gq_buf.data_ptr<acc_t>();
        }
        backward_rows_kernel<scalar_t, acc_t, kEpi><<<row_blocks, kThreads, 0, stream>>>(
            cr, ge, kLinear ? nullptr : grad_out.data_ptr<scalar_t>(), ws.qa.data_ptr<acc_t>(),
            ptr_or_null<acc_t>(ws.q_norm), ws.q_lens.data_ptr<int64_t>(), blk, cfg.d, eps, gq);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // v.cr now holds dc_raw. Through c_raw = P @ C_b:
        Tensor dp = dp_buf.narrow(0, 0, blk.pairs() * cfg.lq * cfg.lc).view({blk.nb, blk.na * cfg.lq, cfg.lc});
        const Tensor crg = v.cr.to(gemm_dtype);  // fp16 / bf16: dc_raw rounded
        gemm(dp, crg, v.c3.transpose(1, 2));    // dP = dc_raw C_b^T
        Tensor grad_c_blk = grad_c.narrow(0, blk.b0, blk.nb);
        gemm(grad_c_blk, v.pg.transpose(1, 2), crg, true);  // dC_b += P^T dc_raw (sums a, j of the block)
        // Softmax, clipped l2 and leaky relu backward: dS over St.
        if (cfg.clipped) {
          attention_backward_kernel<acc_t, true>
              <<<static_cast<unsigned int>(blk.pairs()), kPairThreads, pair_shared_bytes<acc_t>(cfg), stream>>>(
                  v.st.data_ptr<acc_t>(), v.p.data_ptr<acc_t>(), dp.data_ptr<acc_t>(), ws.q_lens.data_ptr<int64_t>(),
                  ws.c_lens.data_ptr<int64_t>(), blk, smooth, leaky, eps);
        } else {
          attention_backward_kernel<acc_t, false>
              <<<static_cast<unsigned int>(blk.pairs()), kPairThreads, pair_shared_bytes<acc_t>(cfg), stream>>>(
                  v.st.data_ptr<acc_t>(), v.p.data_ptr<acc_t>(), dp.data_ptr<acc_t>(), ws.q_lens.data_ptr<int64_t>(),
                  ws.c_lens.data_ptr<int64_t>(), blk, smooth, leaky, eps);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // s = C_b Q_a^T: dQ_a += dS^T C_b (sums b, k), dC_b += dS Q_a (sums a, j).
        const Tensor stg = v.st.to(gemm_dtype);  // fp16 / bf16: dS rounded
        gemm(grad_q.narrow(0, blk.a0, blk.na).view({blk.na * cfg.lq, cfg.d}), stg, v.c2, true);
        gemm(grad_c_blk.view({blk.nb * cfg.lc, cfg.d}), stg.t(), v.q2, true);
        if (gq != nullptr && cfg.d > 0) {
          reduce_direct_q_kernel<acc_t>
              <<<grid_stride_blocks(blk.na * cfg.lq * cfg.d, kThreads), kThreads, 0, stream>>>(
                  gq, blk, cfg.d, grad_q.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }

  grad_q_out = grad_q.to(queries.scalar_type());
  grad_c_out = grad_c.to(contexts.scalar_type());
  grad_w_out = grad_w.defined() ? grad_w.to(weight->scalar_type()) : at::empty({0}, queries.options());
  grad_b_out = grad_b.defined() ? grad_b.to(bias->scalar_type()) : at::empty({0}, queries.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_attention_backward_cuda(
    const Tensor& grad_out_in, const Tensor& queries_in, const Tensor& contexts_in, const Tensor& query_lens_in,
    const Tensor& context_lens_in, double smooth, double leaky, c10::string_view norm, c10::string_view epilogue,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, const Tensor& out_in,
    const Tensor& stats_in) {
  const Config cfg = check_inputs(queries_in, contexts_in, query_lens_in, context_lens_in,
                                  std::string_view(norm.data(), norm.size()),
                                  std::string_view(epilogue.data(), epilogue.size()), weight, bias);
  const std::vector<int64_t> o_shape = out_shape(cfg);
  check_on_device(grad_out_in, "grad_out", queries_in);
  check_on_device(out_in, "out", queries_in);
  check_on_device(stats_in, "stats", queries_in);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(o_shape), "cross_attention (CUDA): grad_out must have shape ",
              at::IntArrayRef(o_shape), ", got ", grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef(o_shape), "cross_attention (CUDA): out must have shape ",
              at::IntArrayRef(o_shape), ", got ", out_in.sizes());
  TORCH_CHECK(stats_in.dim() == 4 && stats_in.size(0) == cfg.nq && stats_in.size(1) == cfg.nc &&
                  stats_in.size(2) == cfg.lq && stats_in.size(3) == 2,
              "cross_attention (CUDA): stats must have shape (", cfg.nq, ", ", cfg.nc, ", ", cfg.lq, ", 2), got ",
              stats_in.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out_in.scalar_type()) && at::isFloatingType(out_in.scalar_type()) &&
                  at::isFloatingType(stats_in.scalar_type()),
              "cross_attention (CUDA): grad_out, out and stats must be floating point");
  const c10::cuda::CUDAGuard guard(queries_in.device());
  const at::ScalarType dtype = queries_in.scalar_type(), acc = accumulation_type(dtype);
  const Tensor queries = queries_in.contiguous(), contexts = contexts_in.contiguous();
  const Tensor q_lens = query_lens_in.contiguous(), c_lens = context_lens_in.contiguous();
  // Read in the input dtype (autograd hands grad_out in out's dtype) and stats in acc.
  const Tensor grad_out = grad_out_in.to(dtype).contiguous(), out = out_in.to(dtype).contiguous();
  const Tensor stats = stats_in.to(acc).contiguous();
  Tensor grad_q, grad_c, grad_w, grad_b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cross_attention_backward_cuda", [&] {
    backward_impl<scalar_t>(cfg, grad_out, queries, contexts, q_lens, c_lens, smooth, leaky, weight, bias, eps, out,
                            stats, grad_q, grad_c, grad_w, grad_b);
  });
  return {grad_q, grad_c, grad_w, grad_b};
}

}  // namespace
}  // namespace sgfused

TORCH_LIBRARY_IMPL(sgfused, CUDA, m) {
  m.impl("cross_attention_forward", &sgfused::cross_attention_forward_cuda);
  m.impl("cross_attention_backward", &sgfused::cross_attention_backward_cuda);
}
