// Batched region-word cross-attention on the CPU (DESIGN §1, docs/cross_attention_contract.md).
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
//       place (bf16 for bf16 inputs, else the accumulation dtype)
//   z   = rows @ W^T                                           one GEMM (nb*R, m)
//   one pass over (b, r): + bias, n = ||z||, out = z / (n + eps), n -> stats
// Padded query rows j >= len are written as 0 (out and stats); nothing of size
// (Nq, Nc, Lq, d) or (Nq, Nc, Lq, Lc) is ever held unless "context" asks for it.
// Results do not depend on which thread runs an item: deterministic.
//
// Backward (ATen composition) processes query sets a block at a time
// (kBlockBytes): it recomputes the block's attention from the inputs
// (flash-attention style) and reuses the saved output and epilogue norms for the
// W part, so it costs two GEMMs with W instead of three. Gradients for the
// queries of a block are complete after the block; context gradients are summed
// over blocks in block order. All reductions are ATen's, in a fixed order:
// deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

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

constexpr int64_t kBlockBytes = int64_t(16) << 20;  // backward: per block buffer (below glibc's mmap threshold)
constexpr int64_t kItemQuerySets = 8;               // forward: query sets per work item
constexpr int64_t kItemBytes = int64_t(2) << 20;    // forward: a work item's (pairs, Lq, d) attention contexts

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

Tensor vector_norm(const Tensor& v, int64_t dim) { return at::linalg_vector_norm(v, 2, {dim}, true); }

Tensor l2norm(const Tensor& v, double eps) { return v / (vector_norm(v, -1) + eps); }

// For u = v / (||v|| + eps) along the last dim: dv = du / r - v (v . du) / (r^2 ||v||), r = ||v|| + eps.
Tensor l2norm_backward(const Tensor& v, const Tensor& du, double eps) {
  const Tensor n = vector_norm(v, -1), r = n + eps;
  const Tensor along = at::where(n > 0, (v * du).sum(-1, true) / (r * r * n), at::zeros_like(n));
  return du / r - v * along;
}

// Everything the forward computes for one block of query sets, kept for its backward.
struct Attention {
  Tensor q;        // (B, Lq, d) acc
  Tensor s;        // (B, Nc, Lc, Lq) raw scores
  Tensor p;        // (B, Nc, Lc, Lq) softmax over k
  Tensor c_raw;    // (B, Nc, Lq, d)
  Tensor c;        // l2norm(c_raw)
  Tensor lse;      // (B, Nc, Lq) log-sum-exp of the logits
  Tensor q_valid;  // (B, 1, 1, Lq)
};

Attention attend(const Tensor& q, const Tensor& contexts, const Tensor& c_valid, const Tensor& q_valid,
                 const Options& o) {
  Attention a;
  a.q = q;
  a.q_valid = q_valid;
  a.s = at::matmul(contexts.unsqueeze(0), q.transpose(1, 2).unsqueeze(1));  // (B, Nc, Lc, Lq)
  Tensor t = a.s;
  if (o.clipped) {
    t = at::leaky_relu(t, o.leaky).masked_fill(q_valid.logical_not(), 0.0);
    t = t / (vector_norm(t, 3) + o.eps);
  }
  const Tensor logits = (t * o.smooth).masked_fill(c_valid.logical_not(), -std::numeric_limits<double>::infinity());
  a.lse = at::logsumexp(logits, {2});                                     // (B, Nc, Lq)
  a.p = at::exp(logits - a.lse.unsqueeze(2));
  a.c_raw = at::matmul(a.p.transpose(2, 3), contexts.unsqueeze(0));       // (B, Nc, Lq, d)
  a.c = l2norm(a.c_raw, o.eps);
  return a;
}

// The epilogue's input rows e (for distance / direction), (B, Nc, Lq, d).
Tensor epilogue_rows(const Attention& a, const Options& o) {
  const Tensor q = a.q.unsqueeze(1);
  return o.distance ? (a.c - q).pow(2) : l2norm(a.c, o.eps) * l2norm(q, o.eps);
}

