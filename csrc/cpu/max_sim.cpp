// Late-interaction max-mean score on the CPU (docs/max_sim_contract.md, SGM Eq. 6-7):
//   S[a, b] = (1 / y_lens[b]) * sum_{t < y_lens[b]} max_{o < x_lens[a]} <y[b, t], x[a, o]>.
//
// Forward: a work item is a block of captions against a block of images, sized so
// that each side has about kBlockRows valid nodes. The item packs the valid caption
// nodes Yp (R, d) and the valid image nodes Xp (C, d) into fp32 (fp64) scratch -
// padded nodes are never read, so whatever they hold cannot leak; a block without
// padding and with nothing to convert is used in place - and runs one GEMM
// G^T = Xp @ Yp^T (C, R). Then for every image of the item, every caption node's
// dots with the image's nodes are reduced to their max (strict comparison in node
// order: the lowest index wins ties), one image node - a contiguous row of G^T - at
// a time so that the loop over caption nodes vectorises, and each caption's maxima
// are summed in node order. bf16 inputs on a CPU with bf16 dot instructions pack bf16
// and run G in bf16 (fp32 accumulation, each dot rounded to bf16 once): the maxima
// are the rounded dots, and since rounding is monotone the exact argmax is among the
// nodes tied at the rounded max, so those ties are decided on exact fp32 dots - the
// indices (and so the gradients) are those of the fp32 computation. Every pair lies
// in exactly one item and is reduced by one thread in a fixed order, so results do
// not depend on the thread count. Nothing of size (Nx, Ny, Ly, Lx) exists; per
// thread the scratch is O(kBlockRows * d).
//
// Backward (the subgradient at the argmax the forward returned), w = grad / y_lens:
//   grad_x[a, o] = sum_b sum_t w[a, b] [indices[a, b, t] == o] y[b, t]  - one thread per image a,
//   grad_y[b, t] = sum_a w[a, b] x[a, indices[a, b, t]]                 - one thread per caption b,
// each a sum of scaled rows in a fixed order: no atomics, deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "../input_checks.h"
#include "bf16_gemm.h"
#include "dot.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace sgfused {
namespace {

using at::Tensor;

constexpr int64_t kBlockRows = 256;  // valid nodes per side of a work item (at least one whole set)

// Shapes, dtypes, devices and lengths the kernels rely on (lengths: the checks every op shares).
void check_inputs(const Tensor& x, const Tensor& y, const Tensor& x_lens, const Tensor& y_lens) {
  TORCH_CHECK(x.dim() == 3, "max_sim: x must be (Nx, Lx, d), got shape ", x.sizes());
  TORCH_CHECK(y.dim() == 3, "max_sim: y must be (Ny, Ly, d), got shape ", y.sizes());
  TORCH_CHECK(y.size(2) == x.size(2), "max_sim: y must have d = ", x.size(2), " (the feature size of x), got shape ",
              y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "max_sim: y must have the dtype of x (", x.scalar_type(), "), got ",
              y.scalar_type());
  for (const auto* t : {&x, &y, &x_lens, &y_lens})
    TORCH_CHECK(t->device().is_cpu(), "max_sim (cpu): all tensors must be on the CPU, got ", t->device());
  check_lengths(x_lens, x.size(0), x.size(1), "x_lens");
  check_lengths(y_lens, y.size(0), y.size(1), "y_lens");
}

// Consecutive sets grouped so that each group holds about kBlockRows valid nodes.
struct Blocks {
  std::vector<int64_t> first;  // first set of each block, plus the end
  std::vector<int64_t> node;   // per set, its first node's row within its block's packed matrix
  std::vector<char> full;      // per block: all its sets have every node valid (no padding to skip)
  int64_t max_rows = 0;        // rows of the largest block
};

Blocks make_blocks(const int64_t* lens, int64_t n, int64_t padded) {
  Blocks blocks;
  int64_t rows = 0;
  blocks.node.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || rows + lens[i] > kBlockRows) {
      blocks.first.push_back(i);
      blocks.full.push_back(1);
      rows = 0;
    }
    blocks.node[i] = rows;
    rows += lens[i];
    blocks.full.back() &= lens[i] == padded;
    blocks.max_rows = std::max(blocks.max_rows, rows);
  }
  blocks.first.push_back(n);
  return blocks;
}

