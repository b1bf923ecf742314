// Batched region-word cross-attention on the CPU (DESIGN §1, docs/cross_attention_contract.md).
//
// Query sets are processed a block at a time against all context sets. For a
// block the scores, attention and contexts exist only as block-sized buffers
// (kBlockBytes); the epilogue turns them into its output straight away (for
// distance / direction: one GEMM of the block's (pairs * Lq, d) rows with W,
// then bias and l2 normalisation), so nothing of size (Nq, Nc, Lq, d) or
// (Nq, Nc, Lq, Lc) is ever held unless the "context" epilogue asks for it.
//
// Backward recomputes the block's attention from the inputs (flash-attention
// style) and reuses the saved output and epilogue norms for the W part, so
// it costs two GEMMs with W instead of three. Gradients for the queries of a
// block are complete after the block; context gradients are summed over blocks
// in block order. All reductions are ATen's, in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace sgfused {
namespace {

using at::Tensor;
using at::indexing::Slice;

constexpr int64_t kBlockBytes = int64_t(16) << 20;  // per block buffer (below glibc's mmap threshold)

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

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& queries, const Tensor& contexts, const Tensor& query_lens,
                                       const Tensor& context_lens, double smooth, double leaky,
                                       c10::string_view norm, c10::string_view epilogue,
                                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                       double eps) {
  const Options o = make_options(smooth, leaky, norm, epilogue, eps);
  const Inputs in = make_inputs(queries, contexts, query_lens, context_lens, weight, bias, o);
  Tensor out = at::empty(out_shape(in, o), queries.options());
  Tensor stats = at::zeros({in.nq, in.nc, in.lq, 2}, in.queries.options());
  for (int64_t a0 = 0; a0 < in.nq; a0 += in.step) {
    const int64_t a1 = std::min(in.nq, a0 + in.step);
    const Tensor qv = block_q_valid(in, a0, a1);
    const Attention a = attend(in.queries.index({Slice(a0, a1)}), in.contexts, in.c_valid, qv, o);
    const Tensor keep = qv.view({a1 - a0, 1, in.lq}).expand({a1 - a0, in.nc, in.lq});  // (B, Nc, Lq)
    Tensor result;
    if (o.context) {
      result = a.c;
    } else if (o.cosine) {
      result = cosine(a, eps);
    } else {
      // Only the valid query rows go through W (padding is ~half of a captions batch).
      // bf16 inputs: the GEMM runs in bf16 on the bf16 matrix unit (fp32 accumulation inside).
      const Tensor rows = epilogue_rows(a, o).index({keep});  // (R, d)
      const bool bf16 = queries.scalar_type() == at::kBFloat16;
      Tensor z = bf16 ? at::mm(rows.to(at::kBFloat16), in.weight.to(at::kBFloat16).t()).to(rows.scalar_type())
                      : at::mm(rows, in.weight.t());
      if (in.bias.defined()) z = z + in.bias;
      const Tensor n = vector_norm(z, -1);
      result = at::zeros({a1 - a0, in.nc, in.lq, in.m}, z.options());
      result.index_put_({keep}, z / (n + eps));
      stats.select(3, 0).narrow(0, a0, a1 - a0).index_put_({keep}, n.squeeze(-1));
    }
    stats.select(3, 1).narrow(0, a0, a1 - a0).copy_(a.lse * keep);
    const Tensor mask = o.cosine ? keep : keep.unsqueeze(-1);
    out.index({Slice(a0, a1)}).copy_(result * mask);
  }
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
