// Batched region-word cross-attention on the CPU (docs/cross_attention_contract.md).
//
// Forward: one fused kernel, cache-blocked. A work item is a group of up to
// kItemQuerySets query sets against a chunk of nb context sets, nb chosen so the
// item's (na * nb, Lq, d) attention contexts take about kItemBytes (L2 / nearby
// L3); the threads take items from a shared counter and each item writes its own
// disjoint slices of `out` and `stats`. Per item, with R = the sum of its query
// sets' lengths (the valid query rows are packed once, up front):
//   S   = C[chunk] (nb*Lc, d) @ Q[group's valid rows]^T (d, R)   one GEMM
//   one pass per pair over (k, j): leaky ReLU, clipped l2 norm over the valid j,
//       * smooth, softmax over the valid regions k (lse -> stats), written
//       transposed and compact as P (nb, R, Lc)
//   ctx = P @ C[b] for every b of the chunk                    one batched GEMM (nb, R, d)
//   one pass over the (b, r) rows: c = l2norm(ctx), then the epilogue: context /
//       cosine write `out` directly; distance / direction write W's input rows in
//       place
//   z   = rows @ W^T                                           one GEMM (nb*R, m)
//   one pass over (b, r): + bias, n = ||z||, out = z / (n + eps), n -> stats
// bf16 inputs run the three GEMMs in bf16 (fp32 accumulation inside) where the CPU has bf16 dot
// instructions (bf16_gemm.h); everything else runs in the accumulation dtype. Padded query rows j >=
// len are written as 0 (out and stats); nothing of size (Nq, Nc, Lq, d) or (Nq, Nc, Lq, Lc) is ever
// held unless "context" asks for it. Results do not depend on which thread runs an item:
// deterministic.
//
// Backward: the same work items, in the accumulation dtype. Per item it recomputes
// S, P and ctx (flash-attention style), then per row the epilogue's backward: for
// distance / direction dz from the saved output and norm, e again, dW += dz^T e and
// d(e) = dz W (two GEMMs with W instead of the forward's one plus two), then
// d(ctx) through the l2norm; then d(P) = d(ctx) C^T, dC += P^T d(ctx), the softmax
// and clipped-norm backward per pair into dS, dQ += dS^T C and dC += dS Q. Each
// thread takes a fixed range of query groups with all their context chunks, so
// query gradients are private; context / weight / bias gradients are per-range
// partial sums added in range order: deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "bf16_gemm.h"
#include "dot.h"

#include "../input_checks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sgfused {
namespace {

using at::Tensor;
using at::indexing::Slice;

constexpr int64_t kItemQuerySets = 8;             // query sets per work item
constexpr int64_t kItemBytes = int64_t(2) << 20;  // a work item's (pairs, Lq, d) attention contexts

struct Options {
  double smooth, leaky, eps;
  bool clipped, context, cosine, distance, direction;
};

Options make_options(double smooth, double leaky, c10::string_view norm, c10::string_view epilogue, double eps) {
  TORCH_CHECK(norm == "clipped_l2" || norm == "none", "norm must be 'clipped_l2' or 'none', got '", norm, "'");
  TORCH_CHECK(epilogue == "context" || epilogue == "cosine" || epilogue == "distance" || epilogue == "direction",
              "epilogue must be 'context', 'cosine', 'distance' or 'direction', got '", epilogue, "'");
  return {smooth, leaky, eps, norm == "clipped_l2", epilogue == "context", epilogue == "cosine",
          epilogue == "distance", epilogue == "direction"};
}

struct Inputs {
  Tensor queries, contexts, q_valid, weight, bias;  // acc dtype (contexts: as asked), q_valid bool (Nq, Lq)
  int64_t nq, lq, nc, lc, d, m;
};

Inputs make_inputs(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                   const Tensor& context_lens, const std::optional<Tensor>& weight,
                   const std::optional<Tensor>& bias, const Options& o,
                   std::optional<at::ScalarType> context_dtype = std::nullopt) {
  TORCH_CHECK(queries.dim() == 3 && contexts.dim() == 3 && queries.size(2) == contexts.size(2),
              "queries (Nq, Lq, d) and contexts (Nc, Lc, d) must be 3-D with equal d, got ", queries.sizes(), " and ",
              contexts.sizes());
  TORCH_CHECK(queries.scalar_type() == contexts.scalar_type() && at::isFloatingType(queries.scalar_type()),
              "queries and contexts must share a floating dtype");
  for (const Tensor* t : {&queries, &contexts, &query_lens, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), "cross_attention (CPU): tensors must be on the CPU, got ", t->device());
  check_lengths(query_lens, queries.size(0), queries.size(1), "query_lens");
  check_lengths(context_lens, contexts.size(0), contexts.size(1), "context_lens");
  const auto acc = at::toOpMathType(queries.scalar_type());
  Inputs in;
  in.nq = queries.size(0), in.lq = queries.size(1), in.nc = contexts.size(0), in.lc = contexts.size(1);
  in.d = queries.size(2);
  in.queries = queries.to(acc).contiguous();
  // Padded regions are zeroed: the attention gives them weight 0, and 0 * NaN would still be NaN.
  const Tensor c_valid = at::arange(in.lc, context_lens.options()).unsqueeze(0) < context_lens.unsqueeze(1);
  in.contexts = at::where(c_valid.unsqueeze(2), contexts.to(context_dtype.value_or(acc)), 0).contiguous();
  in.q_valid = at::arange(in.lq, query_lens.options()).unsqueeze(0) < query_lens.unsqueeze(1);      // (Nq, Lq)
  in.m = 0;
  if (o.distance || o.direction) {
    TORCH_CHECK(weight.has_value() && weight->defined(), "the distance / direction epilogues need weight (m, d)");
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == in.d, "weight must be (m, ", in.d, "), got ", weight->sizes());
    in.m = weight->size(0);
    in.weight = weight->to(acc).contiguous();
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == in.m, "bias must be (", in.m, "), got ", bias->sizes());
      in.bias = bias->to(acc).contiguous();
    }
  }
  return in;
}