// The valid nodes of block `block` of `nodes` (N, padded, d) as consecutive packed_t rows: a view of
// the input when nothing needs converting or skipping, else packed into `scratch`.
template <typename scalar_t, typename packed_t>
Tensor block_nodes(const Tensor& nodes, const int64_t* lens, const Blocks& blocks, int64_t block, Tensor& scratch) {
  const int64_t s0 = blocks.first[block], s1 = blocks.first[block + 1], padded = nodes.size(1), d = nodes.size(2);
  if (std::is_same_v<scalar_t, packed_t> && blocks.full[block])
    return nodes.view({-1, d}).narrow(0, s0 * padded, (s1 - s0) * padded);
  const scalar_t* src = nodes.data_ptr<scalar_t>();
  packed_t* packed = scratch.data_ptr<packed_t>();
  int64_t rows = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const scalar_t* set = src + s * padded * d;
    const int64_t count = lens[s] * d;
    for (int64_t k = 0; k < count; ++k) packed[rows * d + k] = static_cast<packed_t>(set[k]);
    rows += lens[s];
  }
  return scratch.narrow(0, 0, rows);
}

// gemm_t: the dtype of the packed nodes and of G - bf16 for bf16 inputs on a CPU with bf16 dot
// instructions (bf16_gemm.h), else acc_t.
template <typename scalar_t, typename gemm_t>
void forward_kernel(const Tensor& x, const Tensor& y, const int64_t* x_lens, const int64_t* y_lens, Tensor& scores,
                    int64_t* indices) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kRounded = !std::is_same_v<gemm_t, acc_t>;
  const int64_t nx = x.size(0), lx = x.size(1), ny = y.size(0), ly = y.size(1), d = x.size(2);
  const Blocks img = make_blocks(x_lens, nx, lx), cap = make_blocks(y_lens, ny, ly);
  const int64_t n_img = static_cast<int64_t>(img.first.size()) - 1, n_cap = static_cast<int64_t>(cap.first.size()) - 1;
  const int64_t items = n_img * n_cap;
  acc_t* out = scores.data_ptr<acc_t>();
  const auto options = scores.options().dtype(c10::CppTypeToScalarType<gemm_t>::value);

  // Worker threads run mm_out under the caller's dispatch state.
  const at::ThreadLocalState caller;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state(caller);
    Tensor xs = at::empty({img.max_rows, d}, options), ys = at::empty({cap.max_rows, d}, options);
    Tensor gs = at::empty({cap.max_rows * img.max_rows}, options);
    Tensor y_rows;
    int64_t y_block = -1;  // the caption block y_rows holds
    std::vector<acc_t> best(cap.max_rows);  // per caption node of the block, against one image
    std::vector<int32_t> arg(cap.max_rows);
    std::vector<char> tied(kRounded ? cap.max_rows : 0);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      // Caption-block major: a thread's consecutive items mostly share their caption block.
      const int64_t cb = item / n_img, ib = item % n_img;
      const int64_t b0 = cap.first[cb], b1 = cap.first[cb + 1], a0 = img.first[ib], a1 = img.first[ib + 1];
      if (cb != y_block) {
        y_rows = block_nodes<scalar_t, gemm_t>(y, y_lens, cap, cb, ys);
        y_block = cb;
      }
      const Tensor x_rows = block_nodes<scalar_t, gemm_t>(x, x_lens, img, ib, xs);
      const int64_t rows = y_rows.size(0), cols = x_rows.size(0);
      Tensor g = gs.narrow(0, 0, cols * rows).view({cols, rows});
      at::mm_out(g, x_rows, y_rows.t());  // G^T: each image node's dots with every caption node, contiguous
      const gemm_t* gp = g.data_ptr<gemm_t>();
      const gemm_t *xr = x_rows.data_ptr<gemm_t>(), *yr = y_rows.data_ptr<gemm_t>();
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t col0 = img.node[a], len_x = x_lens[a];
        // Every caption node's max over a's nodes and its first index (strict ">" in node order), one
        // image node - a contiguous row of G^T - at a time, so that the loop over caption nodes vectorises.
        for (int64_t r = 0; r < rows; ++r) {
          best[r] = static_cast<acc_t>(gp[col0 * rows + r]);
          arg[r] = 0;
        }
        for (int32_t o = 1; o < len_x; ++o) {
          const gemm_t* node = gp + (col0 + o) * rows;
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t v = static_cast<acc_t>(node[r]);
            const bool up = v > best[r];
            best[r] = up ? v : best[r];
            arg[r] = up ? o : arg[r];
          }
        }
        if constexpr (kRounded) {
          // Rounding is monotone, so the exact argmax is one of the nodes whose rounded dot equals the
          // rounded max: where a later node ties, the exact dots decide (the lowest index on exact ties).
          std::fill(tied.begin(), tied.begin() + rows, char(0));
          for (int32_t o = 1; o < len_x; ++o) {
            const gemm_t* node = gp + (col0 + o) * rows;
            for (int64_t r = 0; r < rows; ++r)
              tied[r] |= static_cast<char>((o > arg[r]) & (static_cast<acc_t>(node[r]) == best[r]));
          }
          for (int64_t r = 0; r < rows; ++r) {
            if (!tied[r]) continue;
            const gemm_t* yt = yr + r * d;
            acc_t exact_best = dot<gemm_t, acc_t>(yt, xr + (col0 + arg[r]) * d, d);
            for (int32_t o = arg[r] + 1; o < len_x; ++o) {
              if (static_cast<acc_t>(gp[(col0 + o) * rows + r]) != best[r]) continue;
              const acc_t exact = dot<gemm_t, acc_t>(yt, xr + (col0 + o) * d, d);
              if (exact > exact_best) {
                exact_best = exact;
                arg[r] = o;
              }
            }
          }
        }
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row0 = cap.node[b], len_y = y_lens[b];
          acc_t total = 0;
          for (int64_t t = 0; t < len_y; ++t) total += best[row0 + t];
          out[a * ny + b] = total / static_cast<acc_t>(len_y);
          if (indices) {
            int64_t* index = indices + (a * ny + b) * ly;
            for (int64_t t = 0; t < len_y; ++t) index[t] = arg[row0 + t];
            std::fill(index + len_y, index + ly, int64_t(-1));
          }
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x_in, const Tensor& y_in, const Tensor& x_lens_in,
                                       const Tensor& y_lens_in, bool with_indices) {
  check_inputs(x_in, y_in, x_lens_in, y_lens_in);
  const Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor x_lens = x_lens_in.contiguous(), y_lens = y_lens_in.contiguous();
  const int64_t nx = x.size(0), ny = y.size(0), ly = y.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  Tensor scores = at::empty({nx, ny}, x.options().dtype(acc_type));
  Tensor indices = at::empty({with_indices ? nx * ny * ly : 0}, x.options().dtype(at::kLong));
  int64_t* index = with_indices ? indices.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_sim_forward_cpu", [&] {
    with_gemm_type<scalar_t>(bf16_gemm_for(x.scalar_type()), [&](auto gemm) {
      forward_kernel<scalar_t, decltype(gemm)>(x, y, x_lens.data_ptr<int64_t>(), y_lens.data_ptr<int64_t>(), scores,
                                               index);
    });
  });
  if (with_indices) indices = indices.view({nx, ny, ly});
  return {scores, indices};
}