Tensor cosine(const Attention& a, double eps) {
  const Tensor q = a.q.unsqueeze(1);
  const Tensor den = (vector_norm(a.c, -1) * vector_norm(q, -1)).clamp_min(eps).squeeze(-1);
  return (a.c * q).sum(-1) / den;
}

struct Inputs {
  Tensor queries, contexts, q_valid, c_valid, weight, bias;  // acc dtype, masks bool
  int64_t nq, lq, nc, lc, d, m, step;
};

Inputs make_inputs(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                   const Tensor& context_lens, const std::optional<Tensor>& weight,
                   const std::optional<Tensor>& bias, const Options& o) {
  TORCH_CHECK(queries.dim() == 3 && contexts.dim() == 3 && queries.size(2) == contexts.size(2),
              "queries (Nq, Lq, d) and contexts (Nc, Lc, d) must be 3-D with equal d, got ", queries.sizes(), " and ",
              contexts.sizes());
  TORCH_CHECK(queries.scalar_type() == contexts.scalar_type() && at::isFloatingType(queries.scalar_type()),
              "queries and contexts must share a floating dtype");
  TORCH_CHECK(query_lens.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "query_lens and context_lens must be int64");
  TORCH_CHECK(query_lens.numel() == queries.size(0) && context_lens.numel() == contexts.size(0),
              "one length per query set and per context set");
  for (const Tensor* t : {&queries, &contexts, &query_lens, &context_lens})
    TORCH_CHECK(t->device().is_cpu(), "cross_attention (CPU): tensors must be on the CPU, got ", t->device());
  const auto acc = at::toOpMathType(queries.scalar_type());
  Inputs in;
  in.nq = queries.size(0), in.lq = queries.size(1), in.nc = contexts.size(0), in.lc = contexts.size(1);
  in.d = queries.size(2);
  in.queries = queries.to(acc).contiguous();
  in.contexts = contexts.to(acc).contiguous();
  in.q_valid = at::arange(in.lq, query_lens.options()).unsqueeze(0) < query_lens.unsqueeze(1);      // (Nq, Lq)
  in.c_valid = (at::arange(in.lc, context_lens.options()).unsqueeze(0) < context_lens.unsqueeze(1))  // (Nc, Lc)
                   .view({1, in.nc, in.lc, 1});
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
  const int64_t per_query_set = in.nc * in.lq * std::max({in.d, in.lc, in.m}) * int64_t(sizeof(double));
  in.step = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, per_query_set));
  return in;
}

Tensor block_q_valid(const Inputs& in, int64_t a0, int64_t a1) {
  return in.q_valid.index({Slice(a0, a1)}).view({a1 - a0, 1, 1, in.lq});
}

std::vector<int64_t> out_shape(const Inputs& in, const Options& o) {
  if (o.cosine) return {in.nq, in.nc, in.lq};
  return {in.nq, in.nc, in.lq, o.context ? in.d : in.m};
}

// sum_i x[i] y[i] with independent partial sums, so that it vectorises without -ffast-math.
template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  constexpr int64_t kLanes = 128 / sizeof(T);
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += x[i + l] * y[i + l];
  T sum = 0;
  for (; i < n; ++i) sum += x[i] * y[i];
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// Scores s[k * ld + j] (k < clen, j < len) of one (query set, context set) pair -> attention
// p[j * lc + k] (p = 0 for the padded regions k >= clen) and lse[j] = log sum_k exp(smooth * t[k, j]).
// s is overwritten; sum: scratch of len.
template <typename T>
void attention(T* s, int64_t ld, int64_t lc, int64_t clen, int64_t len, const Options& o, T* p, T* lse, T* sum) {
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
    T* pj = p + j * lc;
    for (int64_t k = 0; k < clen; ++k) pj[k] = s[k * ld + j] * sum[j];
    std::fill(pj + clen, pj + lc, T(0));
  }
}

