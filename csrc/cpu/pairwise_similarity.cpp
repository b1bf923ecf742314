// All-pairs learned vector similarity on the CPU (docs/pairwise_similarity_contract.md).
//
// The naive computation builds the (Nx, Ny, d) tensor of e(x_i, y_j) and then
// applies the Linear layer. Here pairs are processed a block at a time: the
// block's e rows (at most kBlockElements values) are built in a reusable buffer
// and contracted with W on the matrix unit (one GEMM per block), and the bias
// and l2 normalisation run as the epilogue straight into the output. The
// difference (x - y) is formed directly rather than through the expanded form
// W x^2 + W y^2 - 2 W (x * y), so near-equal inputs lose no precision.
//
// Backward rebuilds the block's e rows, forms dz from the saved output and norms
// (z = out * (norm + eps) is never needed: dz = g / r - u (u . g) / norm with
// u = out), and uses two GEMMs per block (grad_weight += dz^T e, de = dz W).
// The reductions onto x and y rows run in a fixed order, so results are
// deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16_gemm.h"

#include <cmath>
#include <type_traits>

namespace sgfused {
namespace {

using at::Tensor;

constexpr int64_t kBlockElements = int64_t(1) << 23;  // e rows per block * d (32 MiB in fp32)

// Inputs in the accumulation dtype; for "direction" xs, ys are the l2-normalised rows.
struct Pairs {
  Tensor xs, ys, x_norm, y_norm, w, b;
  bool distance, aligned;
  double eps;
  int64_t nx, ny, d, m;

  // x rows [i0, i1) and all y rows (or y rows [i0, i1) when aligned): their e rows.
  int64_t rows(int64_t i0, int64_t i1) const { return aligned ? i1 - i0 : (i1 - i0) * ny; }
  int64_t x_rows_per_block() const {
    return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, rows(0, 1) * d));
  }
  int64_t x_of(int64_t i0, int64_t r) const { return aligned ? i0 + r : i0 + r / ny; }
  int64_t y_of(int64_t i0, int64_t r) const { return aligned ? i0 + r : r % ny; }
};

Pairs make_pairs(const Tensor& x, const Tensor& y, const Tensor& weight, const std::optional<Tensor>& bias,
                 const std::string& mode, double eps, bool aligned, at::ScalarType acc) {
  Pairs p;
  p.distance = mode == "distance";
  p.aligned = aligned;
  p.eps = eps;
  p.nx = x.size(0);
  p.ny = y.size(0);
  p.d = x.size(1);
  p.m = weight.size(0);
  p.xs = x.to(acc).contiguous();
  p.ys = y.to(acc).contiguous();
  p.w = weight.to(acc).contiguous();
  if (bias.has_value() && bias->defined()) p.b = bias->to(acc).contiguous();
  if (!p.distance) {
    p.x_norm = at::linalg_vector_norm(p.xs, 2, {1}, true);
    p.y_norm = at::linalg_vector_norm(p.ys, 2, {1}, true);
    p.xs = p.xs / (p.x_norm + eps);
    p.ys = p.ys / (p.y_norm + eps);
  }
  return p;
}

// e rows of the block into e (rows x d), computed in acc_t and stored as e_t.
template <typename acc_t, typename e_t>
void build_e(const Pairs& p, int64_t i0, int64_t i1, Tensor& e) {
  const acc_t* xs = p.xs.data_ptr<acc_t>();
  const acc_t* ys = p.ys.data_ptr<acc_t>();
  e_t* out = e.data_ptr<e_t>();
  const int64_t d = p.d;
  at::parallel_for(0, p.rows(i0, i1), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* a = xs + p.x_of(i0, r) * d;
      const acc_t* b = ys + p.y_of(i0, r) * d;
      e_t* o = out + r * d;
      if (p.distance) {
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<e_t>((a[k] - b[k]) * (a[k] - b[k]));
      } else {
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<e_t>(a[k] * b[k]);
      }
    }
  });
}

void check_inputs(const Tensor& x, const Tensor& y, const Tensor& weight, const std::optional<Tensor>& bias,
                  const std::string& mode, bool aligned) {
  TORCH_CHECK(mode == "distance" || mode == "direction", "mode must be 'distance' or 'direction', got '", mode, "'");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && weight.dim() == 2, "x (Nx, d), y (Ny, d) and weight (m, d) must be 2-D");
  TORCH_CHECK(y.size(1) == x.size(1) && weight.size(1) == x.size(1), "x, y and weight must share d, got ", x.sizes(),
              ", ", y.sizes(), ", ", weight.sizes());
  TORCH_CHECK(!aligned || x.size(0) == y.size(0), "aligned pairs need as many x as y rows, got ", x.size(0), " and ",
              y.size(0));
  for (const Tensor* t : {&x, &y, &weight}) {
    TORCH_CHECK(t->device().is_cpu(), "pairwise_similarity (CPU): tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "x, y and weight must share a dtype");
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating, got ", x.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (", weight.size(0),
                "), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type(), "bias must match x's device and dtype");
  }
}