std::vector<int64_t> out_shape(const Inputs& in, const Options& o) {
  if (o.cosine) return {in.nq, in.nc, in.lq};
  return {in.nq, in.nc, in.lq, o.context ? in.d : in.m};
}

// Scores s[k * ld + j] (k < clen, j < len) of one (query set, context set) pair -> attention
// p[j * lc + k] (p = 0 for the padded regions k >= clen) and lse[j] = log sum_k exp(smooth * t[k, j]).
// s is overwritten; sum: scratch of len.
template <typename T, typename P>
void attention(T* s, int64_t ld, int64_t lc, int64_t clen, int64_t len, const Options& o, P* p, T* lse, T* sum) {
  const T leaky = o.leaky, smooth = o.smooth, eps = o.eps;
  for (int64_t k = 0; k < clen; ++k) {
    T* row = s + k * ld;
    if (o.clipped) {
      for (int64_t j = 0; j < len; ++j) row[j] = row[j] > 0 ? row[j] : row[j] * leaky;
      const T r = std::sqrt(dot(row, row, len)) + eps;
      for (int64_t j = 0; j < len; ++j) row[j] = row[j] / r * smooth;
    } else {
      for (int64_t j = 0; j < len; ++j) row[j] *= smooth;
    }
  }
  T* top = lse;  // the max over k, until lse is known
  std::copy(s, s + len, top);
  for (int64_t k = 1; k < clen; ++k)
    for (int64_t j = 0; j < len; ++j) top[j] = std::max(top[j], s[k * ld + j]);
  std::fill(sum, sum + len, T(0));
  for (int64_t k = 0; k < clen; ++k) {
    T* row = s + k * ld;
    for (int64_t j = 0; j < len; ++j) {
      row[j] = std::exp(row[j] - top[j]);
      sum[j] += row[j];
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    lse[j] = std::log(sum[j]) + top[j];
    sum[j] = T(1) / sum[j];
  }
  for (int64_t j = 0; j < len; ++j) {
    P* pj = p + j * lc;
    for (int64_t k = 0; k < clen; ++k) pj[k] = P(s[k * ld + j] * sum[j]);
    std::fill(pj + clen, pj + lc, P(0));
  }
}

// How the (query set, context set) pairs are cut into work items: groups of na query sets x chunks
// of nb context sets, nb chosen so that an item's (pairs, Lq, d) attention contexts take about
// kItemBytes. The valid query rows are packed once: query set a's are rows [first[a], first[a + 1]).
struct Plan {
  int64_t na, nb, chunks, items;
  std::vector<int64_t> first;
  Tensor packed;  // (sum of query_lens, d), acc dtype
};

Plan make_plan(const Inputs& in, const int64_t* q_lens) {
  Plan p;
  p.na = std::max<int64_t>(1, std::min(in.nq, kItemQuerySets));
  const int64_t bytes = p.na * in.lq * in.d * in.queries.element_size();
  p.nb = std::max<int64_t>(1, std::min<int64_t>(in.nc, kItemBytes / std::max<int64_t>(1, bytes)));
  p.chunks = (in.nc + p.nb - 1) / p.nb;
  p.items = p.chunks * ((in.nq + p.na - 1) / p.na);
  p.first.assign(in.nq + 1, 0);
  for (int64_t a = 0; a < in.nq; ++a) p.first[a + 1] = p.first[a] + q_lens[a];
  p.packed = in.queries.view({in.nq * in.lq, in.d}).index({in.q_valid.view(-1)});
  return p;
}

// One work item: context sets [b0, b0 + nbi) x query sets [a0, a0 + nai), whose packed rows are
// [row0, row0 + R); its rows r < R are its packed query rows, and (b, r) indexes the rows of its pairs.
struct Item {
  int64_t b0, nbi, a0, nai, row0, R;
};

Item item_at(const Plan& p, const Inputs& in, int64_t item) {
  Item it;
  it.b0 = item % p.chunks * p.nb, it.nbi = std::min(in.nc, it.b0 + p.nb) - it.b0;
  it.a0 = item / p.chunks * p.na, it.nai = std::min(in.nq, it.a0 + p.na) - it.a0;
  it.row0 = p.first[it.a0], it.R = p.first[it.a0 + it.nai] - it.row0;
  return it;
}

// The first half of an item, for the forward and for the backward's recomputation: S = C[chunk]
// Q[rows]^T into `raw` (the GEMM dtype G), then in acc_t into `scores` (the same tensor unless G
// rounds), which the softmax overwrites; attention P into `probs` (nbi, R, Lc), contexts P C[b] into
// `ctx` (nbi, R, d). on_lse(i, b, lse) receives each pair's log-sum-exp over its valid query rows.
template <typename A, typename G, typename OnLse>
void attend_item(const Options& o, const Inputs& in, const Plan& p, const Item& it, const Tensor& rows,
                 const Tensor& chunk, const int64_t* q_lens, const int64_t* c_lens, Tensor& raw, Tensor& scores,
                 Tensor& probs, Tensor& ctx, std::vector<A>& lse, std::vector<A>& sum, OnLse on_lse) {
  const int64_t lc = in.lc, R = it.R, n = it.nbi * lc * R;
  Tensor s = raw.narrow(0, 0, n).view({it.nbi * lc, R});
  at::mm_out(s, chunk.view({it.nbi * lc, in.d}), rows.narrow(0, it.row0, R).t());
  if (!scores.is_same(raw)) scores.narrow(0, 0, n).copy_(s.view(-1));
  A* sp = scores.data_ptr<A>();
  G* pp = probs.data_ptr<G>();
  for (int64_t b = 0; b < it.nbi; ++b)
    for (int64_t i = 0; i < it.nai; ++i) {
      const int64_t r0 = p.first[it.a0 + i] - it.row0;
      attention(sp + b * lc * R + r0, R, lc, c_lens[it.b0 + b], q_lens[it.a0 + i], o, pp + (b * R + r0) * lc,
                lse.data(), sum.data());
      on_lse(i, b, lse);
    }
  Tensor c = ctx.narrow(0, 0, it.nbi * R * in.d).view({it.nbi, R, in.d});
  at::bmm_out(c, probs.narrow(0, 0, it.nbi * R * lc).view({it.nbi, R, lc}), chunk);
}

// The fused forward (see the top of the file). scalar_t: input / output dtype.
// gemm_t: bf16 for bf16 inputs on a CPU with bf16 dot instructions, so that the three GEMMs run on
// them (fp32 accumulation inside; the scores, attention weights, contexts and z are rounded to bf16
// once); else acc_t.
template <typename scalar_t, typename gemm_t>
void forward_kernel(const Options& o, const Inputs& in, const int64_t* q_lens, const int64_t* c_lens, Tensor& out,
                    Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kRoundGemm = !std::is_same_v<gemm_t, acc_t>;
  const auto gemm_dtype = c10::CppTypeToScalarType<gemm_t>::value;
  const int64_t lq = in.lq, nc = in.nc, lc = in.lc, d = in.d, m = in.m;
  const bool project = o.distance || o.direction;
  const int64_t width = o.cosine ? 1 : (o.context ? d : m);  // out values per (a, b, j)
  const Plan plan = make_plan(in, q_lens);
  const int64_t na = plan.na, nb = plan.nb, items = plan.items;
  const std::vector<int64_t>& first = plan.first;
  const Tensor weight_t = project ? in.weight.to(gemm_dtype).t() : Tensor();
  const Tensor packed_g = plan.packed.to(gemm_dtype);
  const acc_t* q = plan.packed.data_ptr<acc_t>();
  const acc_t* bias = in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr;
  const acc_t eps = o.eps;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  acc_t* stats_p = stats.data_ptr<acc_t>();

  // Worker threads run the ATen calls below under the caller's dispatch state (below autograd: leaves
  // that require grad must not reach mm_out's autograd check).
  const at::ThreadLocalState caller;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state(caller);
    // Per-thread scratch, reused by all the items the thread takes.
    const auto acc_options = in.queries.options(), gemm_options = packed_g.options();
    Tensor scores_g = at::empty({nb * lc * na * lq}, gemm_options);
    Tensor scores = kRoundGemm ? at::empty({nb * lc * na * lq}, acc_options) : scores_g;
    Tensor probs = at::empty({nb * na * lq * lc}, gemm_options);
    Tensor ctx = at::empty({nb * na * lq * d}, gemm_options);  // then W's input rows, in place
    Tensor z = at::empty({project ? nb * na * lq * m : 0}, gemm_options);
    std::vector<acc_t> lse(lq), sum(lq), q_norm(na * lq), q_unit(o.direction ? na * lq * d : 0), z_row(m);
    std::vector<acc_t> c_row(kRoundGemm ? d : 0);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      const Item it = item_at(plan, in, item);
      const int64_t b0 = it.b0, nbi = it.nbi, a0 = it.a0, nai = it.nai, row0 = it.row0, R = it.R;
      const acc_t* qg = q + row0 * d;                       // the item's query rows
      const Tensor chunk = in.contexts.narrow(0, b0, nbi);  // (nbi, Lc, d), gemm_t

      // Scores of all the item's pairs, attention, contexts.
      attend_item<acc_t, gemm_t>(o, in, plan, it, packed_g, chunk, q_lens, c_lens, scores_g, scores, probs, ctx, lse,
                                 sum, [&](int64_t i, int64_t b, const std::vector<acc_t>& pair_lse) {
                                   acc_t* st = stats_p + ((a0 + i) * nc + b0 + b) * lq * 2;
                                   for (int64_t j = 0; j < q_lens[a0 + i]; ++j) st[2 * j + 1] = pair_lse[j];
                                 });

      // c = l2norm(ctx), then the epilogue: out directly (context, cosine) or W's input rows.
      for (int64_t r = 0; r < R; ++r) {
        const acc_t* qr = qg + r * d;
        q_norm[r] = std::sqrt(dot(qr, qr, d));
        if (o.direction)
          for (int64_t e = 0; e < d; ++e) q_unit[r * d + e] = qr[e] / (q_norm[r] + eps);
      }
      gemm_t* cp = ctx.data_ptr<gemm_t>();
      for (int64_t b = 0; b < nbi; ++b)
        for (int64_t i = 0; i < nai; ++i) {
          const int64_t len = q_lens[a0 + i], pair = ((a0 + i) * nc + b0 + b) * lq;  // out / stats row of j = 0
          const int64_t r0 = first[a0 + i] - row0;
          for (int64_t j = 0; j < len; ++j) {
            const int64_t r = b * R + r0 + j;
            gemm_t* row = cp + r * d;  // the context row, then (distance, direction) W's input row
            acc_t* cr;
            if constexpr (kRoundGemm) {
              std::copy(row, row + d, c_row.begin());
              cr = c_row.data();
            } else {
              cr = row;
            }
            const acc_t* qj = qg + (r0 + j) * d;
            scalar_t* dst = out_p + (pair + j) * width;
            const acc_t n_raw = std::sqrt(dot(cr, cr, d)) + eps;
            if (o.context) {
              for (int64_t e = 0; e < d; ++e) dst[e] = scalar_t(cr[e] / n_raw);
            } else if (o.distance) {
              for (int64_t e = 0; e < d; ++e) {
                const acc_t diff = cr[e] / n_raw - qj[e];
                row[e] = gemm_t(diff * diff);
              }
            } else {  // cosine, direction: c, its norm, then c against q
              for (int64_t e = 0; e < d; ++e) cr[e] /= n_raw;
              const acc_t n = std::sqrt(dot(cr, cr, d));
              if (o.cosine) {
                dst[0] = scalar_t(dot(cr, qj, d) / std::max(n * q_norm[r0 + j], eps));
              } else {
                const acc_t* qu = q_unit.data() + (r0 + j) * d;
                for (int64_t e = 0; e < d; ++e) row[e] = gemm_t(cr[e] / (n + eps) * qu[e]);
              }
            }
          }
          std::fill(out_p + (pair + len) * width, out_p + (pair + lq) * width, scalar_t(0));
        }
      if (!project) continue;

      // z = rows W^T, + bias, l2 normalised into out; its norm into stats.
      Tensor zv = z.narrow(0, 0, nbi * R * m).view({nbi * R, m});
      at::mm_out(zv, ctx.narrow(0, 0, nbi * R * d).view({nbi * R, d}), weight_t);
      const gemm_t* zp = zv.data_ptr<gemm_t>();
      for (int64_t b = 0; b < nbi; ++b)
        for (int64_t i = 0; i < nai; ++i) {
          const int64_t pair = ((a0 + i) * nc + b0 + b) * lq, r0 = first[a0 + i] - row0;
          for (int64_t j = 0; j < q_lens[a0 + i]; ++j) {
            const gemm_t* zr = zp + (b * R + r0 + j) * m;
            for (int64_t e = 0; e < m; ++e) z_row[e] = acc_t(zr[e]) + (bias ? bias[e] : acc_t(0));
            const acc_t n = std::sqrt(dot(z_row.data(), z_row.data(), m));
            scalar_t* dst = out_p + (pair + j) * m;
            for (int64_t e = 0; e < m; ++e) dst[e] = scalar_t(z_row[e] / (n + eps));
            stats_p[(pair + j) * 2] = n;
          }
        }
    }
  });
}