// out[k] += w * row[k] for k < d (vectorises).
template <typename acc_t>
inline void add_scaled(acc_t* __restrict__ out, const acc_t* __restrict__ row, acc_t w, int64_t d) {
  for (int64_t k = 0; k < d; ++k) out[k] += w * row[k];
}

std::tuple<Tensor, Tensor> backward_cpu(const Tensor& grad_in, const Tensor& x_in, const Tensor& y_in,
                                        const Tensor& x_lens_in, const Tensor& y_lens_in, const Tensor& indices_in) {
  check_inputs(x_in, y_in, x_lens_in, y_lens_in);
  const int64_t nx = x_in.size(0), lx = x_in.size(1), ny = y_in.size(0), ly = y_in.size(1), d = x_in.size(2);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == nx && grad_in.size(1) == ny,
              "max_sim_backward: grad_scores must have shape (", nx, ", ", ny, "), got ", grad_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kLong && indices_in.dim() == 3 && indices_in.size(0) == nx &&
                  indices_in.size(1) == ny && indices_in.size(2) == ly,
              "max_sim_backward: indices must be int64 of shape (", nx, ", ", ny, ", ", ly,
              ") (call max_sim_forward with with_indices=True), got ", indices_in.scalar_type(), " ",
              indices_in.sizes());
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  const Tensor x = x_in.to(acc_type).contiguous(), y = y_in.to(acc_type).contiguous();
  const Tensor grad = grad_in.to(acc_type).contiguous(), indices = indices_in.contiguous();
  const Tensor x_lens_t = x_lens_in.contiguous(), y_lens_t = y_lens_in.contiguous();
  Tensor grad_x = at::zeros_like(x), grad_y = at::zeros_like(y);
  std::atomic<bool> bad_index{false};
  AT_DISPATCH_FLOATING_TYPES(acc_type, "max_sim_backward_cpu", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>();
    scalar_t *gx = grad_x.data_ptr<scalar_t>(), *gy = grad_y.data_ptr<scalar_t>();
    const int64_t* idx = indices.data_ptr<int64_t>();
    const int64_t *x_lens = x_lens_t.data_ptr<int64_t>(), *y_lens = y_lens_t.data_ptr<int64_t>();
    auto weight = [&](int64_t a, int64_t b) { return gp[a * ny + b] / static_cast<scalar_t>(y_lens[b]); };
    // grad_x: image a's rows, captions in order.
    at::parallel_for(0, nx, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a)
        for (int64_t b = 0; b < ny; ++b) {
          const scalar_t w = weight(a, b);
          const int64_t* index = idx + (a * ny + b) * ly;
          for (int64_t t = 0; t < y_lens[b]; ++t) {
            const int64_t o = index[t];
            if (o < 0 || o >= x_lens[a]) {
              bad_index = true;
              continue;
            }
            add_scaled(gx + (a * lx + o) * d, yp + (b * ly + t) * d, w, d);
          }
        }
    });
    // grad_y: caption b's rows, images in order.
    at::parallel_for(0, ny, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t a = 0; a < nx; ++a) {
          const scalar_t w = weight(a, b);
          const int64_t* index = idx + (a * ny + b) * ly;
          for (int64_t t = 0; t < y_lens[b]; ++t) {
            const int64_t o = index[t];
            if (o < 0 || o >= x_lens[a]) continue;  // reported by the pass above
            add_scaled(gy + (b * ly + t) * d, xp + (a * lx + o) * d, w, d);
          }
        }
    });
  });
  TORCH_CHECK(!bad_index, "max_sim_backward: indices must name a valid image node (0 <= index < x_lens) at every ",
              "valid caption node; pass the indices max_sim_forward returned");
  return {grad_x.to(x_in.scalar_type()), grad_y.to(y_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("max_sim_forward", &forward_cpu);
  m.impl("max_sim_backward", &backward_cpu);
}

}  // namespace sgfused