std::vector<int64_t> out_shape(const Pairs& p) {
  return p.aligned ? std::vector<int64_t>{p.nx, p.m} : std::vector<int64_t>{p.nx, p.ny, p.m};
}

// The forward in blocks of x rows: e (rows, d) built in gemm_t, z = e W^T, then bias and l2norm in acc_t.
template <typename scalar_t, typename gemm_t>
void forward_blocks(const Pairs& p, const Tensor& x, Tensor& out, Tensor& norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = p.x_rows_per_block();
  const auto gemm_options = x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value);
  const Tensor w = p.w.to(gemm_options.dtype());
  Tensor e = at::empty({p.rows(0, std::min(step, p.nx)), p.d}, gemm_options);
  Tensor z = at::empty({e.size(0), p.m}, gemm_options);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* norm_ptr = norm.data_ptr<acc_t>();
  const acc_t* bias_ptr = p.b.defined() ? p.b.data_ptr<acc_t>() : nullptr;
  for (int64_t i0 = 0; i0 < p.nx; i0 += step) {
    const int64_t i1 = std::min(p.nx, i0 + step), rows = p.rows(i0, i1), first = p.rows(0, i0);
    Tensor e_block = e.narrow(0, 0, rows), z_block = z.narrow(0, 0, rows);
    build_e<acc_t, gemm_t>(p, i0, i1, e_block);
    at::mm_out(z_block, e_block, w.t());
    const gemm_t* zp = z_block.data_ptr<gemm_t>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> row(p.m);
      for (int64_t r = r0; r < r1; ++r) {
        acc_t sum = 0;
        for (int64_t k = 0; k < p.m; ++k) {
          row[k] = static_cast<acc_t>(zp[r * p.m + k]) + (bias_ptr ? bias_ptr[k] : acc_t(0));
          sum += row[k] * row[k];
        }
        const acc_t n = std::sqrt(sum), scale = acc_t(1) / (n + static_cast<acc_t>(p.eps));
        norm_ptr[first + r] = n;
        scalar_t* o = out_ptr + (first + r) * p.m;
        for (int64_t k = 0; k < p.m; ++k) o[k] = static_cast<scalar_t>(row[k] * scale);
      }
    });
  }
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x, const Tensor& y, const Tensor& weight,
                                       const std::optional<Tensor>& bias, c10::string_view mode_view, double eps,
                                       bool aligned) {
  const std::string mode(mode_view);
  check_inputs(x, y, weight, bias, mode, aligned);
  Tensor out, norm;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pairwise_similarity_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Pairs p = make_pairs(x, y, weight, bias, mode, eps, aligned, acc);
    out = at::empty(out_shape(p), x.options());
    norm = at::empty(p.aligned ? std::vector<int64_t>{p.nx} : std::vector<int64_t>{p.nx, p.ny}, x.options().dtype(acc));
    // bf16 inputs on a CPU with bf16 dot instructions: e and W in bf16 (fp32 accumulation inside
    // the GEMM; z is rounded to bf16 once, as the bf16 output will be); otherwise acc_t.
    with_gemm_type<scalar_t>(bf16_gemm_for(x.scalar_type()),
                             [&](auto gemm) { forward_blocks<scalar_t, decltype(gemm)>(p, x, out, norm); });
  });
  return {out, norm};
}

// One pair's contribution to the gradient of one side ("self"; "other" is its
// partner) from de = d(loss)/d(e): distance e = (x - y)^2 gives 2 (self - other) de
// for both sides; direction e = xhat * yhat gives other * de.
template <typename acc_t>
void add_pair_grad(acc_t* __restrict__ grad, const acc_t* __restrict__ self, const acc_t* __restrict__ other,
                   const acc_t* __restrict__ de, int64_t d, bool distance) {
  if (distance) {
    for (int64_t k = 0; k < d; ++k) grad[k] += 2 * (self[k] - other[k]) * de[k];
  } else {
    for (int64_t k = 0; k < d; ++k) grad[k] += other[k] * de[k];
  }
}