// l2norm backward of one row: for u = v / (||v|| + eps), dv = du / r - v (v . du) / (r^2 ||v||), r = ||v|| + eps.
template <typename T>
void l2norm_backward_row(const T* v, const T* du, int64_t n, T eps, T* dv) {
  const T norm = std::sqrt(dot(v, v, n)), r = norm + eps;
  const T along = norm > 0 ? dot(v, du, n) / (r * r * norm) : T(0);
  for (int64_t e = 0; e < n; ++e) dv[e] = du[e] / r - v[e] * along;
}

// Attention backward of one (query set, context set) pair, in place on the pair's block of the item
// buffers: raw scores s[k * ld + j] (k < clen, j < len), attention p[j * lc + k] and its gradient
// dp[j * lc + k] -> ds[k * ld + j] (the scores' gradient; 0 at padded regions k >= clen).
// scratch: 2 * len values.
template <typename T>
void attention_backward(const T* s, int64_t ld, int64_t lc, int64_t clen, int64_t len, const Options& o, const T* p,
                        const T* dp, T* ds, T* scratch) {
  const T leaky = o.leaky, smooth = o.smooth, eps = o.eps;
  T* inner = scratch;  // per j: sum_k p dp (softmax backward)
  T* lr = scratch + len;
  for (int64_t j = 0; j < len; ++j) inner[j] = dot(p + j * lc, dp + j * lc, clen);
  for (int64_t k = 0; k < lc; ++k) {
    T* dsk = ds + k * ld;
    if (k >= clen) {
      std::fill(dsk, dsk + len, T(0));
      continue;
    }
    for (int64_t j = 0; j < len; ++j)  // d(logits) * smooth = d(t)
      dsk[j] = p[j * lc + k] * (dp[j * lc + k] - inner[j]) * smooth;
    if (!o.clipped) continue;
    const T* sk = s + k * ld;
    for (int64_t j = 0; j < len; ++j) lr[j] = sk[j] > 0 ? sk[j] : sk[j] * leaky;
    const T norm = std::sqrt(dot(lr, lr, len)), r = norm + eps;
    const T along = norm > 0 ? dot(lr, dsk, len) / (r * r * norm) : T(0);
    for (int64_t j = 0; j < len; ++j) dsk[j] = (dsk[j] / r - lr[j] * along) * (sk[j] > 0 ? T(1) : leaky);
  }
}