// The fused forward (see the top of the file). scalar_t: input / output dtype.
template <typename scalar_t>
void forward_kernel(const Options& o, const Inputs& in, const int64_t* q_lens, const int64_t* c_lens, Tensor& out,
                    Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  // The W GEMM's operands: bf16 inputs run it in bf16 on the bf16 matrix unit (fp32 accumulation inside).
  using gemm_t = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, at::BFloat16, acc_t>;
  constexpr bool kOwnRows = !std::is_same_v<gemm_t, acc_t>;
  const int64_t nq = in.nq, lq = in.lq, nc = in.nc, lc = in.lc, d = in.d, m = in.m;
  const bool project = o.distance || o.direction;
  const int64_t width = o.cosine ? 1 : (o.context ? d : m);  // out values per (a, b, j)
  const int64_t na = std::max<int64_t>(1, std::min(nq, kItemQuerySets));
  const int64_t nb = std::max<int64_t>(
      1, std::min<int64_t>(nc, kItemBytes / std::max<int64_t>(1, na * lq * d * int64_t(sizeof(acc_t)))));
  const int64_t chunks = (nc + nb - 1) / nb;
  const int64_t items = chunks * ((nq + na - 1) / na);
  const Tensor weight_t = project ? in.weight.to(c10::CppTypeToScalarType<gemm_t>::value).t() : Tensor();
  // The valid query rows, packed: query set a's are rows [first[a], first[a + 1]).
  const Tensor packed = in.queries.view({nq * lq, d}).index({in.q_valid.view(-1)});
  std::vector<int64_t> first(nq + 1, 0);
  for (int64_t a = 0; a < nq; ++a) first[a + 1] = first[a] + q_lens[a];
  const acc_t* q = packed.data_ptr<acc_t>();
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
    // Per-thread scratch, reused by all the items the thread takes. An item's rows r < R are its
    // packed query rows; (b, r) indexes the rows of its pairs.
    const auto acc_options = in.queries.options();
    Tensor scores = at::empty({nb * lc * na * lq}, acc_options);
    Tensor probs = at::empty({nb * na * lq * lc}, acc_options);
    Tensor ctx = at::empty({nb * na * lq * d}, acc_options);
    Tensor rows = kOwnRows && project ? at::empty({nb * na * lq * d}, weight_t.options()) : ctx;
    Tensor z = at::empty({project ? nb * na * lq * m : 0}, project ? weight_t.options() : acc_options);
    std::vector<acc_t> lse(lq), sum(lq), q_norm(na * lq), q_unit(o.direction ? na * lq * d : 0), z_row(m);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      const int64_t b0 = item % chunks * nb, nbi = std::min(nc, b0 + nb) - b0;
      const int64_t a0 = item / chunks * na, nai = std::min(nq, a0 + na) - a0;
      const int64_t row0 = first[a0], R = first[a0 + nai] - row0;
      const acc_t* qg = q + row0 * d;                       // the item's query rows
      const Tensor chunk = in.contexts.narrow(0, b0, nbi);  // (nbi, Lc, d)

      // Scores of all the item's pairs, attention, contexts.
      Tensor s = scores.narrow(0, 0, nbi * lc * R).view({nbi * lc, R});
      at::mm_out(s, chunk.view({nbi * lc, d}), packed.narrow(0, row0, R).t());
      acc_t* sp = s.data_ptr<acc_t>();
      acc_t* pp = probs.data_ptr<acc_t>();
      for (int64_t b = 0; b < nbi; ++b)
        for (int64_t i = 0; i < nai; ++i) {
          const int64_t r0 = first[a0 + i] - row0;
          attention(sp + b * lc * R + r0, R, lc, c_lens[b0 + b], q_lens[a0 + i], o, pp + (b * R + r0) * lc,
                    lse.data(), sum.data());
          acc_t* st = stats_p + ((a0 + i) * nc + b0 + b) * lq * 2;
          for (int64_t j = 0; j < q_lens[a0 + i]; ++j) st[2 * j + 1] = lse[j];
        }
      Tensor c = ctx.narrow(0, 0, nbi * R * d).view({nbi, R, d});
      at::bmm_out(c, probs.narrow(0, 0, nbi * R * lc).view({nbi, R, lc}), chunk);

      // c = l2norm(ctx), then the epilogue: out directly (context, cosine) or W's input rows.
      for (int64_t r = 0; r < R; ++r) {
        const acc_t* qr = qg + r * d;
        q_norm[r] = std::sqrt(dot(qr, qr, d));
        if (o.direction)
          for (int64_t e = 0; e < d; ++e) q_unit[r * d + e] = qr[e] / (q_norm[r] + eps);
      }
      acc_t* cp = c.data_ptr<acc_t>();
      gemm_t* rp = project ? rows.data_ptr<gemm_t>() : nullptr;  // the same memory as cp unless kOwnRows
      for (int64_t b = 0; b < nbi; ++b)
        for (int64_t i = 0; i < nai; ++i) {
          const int64_t len = q_lens[a0 + i], pair = ((a0 + i) * nc + b0 + b) * lq;  // out / stats row of j = 0
          const int64_t r0 = first[a0 + i] - row0;
          for (int64_t j = 0; j < len; ++j) {
            const int64_t r = b * R + r0 + j;
            acc_t* cr = cp + r * d;
            const acc_t* qj = qg + (r0 + j) * d;
            scalar_t* dst = out_p + (pair + j) * width;
            const acc_t n_raw = std::sqrt(dot(cr, cr, d)) + eps;
            if (o.context) {
              for (int64_t e = 0; e < d; ++e) dst[e] = scalar_t(cr[e] / n_raw);
            } else if (o.distance) {
              gemm_t* row = rp + r * d;
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
                gemm_t* row = rp + r * d;
                for (int64_t e = 0; e < d; ++e) row[e] = gemm_t(cr[e] / (n + eps) * qu[e]);
              }
            }
          }
          std::fill(out_p + (pair + len) * width, out_p + (pair + lq) * width, scalar_t(0));
        }
      if (!project) continue;

      // z = rows W^T, + bias, l2 normalised into out; its norm into stats.
      Tensor zv = z.narrow(0, 0, nbi * R * m).view({nbi * R, m});
      at::mm_out(zv, rows.narrow(0, 0, nbi * R * d).view({nbi * R, d}), weight_t);
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

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                                       const Tensor& context_lens, double smooth, double leaky,
                                       c10::string_view norm, c10::string_view epilogue,
                                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                       double eps) {
  const Options o = make_options(smooth, leaky, norm, epilogue, eps);
  const Inputs in = make_inputs(queries, contexts, query_lens, context_lens, weight, bias, o);
  const Tensor q_lens = query_lens.contiguous(), c_lens = context_lens.contiguous();
  if (in.nq > 0)
    TORCH_CHECK(q_lens.min().item<int64_t>() >= 1 && q_lens.max().item<int64_t>() <= in.lq,
                "query_lens must lie in [1, ", in.lq, "] (the padded length)");
  if (in.nc > 0)
    TORCH_CHECK(c_lens.min().item<int64_t>() >= 1 && c_lens.max().item<int64_t>() <= in.lc,
                "context_lens must lie in [1, ", in.lc, "] (the padded length)");
  Tensor out = at::empty(out_shape(in, o), queries.options());
  Tensor stats = at::zeros({in.nq, in.nc, in.lq, 2}, in.queries.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "cross_attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(o, in, q_lens.data_ptr<int64_t>(), c_lens.data_ptr<int64_t>(), out, stats);
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
  Tensor grad_q = at::zeros_like(in.queries), grad_c = at::zeros_like(in.contexts);
  Tensor grad_w = in.weight.defined() ? at::zeros_like(in.weight) : at::empty({0}, in.queries.options());
  Tensor grad_b = in.bias.defined() ? at::zeros_like(in.bias) : at::empty({0}, in.queries.options());
  for (int64_t a0 = 0; a0 < in.nq; a0 += in.step) {
    const int64_t a1 = std::min(in.nq, a0 + in.step), nb = a1 - a0;
    const Tensor qv = block_q_valid(in, a0, a1);
    const Attention a = attend(in.queries.index({Slice(a0, a1)}), in.contexts, in.c_valid, qv, o);
    const Tensor keep = qv.view({nb, 1, in.lq}).expand({nb, in.nc, in.lq}).to(acc);  // (B, Nc, Lq)
    const Tensor g = grad_out.index({Slice(a0, a1)}).to(acc);
    const Tensor q = a.q.unsqueeze(1);  // (B, 1, Lq, d)
    Tensor d_c, d_q_direct;             // (B, Nc, Lq, d)
    if (o.context) {
      d_c = g * keep.unsqueeze(-1);
    } else if (o.cosine) {
      const Tensor gk = (g * keep).unsqueeze(-1);
      const Tensor nc = vector_norm(a.c, -1), nqn = vector_norm(q, -1), den = nc * nqn;
      const Tensor value = cosine(a, eps).unsqueeze(-1);
      const Tensor big = den > eps;
      const Tensor safe_den = at::where(big, den, at::full_like(den, eps));
      d_c = gk * (q / safe_den - at::where(big, value * a.c / (nc * nc).clamp_min(1e-300), at::zeros_like(a.c)));
      d_q_direct = gk * (a.c / safe_den - at::where(big, value * q / (nqn * nqn).clamp_min(1e-300), at::zeros_like(q)));
    } else {
      // On the valid rows only: dz = g / r - u (u . g) / n with u = out, n = ||z||, r = n + eps
      const Tensor valid = keep.to(at::kBool);
      const Tensor u = out.index({Slice(a0, a1)}).index({valid}).to(acc);                 // (R, m)
      const Tensor n = stats.select(3, 0).narrow(0, a0, nb).index({valid}).unsqueeze(-1);
      const Tensor gv = g.index({valid});
      const Tensor along = at::where(n > 0, (u * gv).sum(-1, true) / n.clamp_min(1e-300), at::zeros_like(n));
      const Tensor dz = gv / (n + eps) - u * along;
      const Tensor rows = epilogue_rows(a, o).index({valid});                           // (R, d)
      grad_w.addmm_(dz.t(), rows);
      if (in.bias.defined()) grad_b.add_(dz.sum(0));
      Tensor de = at::zeros({nb, in.nc, in.lq, in.d}, rows.options());
      de.index_put_({valid}, at::mm(dz, in.weight));
      if (o.distance) {
        d_c = 2 * (a.c - q) * de;
        d_q_direct = -d_c;
      } else {
        d_c = l2norm_backward(a.c, de * l2norm(q, eps), eps);
        d_q_direct = l2norm_backward(q.expand_as(a.c), de * l2norm(a.c, eps), eps);
      }
    }
    const Tensor d_c_raw = l2norm_backward(a.c_raw, d_c, eps);                          // (B, Nc, Lq, d)
    const Tensor d_p = at::matmul(in.contexts.unsqueeze(0), d_c_raw.transpose(2, 3));  // (B, Nc, Lc, Lq)
    grad_c.add_(at::matmul(a.p, d_c_raw).sum(0));                                      // p C backward
    Tensor d_t = a.p * (d_p - (a.p * d_p).sum(2, true)) * o.smooth;                    // softmax backward
    Tensor d_s = d_t;
    if (o.clipped) {
      const Tensor lr = at::leaky_relu(a.s, o.leaky).masked_fill(qv.logical_not(), 0.0);
      const Tensor d_lr = l2norm_backward(lr, d_t, eps).masked_fill(qv.logical_not(), 0.0);
      d_s = d_lr * at::where(a.s > 0, at::ones_like(a.s), at::full_like(a.s, o.leaky));
    }
    // s = C Q^T: dQ[a, j] = sum_{b,k} ds[k, j] C[b, k];  dC[b, k] = sum_{a,j} ds[k, j] Q[a, j]
    Tensor d_q = at::matmul(d_s.transpose(2, 3), in.contexts.unsqueeze(0)).sum(1);  // (B, Lq, d)
    if (d_q_direct.defined()) d_q = d_q + d_q_direct.sum(1);
    grad_q.index({Slice(a0, a1)}).copy_(d_q);
    grad_c.add_(at::matmul(d_s, a.q.unsqueeze(1)).sum(0));
  }
  return {grad_q.to(queries.scalar_type()), grad_c.to(contexts.scalar_type()),
          in.weight.defined() ? grad_w.to(queries.scalar_type()) : grad_w,
          in.bias.defined() ? grad_b.to(queries.scalar_type()) : grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("cross_attention_forward", &forward_cpu);
  m.impl("cross_attention_backward", &backward_cpu);
}

}  // namespace sgfused