// For u = v / (||v|| + eps): dv = du / (||v|| + eps) - v (v . du) / ((||v|| + eps)^2 ||v||), row by row.
Tensor l2norm_backward(const Tensor& v, const Tensor& v_norm, const Tensor& du, double eps) {
  const Tensor r = v_norm + eps;
  const Tensor safe = at::where(v_norm > 0, v_norm, at::ones_like(v_norm));
  const Tensor dot = (v * du).sum(1, true);
  return du / r - at::where(v_norm > 0, v * dot / (r * r * safe), at::zeros_like(v));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& y,
                                                        const Tensor& weight, const std::optional<Tensor>& bias,
                                                        const Tensor& out, const Tensor& norm,
                                                        c10::string_view mode_view, double eps, bool aligned) {
  const std::string mode(mode_view);
  check_inputs(x, y, weight, bias, mode, aligned);
  Tensor gx, gy, gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pairwise_similarity_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Pairs p = make_pairs(x, y, weight, bias, mode, eps, aligned, acc);
    const Tensor g_all = grad_out.contiguous(), u_all = out.contiguous(), n_all = norm.contiguous();
    Tensor grad_xs = at::zeros_like(p.xs), grad_ys = at::zeros_like(p.ys), grad_w = at::zeros_like(p.w);
    Tensor grad_b = at::zeros({p.m}, p.xs.options());
    const int64_t step = p.x_rows_per_block();
    Tensor e = at::empty({p.rows(0, std::min(step, p.nx)), p.d}, p.xs.options());
    Tensor dz = at::empty({e.size(0), p.m}, p.xs.options());
    Tensor de = at::empty_like(e);
    const scalar_t* g_ptr = g_all.data_ptr<scalar_t>();
    const scalar_t* u_ptr = u_all.data_ptr<scalar_t>();
    const acc_t* n_ptr = n_all.data_ptr<acc_t>();
    const acc_t *xs = p.xs.data_ptr<acc_t>(), *ys = p.ys.data_ptr<acc_t>();
    acc_t *gxs = grad_xs.data_ptr<acc_t>(), *gys = grad_ys.data_ptr<acc_t>();
    const int64_t d = p.d;
    for (int64_t i0 = 0; i0 < p.nx; i0 += step) {
      const int64_t i1 = std::min(p.nx, i0 + step), rows = p.rows(i0, i1), first = p.rows(0, i0);
      Tensor e_block = e.narrow(0, 0, rows), dz_block = dz.narrow(0, 0, rows), de_block = de.narrow(0, 0, rows);
      build_e<acc_t, acc_t>(p, i0, i1, e_block);
      acc_t* dzp = dz_block.data_ptr<acc_t>();
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* g = g_ptr + (first + r) * p.m;
          const scalar_t* u = u_ptr + (first + r) * p.m;
          const acc_t n = n_ptr[first + r], inv_r = acc_t(1) / (n + static_cast<acc_t>(p.eps));
          acc_t ug = 0;
          for (int64_t k = 0; k < p.m; ++k) ug += static_cast<acc_t>(u[k]) * static_cast<acc_t>(g[k]);
          const acc_t along = n > 0 ? ug / n : acc_t(0);
          for (int64_t k = 0; k < p.m; ++k)
            dzp[r * p.m + k] = static_cast<acc_t>(g[k]) * inv_r - static_cast<acc_t>(u[k]) * along;
        }
      });
      grad_b.add_(dz_block.sum(0));
      grad_w.addmm_(dz_block.t(), e_block);
      at::mm_out(de_block, dz_block, p.w);
      const acc_t* dep = de_block.data_ptr<acc_t>();
      // grad x rows of the block: each row sums its own pairs in order.
      at::parallel_for(i0, i1, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t i = a0; i < a1; ++i)
          for (int64_t r = p.rows(i0, i); r < p.rows(i0, i + 1); ++r)
            add_pair_grad(gxs + i * d, xs + i * d, ys + p.y_of(i0, r) * d, dep + r * d, d, p.distance);
      });
      // grad y rows: each y row sums the block's pairs that touch it, in order.
      const int64_t y_begin = p.aligned ? i0 : 0, y_end = p.aligned ? i1 : p.ny;
      at::parallel_for(y_begin, y_end, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t j = b0; j < b1; ++j) {
          const int64_t i_begin = p.aligned ? j : i0, i_end = p.aligned ? j + 1 : i1;
          for (int64_t i = i_begin; i < i_end; ++i) {
            const int64_t r = p.aligned ? i - i0 : (i - i0) * p.ny + j;
            add_pair_grad(gys + j * d, ys + j * d, xs + i * d, dep + r * d, d, p.distance);
          }
        }
      });
    }
    if (!p.distance) {
      grad_xs = l2norm_backward(x.to(acc), p.x_norm, grad_xs, eps);
      grad_ys = l2norm_backward(y.to(acc), p.y_norm, grad_ys, eps);
    }
    gx = grad_xs.to(x.scalar_type());
    gy = grad_ys.to(y.scalar_type());
    gw = grad_w.to(weight.scalar_type());
    gb = p.b.defined() ? grad_b.to(x.scalar_type()) : at::empty({0}, x.options());
  });
  return {gx, gy, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("pairwise_similarity_forward", &forward_cpu);
  m.impl("pairwise_similarity_backward", &backward_cpu);
}

}  // namespace sgfused