// The fused backward, in acc_t (T). Work items are those of the forward; the item list is cut into
// one contiguous range per thread, of about equal work (pairs x rows), and each range accumulates
// its own partial gradients, added in range order at the end (deterministic for a given thread count).
template <typename T>
void backward_kernel(const Options& o, const Inputs& in, const int64_t* q_lens, const int64_t* c_lens,
                     const Tensor& grad_out, const Tensor& out, const Tensor& stats, Tensor& grad_packed,
                     Tensor& grad_c, Tensor& grad_w, Tensor& grad_b) {
  const int64_t lq = in.lq, nc = in.nc, lc = in.lc, d = in.d, m = in.m;
  const bool project = o.distance || o.direction;
  const int64_t width = o.cosine ? 1 : (o.context ? d : m);
  const Plan plan = make_plan(in, q_lens);
  const int64_t na = plan.na, nb = plan.nb, items = plan.items;
  const std::vector<int64_t>& first = plan.first;
  const int64_t ranges = std::min<int64_t>(at::get_num_threads(), items);
  std::vector<int64_t> work(items + 1, 0), bounds(ranges + 1, items);  // work: prefix sums of the items' work
  for (int64_t item = 0; item < items; ++item) {
    const Item it = item_at(plan, in, item);
    work[item + 1] = work[item] + it.nbi * it.R;
  }
  for (int64_t t = 0; t < ranges; ++t)
    bounds[t] = std::lower_bound(work.begin(), work.end(), work[items] * t / ranges) - work.begin();
  const T* q = plan.packed.data_ptr<T>();
  const T* g_p = grad_out.data_ptr<T>();
  const T* out_p = out.data_ptr<T>();
  const T* stats_p = stats.data_ptr<T>();
  const T eps = o.eps;
  std::vector<Tensor> part_q(ranges), part_c(ranges), part_w(ranges), part_b(ranges);
  for (int64_t t = 0; t < ranges; ++t) {
    part_q[t] = t == 0 ? grad_packed : at::zeros_like(grad_packed);
    part_c[t] = t == 0 ? grad_c : at::zeros_like(grad_c);
    part_w[t] = t == 0 || !project ? grad_w : at::zeros_like(grad_w);
    part_b[t] = t == 0 || !in.bias.defined() ? grad_b : at::zeros_like(grad_b);
  }

  const at::ThreadLocalState caller;
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state(caller);
    const auto options = in.queries.options();
    const int64_t rows_max = nb * na * lq;
    Tensor raw = at::empty({nb * lc * na * lq}, options), scores = at::empty_like(raw), d_s = at::empty_like(raw);
    Tensor probs = at::empty({rows_max * lc}, options), d_p = at::empty_like(probs);
    Tensor ctx = at::empty({rows_max * d}, options), e_rows = at::empty_like(ctx), d_ctx = at::empty_like(ctx);
    Tensor dz = at::empty({project ? rows_max * m : 0}, options);
    std::vector<T> lse(lq), sum(lq), scratch(2 * lq), n_ctx(rows_max), dc_row(d), tmp(d);
    for (int64_t t = begin; t < end; ++t)
      for (int64_t item = bounds[t]; item < bounds[t + 1]; ++item) {
        const Item it = item_at(plan, in, item);
        const int64_t b0 = it.b0, nbi = it.nbi, a0 = it.a0, nai = it.nai, row0 = it.row0, R = it.R;
        const T* qg = q + row0 * d;
        T* gq = part_q[t].data_ptr<T>() + row0 * d;
        const Tensor chunk = in.contexts.narrow(0, b0, nbi);  // (nbi, Lc, d)

        // Recompute the attention (the forward's first half); raw keeps the scores.
        attend_item<T, T>(o, in, plan, it, plan.packed, chunk, q_lens, c_lens, raw, scores, probs, ctx, lse, sum,
                          [](int64_t, int64_t, const std::vector<T>&) {});
        const Tensor p3 = probs.narrow(0, 0, nbi * R * lc).view({nbi, R, lc});

        // Per row: the epilogue's backward -> d(context) (in d_ctx) and the direct query gradient;
        // distance / direction first need dz and, through W, d(e).
        T* cp = ctx.data_ptr<T>();
        T* ep = e_rows.data_ptr<T>();
        T* dcp = d_ctx.data_ptr<T>();
        auto for_rows = [&](auto&& body) {
          for (int64_t b = 0; b < nbi; ++b)
            for (int64_t i = 0; i < nai; ++i) {
              const int64_t r0 = first[a0 + i] - row0, pair = ((a0 + i) * nc + b0 + b) * lq;
              for (int64_t j = 0; j < q_lens[a0 + i]; ++j) body(b * R + r0 + j, r0 + j, pair + j);
            }
        };
        for_rows([&](int64_t r, int64_t, int64_t) {  // c = l2norm(ctx), in place; n_ctx keeps ||ctx||
          T* cr = cp + r * d;
          n_ctx[r] = std::sqrt(dot(cr, cr, d));
          for (int64_t e = 0; e < d; ++e) cr[e] /= n_ctx[r] + eps;
        });
        if (project) {
          T* dzp = dz.data_ptr<T>();
          for_rows([&](int64_t r, int64_t qr, int64_t o_row) {
            const T* c = cp + r * d;
            const T* qj = qg + qr * d;
            T* er = ep + r * d;
            if (o.distance) {
              for (int64_t e = 0; e < d; ++e) er[e] = (c[e] - qj[e]) * (c[e] - qj[e]);
            } else {
              const T nc_ = std::sqrt(dot(c, c, d)), nq_ = std::sqrt(dot(qj, qj, d));
              for (int64_t e = 0; e < d; ++e) er[e] = c[e] / (nc_ + eps) * (qj[e] / (nq_ + eps));
            }
            // dz = g / r - u (u . g) / n with u = out, n = ||z||, r = n + eps
            const T* u = out_p + o_row * m;
            const T* g = g_p + o_row * m;
            const T n = stats_p[o_row * 2];
            const T along = n > 0 ? dot(u, g, m) / n : T(0);
            T* dzr = dzp + r * m;
            for (int64_t e = 0; e < m; ++e) dzr[e] = g[e] / (n + eps) - u[e] * along;
          });
          const Tensor dz2 = dz.narrow(0, 0, nbi * R * m).view({nbi * R, m});
          part_w[t].addmm_(dz2.t(), e_rows.narrow(0, 0, nbi * R * d).view({nbi * R, d}));
          if (in.bias.defined()) part_b[t].add_(dz2.sum(0));
          Tensor de = e_rows.narrow(0, 0, nbi * R * d).view({nbi * R, d});  // e is spent: d(e) takes its place
          at::mm_out(de, dz2, in.weight);
        }
        for_rows([&](int64_t r, int64_t qr, int64_t o_row) {
          const T* c = cp + r * d;
          const T* qj = qg + qr * d;
          T* gqr = gq + qr * d;
          const T* g = g_p + o_row * width;
          if (o.context) {
            std::copy(g, g + d, dc_row.begin());
          } else if (o.cosine) {
            const T nc_ = std::sqrt(dot(c, c, d)), nq_ = std::sqrt(dot(qj, qj, d));
            const T den = nc_ * nq_, value = dot(c, qj, d) / std::max(den, eps);
            const bool big = den > eps;
            const T safe = big ? den : eps;
            const T along_c = big ? value / std::max(nc_ * nc_, T(1e-30)) : T(0);
            const T along_q = big ? value / std::max(nq_ * nq_, T(1e-30)) : T(0);
            for (int64_t e = 0; e < d; ++e) {
              dc_row[e] = g[0] * (qj[e] / safe - along_c * c[e]);
              gqr[e] += g[0] * (c[e] / safe - along_q * qj[e]);
            }
          } else if (o.distance) {
            const T* de = ep + r * d;
            for (int64_t e = 0; e < d; ++e) {
              dc_row[e] = 2 * (c[e] - qj[e]) * de[e];
              gqr[e] -= dc_row[e];
            }
          } else {  // direction: e = l2norm(c) * l2norm(q)
            const T* de = ep + r * d;
            const T nc_ = std::sqrt(dot(c, c, d)), nq_ = std::sqrt(dot(qj, qj, d));
            for (int64_t e = 0; e < d; ++e) tmp[e] = de[e] * qj[e] / (nq_ + eps);
            l2norm_backward_row(c, tmp.data(), d, eps, dc_row.data());
            for (int64_t e = 0; e < d; ++e) tmp[e] = de[e] * c[e] / (nc_ + eps);
            l2norm_backward_row(qj, tmp.data(), d, eps, tmp.data());
            for (int64_t e = 0; e < d; ++e) gqr[e] += tmp[e];
          }
          // d(raw context) from c = ctx / (n + eps): dctx = dc / (n + eps) - c (c . dc) / n
          const T n = n_ctx[r], along = n > 0 ? dot(c, dc_row.data(), d) / n : T(0);
          T* dv = dcp + r * d;
          for (int64_t e = 0; e < d; ++e) dv[e] = dc_row[e] / (n + eps) - c[e] * along;
        });

        // Back through ctx = p C and the attention: C gets p^T d(ctx) and dS^T Q, Q gets dS C.
        const Tensor dctx3 = d_ctx.narrow(0, 0, nbi * R * d).view({nbi, R, d});
        Tensor dp3 = d_p.narrow(0, 0, nbi * R * lc).view({nbi, R, lc});
        at::bmm_out(dp3, dctx3, chunk.transpose(1, 2));
        Tensor gc = part_c[t].narrow(0, b0, nbi);  // (nbi, Lc, d)
        gc.baddbmm_(p3.transpose(1, 2), dctx3);
        T* dsp = d_s.data_ptr<T>();
        const T* rp = raw.data_ptr<T>();
        const T* pp = probs.data_ptr<T>();
        for (int64_t b = 0; b < nbi; ++b)
          for (int64_t i = 0; i < nai; ++i) {
            const int64_t r0 = first[a0 + i] - row0, len = q_lens[a0 + i];
            attention_backward(rp + b * lc * R + r0, R, lc, c_lens[b0 + b], len, o, pp + (b * R + r0) * lc,
                               dp3.data_ptr<T>() + (b * R + r0) * lc, dsp + b * lc * R + r0, scratch.data());
          }
        const Tensor ds2 = d_s.narrow(0, 0, nbi * lc * R).view({nbi * lc, R});
        part_q[t].narrow(0, row0, R).addmm_(ds2.t(), chunk.view({nbi * lc, d}));
        gc.view({nbi * lc, d}).addmm_(ds2, plan.packed.narrow(0, row0, R));
      }
  });
  for (int64_t t = 1; t < ranges; ++t) {
    grad_packed.add_(part_q[t]);
    grad_c.add_(part_c[t]);
    if (project) grad_w.add_(part_w[t]);
    if (in.bias.defined()) grad_b.add_(part_b[t]);
  }
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                                       const Tensor& context_lens, double smooth, double leaky,
                                       c10::string_view norm, c10::string_view epilogue,
                                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                       double eps) {
  const Options o = make_options(smooth, leaky, norm, epilogue, eps);
  const bool bf16_gemm = bf16_gemm_for(queries.scalar_type());
  const Inputs in = make_inputs(queries, contexts, query_lens, context_lens, weight, bias, o,
                                bf16_gemm ? at::kBFloat16  // gemm_t of forward_kernel
                                          : at::toOpMathType(queries.scalar_type()));
  const Tensor q_lens = query_lens.contiguous(), c_lens = context_lens.contiguous();
  Tensor out = at::empty(out_shape(in, o), queries.options());
  Tensor stats = at::zeros({in.nq, in.nc, in.lq, 2}, in.queries.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "cross_attention_forward_cpu", [&] {
    with_gemm_type<scalar_t>(bf16_gemm, [&](auto gemm) {
      forward_kernel<scalar_t, decltype(gemm)>(o, in, q_lens.data_ptr<int64_t>(), c_lens.data_ptr<int64_t>(), out,
                                               stats);
    });
  });
  return {out, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_out, const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
    const Tensor& context_lens, double smooth, double leaky, c10::string_view norm, c10::string_view epilogue,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, const Tensor& out,
    const Tensor& stats) {
  const Options o = make_options(smooth, leaky, norm, epilogue, eps);
  const Inputs in = make_inputs(queries, contexts, query_lens, context_lens, weight, bias, o);
  const auto acc = in.queries.scalar_type();
  const Tensor q_lens = query_lens.contiguous(), c_lens = context_lens.contiguous();
  const int64_t rows = in.nq > 0 ? q_lens.sum().item<int64_t>() : 0;
  Tensor grad_packed = at::zeros({rows, in.d}, in.queries.options()), grad_c = at::zeros_like(in.contexts);
  Tensor grad_w = in.weight.defined() ? at::zeros_like(in.weight) : at::empty({0}, in.queries.options());
  Tensor grad_b = in.bias.defined() ? at::zeros_like(in.bias) : at::empty({0}, in.queries.options());
  const bool project = o.distance || o.direction;
  AT_DISPATCH_FLOATING_TYPES(acc, "cross_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(o, in, q_lens.data_ptr<int64_t>(), c_lens.data_ptr<int64_t>(),
                              grad_out.to(acc).contiguous(),
                              project ? out.to(acc).contiguous() : at::empty({0}, in.queries.options()),
                              stats.contiguous(), grad_packed, grad_c, grad_w, grad_b);
  });
  Tensor grad_q = at::zeros_like(in.queries);
  grad_q.view({in.nq * in.lq, in.d}).index_put_({in.q_valid.view(-1)}, grad_packed);
  return {grad_q.to(queries.scalar_type()), grad_c.to(contexts.scalar_type()),
          grad_w.to(queries.scalar_type()), grad_b.to(queries.scalar_type())};  // empty ones too, in their dtype
}

}  // namespace

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("cross_attention_forward", &forward_cpu);
  m.impl("cross_attention_backward", &backward_cpu);
}

}  // namespace sgfused
