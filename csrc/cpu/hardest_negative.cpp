// In-batch hardest-negative mining on the CPU (docs/hardest_negative_contract.md).
//
// One pass over the score matrix, rows split into a fixed number of chunks run
// by at::parallel_for: each row yields its hardest negative directly; each chunk
// keeps its own column maxima (and, for the sum of hinges, its own column hinge
// sums) which are merged in chunk order afterwards, so results never depend on
// thread scheduling. Positives are found through CSR lists built by sorting the
// ids (O(N log N)), never through an N x N mask.
//
// The embedding entry point runs the same row scan over tiles of
// S = img @ cap^T computed kTileRows rows at a time, so S is never stored whole.
// Gradients: the max-violation gradient is sparse (positives, hardest negatives)
// and is applied as a short list of (row, col, value) terms; the sum-of-hinges
// gradient is dense over negatives and written once per cell by a second scan.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../input_checks.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace sgfused {
namespace {

using at::Tensor;

constexpr int64_t kTileRows = 256;
constexpr int64_t kLanes = 16;  // independent accumulators per row reduction

// Positive pairs as CSR lists both ways: the captions of each image row and the
// images of each caption column, each list in ascending index order.
struct Positives {
  std::vector<int64_t> row_ptr, row_cols;  // ni + 1, n_pos
  std::vector<int64_t> col_ptr, col_rows;  // nc + 1, n_pos
};

// For every id in `query`, the indices of `keys` holding that id (ascending).
void group_by_id(const int64_t* query, int64_t nq, const int64_t* keys, int64_t nk,
                 std::vector<int64_t>& ptr, std::vector<int64_t>& members) {
  std::vector<int64_t> order(nk);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<int64_t> sorted(nk);
  for (int64_t k = 0; k < nk; ++k) sorted[k] = keys[order[k]];
  ptr.assign(nq + 1, 0);
  members.clear();
  for (int64_t q = 0; q < nq; ++q) {
    auto range = std::equal_range(sorted.begin(), sorted.end(), query[q]);
    for (auto it = range.first; it != range.second; ++it) members.push_back(order[it - sorted.begin()]);
    ptr[q + 1] = static_cast<int64_t>(members.size());
  }
}

Positives find_positives(const Tensor& img_ids, const Tensor& cap_ids) {
  Positives p;
  const int64_t* img = img_ids.data_ptr<int64_t>();
  const int64_t* cap = cap_ids.data_ptr<int64_t>();
  group_by_id(img, img_ids.numel(), cap, cap_ids.numel(), p.row_ptr, p.row_cols);
  group_by_id(cap, cap_ids.numel(), img, img_ids.numel(), p.col_ptr, p.col_rows);
  return p;
}

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
bool active(acc_t margin, acc_t positive, acc_t other) {
  return (margin - positive) + other > acc_t(0);
}

// Everything one scan needs: ids, positives, the score of every positive pair in
// both CSR orders (looked up once before the scan), and per column the hinge
// threshold of its first positive so the inner loops stay dense and branch-free.
// Further positives of a column (only when image ids repeat) take a slow path.
template <typename acc_t>
struct Problem {
  int64_t ni, nc;
  std::vector<int32_t> img_key, cap_key;  // ids relabelled to 32 bits: inner loops stay in 32-bit lanes
  Positives pos;
  std::vector<acc_t> pos_score_row, pos_score_col;
  std::vector<acc_t> col_threshold;  // margin - S[first positive, c], or -inf: no positive
  std::vector<int64_t> multi_cols;   // columns with more than one positive
  acc_t margin;
  bool max_violation;
  int64_t n_chunks;

  template <typename ScoreFn>
  Problem(const Tensor& img_ids_t, const Tensor& cap_ids_t, double margin_, bool max_violation_, ScoreFn score)
      : ni(img_ids_t.numel()),
        nc(cap_ids_t.numel()),
        pos(find_positives(img_ids_t, cap_ids_t)),
        margin(static_cast<acc_t>(margin_)),
        max_violation(max_violation_),
        n_chunks(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ni))) {
    relabel(img_ids_t, cap_ids_t);
    pos_score_row.resize(pos.row_cols.size());
    for (int64_t i = 0; i < ni; ++i)
      for (int64_t k = pos.row_ptr[i]; k < pos.row_ptr[i + 1]; ++k) pos_score_row[k] = score(i, pos.row_cols[k]);
    pos_score_col.resize(pos.col_rows.size());
    col_threshold.assign(nc, kNegInf<acc_t>);
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t k = pos.col_ptr[c]; k < pos.col_ptr[c + 1]; ++k) pos_score_col[k] = score(pos.col_rows[k], c);
      if (n_positive_rows(c) > 0) col_threshold[c] = margin - pos_score_col[pos.col_ptr[c]];
      if (n_positive_rows(c) > 1) multi_cols.push_back(c);
    }
  }

  // Equal ids get equal keys: the rank of the id among all distinct ids.
  void relabel(const Tensor& img_ids_t, const Tensor& cap_ids_t) {
    const int64_t* img = img_ids_t.data_ptr<int64_t>();
    const int64_t* cap = cap_ids_t.data_ptr<int64_t>();
    std::vector<int64_t> distinct(img, img + ni);
    distinct.insert(distinct.end(), cap, cap + nc);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    auto key = [&](int64_t id) {
      return static_cast<int32_t>(std::lower_bound(distinct.begin(), distinct.end(), id) - distinct.begin());
    };
    img_key.resize(ni);
    cap_key.resize(nc);
    for (int64_t i = 0; i < ni; ++i) img_key[i] = key(img[i]);
    for (int64_t c = 0; c < nc; ++c) cap_key[c] = key(cap[c]);
  }

  int64_t n_positive_rows(int64_t c) const { return pos.col_ptr[c + 1] - pos.col_ptr[c]; }
  int64_t chunk_begin(int64_t chunk) const { return (chunk * ni + n_chunks - 1) / n_chunks; }

  // Runs body(chunk, row) for rows [begin, end), all rows of a chunk on one thread.
  template <typename Body>
  void for_rows(int64_t begin, int64_t end, const Body& body) const {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        int64_t lo = std::max(begin, chunk_begin(chunk)), hi = std::min(end, chunk_begin(chunk + 1));
        for (int64_t i = lo; i < hi; ++i) body(chunk, i);
      }
    });
  }
};

// Per-chunk dense buffers, one slot per column.
template <typename V>
using PerChunk = std::vector<std::vector<V>>;

// ------------------------------------------------------------------ forward
template <typename acc_t>
struct ForwardScan {
  const Problem<acc_t>& p;
  std::vector<acc_t> row_value;     // ni: max over negatives (-inf: none)
  std::vector<int64_t> row_index;   // ni
  PerChunk<acc_t> col_value;        // running column maxima of each chunk
  PerChunk<int32_t> col_index;
  std::vector<acc_t> row_cost;      // sum of hinges, per row-CSR positive
  PerChunk<acc_t> col_cost_first;   // sum of hinges of each column's first positive
  PerChunk<acc_t> col_cost_extra;   // ... of its further positives, per col-CSR positive

  explicit ForwardScan(const Problem<acc_t>& problem)
      : p(problem),
        row_value(problem.ni),
        row_index(problem.ni),
        col_value(problem.n_chunks, std::vector<acc_t>(problem.nc, kNegInf<acc_t>)),
        col_index(problem.n_chunks, std::vector<int32_t>(problem.nc, -1)),
        row_cost(problem.pos.row_cols.size(), acc_t(0)),
        col_cost_first(problem.max_violation ? 0 : problem.n_chunks, std::vector<acc_t>(problem.nc, acc_t(0))),
        col_cost_extra(problem.max_violation ? 0 : problem.n_chunks,
                       std::vector<acc_t>(problem.pos.col_rows.size(), acc_t(0))) {}

  // Row i of S (global row index), values s[0..nc).
  template <typename T>
  void scan_row(int64_t chunk, int64_t i, const T* s) {
    const int32_t id = p.img_key[i];
    const int32_t* cap_ids = p.cap_key.data();
    acc_t* __restrict__ cv = col_value[chunk].data();
    int32_t* __restrict__ ci = col_index[chunk].data();
    const int32_t row = static_cast<int32_t>(i);
    // kLanes independent maxima let the compiler vectorise a reduction it may not reorder.
    acc_t lane[kLanes];
    std::fill(lane, lane + kLanes, kNegInf<acc_t>);
    for (int64_t c0 = 0; c0 < p.nc; c0 += kLanes) {
      const int64_t width = std::min(kLanes, p.nc - c0);
      for (int64_t j = 0; j < width; ++j) {
        const int64_t c = c0 + j;
        const acc_t v = cap_ids[c] != id ? static_cast<acc_t>(s[c]) : kNegInf<acc_t>;
        lane[j] = v > lane[j] ? v : lane[j];
        const bool higher = v > cv[c];  // strict: rows come in ascending order, so ties keep the lowest
        cv[c] = higher ? v : cv[c];
        ci[c] = higher ? row : ci[c];
      }
    }
    const acc_t best = *std::max_element(lane, lane + kLanes);
    int64_t arg = -1;
    if (best > kNegInf<acc_t>)
      for (int64_t c = 0; c < p.nc && arg < 0; ++c)
        if (cap_ids[c] != id && static_cast<acc_t>(s[c]) == best) arg = c;
    row_value[i] = best;
    row_index[i] = arg;
    if (!p.max_violation) add_hinges(chunk, i, s);
  }

  template <typename T>
  void add_hinges(int64_t chunk, int64_t i, const T* s) {
    const int32_t id = p.img_key[i];
    const int32_t* cap_ids = p.cap_key.data();
    const auto& pos = p.pos;
    for (int64_t k = pos.row_ptr[i]; k < pos.row_ptr[i + 1]; ++k) {
      const acc_t threshold = p.margin - p.pos_score_row[k];
      acc_t lane[kLanes] = {};
      for (int64_t c = 0; c < p.nc; ++c) {
        const acc_t h = std::max(acc_t(0), threshold + static_cast<acc_t>(s[c]));
        lane[c % kLanes] += cap_ids[c] != id ? h : acc_t(0);
      }
      row_cost[k] += std::accumulate(lane, lane + kLanes, acc_t(0));
    }
    acc_t* first = col_cost_first[chunk].data();
    const acc_t* threshold = p.col_threshold.data();
    for (int64_t c = 0; c < p.nc; ++c) {
      const acc_t h = std::max(acc_t(0), threshold[c] + static_cast<acc_t>(s[c]));
      first[c] += cap_ids[c] != id ? h : acc_t(0);
    }
    acc_t* extra = col_cost_extra[chunk].data();
    for (int64_t c : p.multi_cols) {
      if (cap_ids[c] == id) continue;
      for (int64_t k = pos.col_ptr[c] + 1; k < pos.col_ptr[c + 1]; ++k)
        extra[k] += std::max(acc_t(0), (p.margin - p.pos_score_col[k]) + static_cast<acc_t>(s[c]));
    }
  }

  std::tuple<Tensor, Tensor, Tensor> finish(at::ScalarType acc_type) {
    const auto& pos = p.pos;
    Tensor per_caption = at::zeros({p.nc}, at::TensorOptions().dtype(acc_type));
    Tensor hard_cap = at::from_blob(row_index.data(), {p.ni}, at::kLong).clone();
    Tensor hard_img = at::empty({p.nc}, at::kLong);
    acc_t* out = per_caption.data_ptr<acc_t>();
    int64_t* hi = hard_img.data_ptr<int64_t>();
    // Merge the chunks' column maxima: higher value wins, equal values keep the lower row.
    std::vector<acc_t> col_max(col_value[0]);
    for (int64_t c = 0; c < p.nc; ++c) hi[c] = col_index[0][c];
    for (int64_t chunk = 1; chunk < p.n_chunks; ++chunk)
      for (int64_t c = 0; c < p.nc; ++c)
        if (col_index[chunk][c] >= 0 && (hi[c] < 0 || col_value[chunk][c] > col_max[c])) {
          col_max[c] = col_value[chunk][c];
          hi[c] = col_index[chunk][c];
        }

    if (p.max_violation) {
      for (int64_t c = 0; c < p.nc; ++c)
        for (int64_t k = pos.col_ptr[c]; k < pos.col_ptr[c + 1]; ++k) {
          const int64_t i = pos.col_rows[k];
          const acc_t threshold = p.margin - p.pos_score_col[k];
          if (row_index[i] >= 0) out[c] += std::max(acc_t(0), threshold + row_value[i]);
          if (hi[c] >= 0) out[c] += std::max(acc_t(0), threshold + col_max[c]);
        }
      return {per_caption, hard_cap, hard_img};
    }
    for (int64_t i = 0; i < p.ni; ++i)
      for (int64_t k = pos.row_ptr[i]; k < pos.row_ptr[i + 1]; ++k) out[pos.row_cols[k]] += row_cost[k];
    for (int64_t chunk = 0; chunk < p.n_chunks; ++chunk) {
      for (int64_t c = 0; c < p.nc; ++c) out[c] += col_cost_first[chunk][c];
      for (int64_t c : p.multi_cols)
        for (int64_t k = pos.col_ptr[c] + 1; k < pos.col_ptr[c + 1]; ++k) out[c] += col_cost_extra[chunk][k];
    }
    return {per_caption, hard_cap, hard_img};
  }
};

// ------------------------------------------------------------------ backward
// A gradient term d(loss)/dS[row, col] += value.
template <typename acc_t>
struct Term {
  int64_t row, col;
  acc_t value;
};

// The sparse part of the gradient: all of it for max violation, the positive
// cells for the sum of hinges (whose hinge counts the dense scan collected).
template <typename acc_t, typename ScoreFn>
std::vector<Term<acc_t>> sparse_terms(const Problem<acc_t>& p, const acc_t* g, const int64_t* hard_cap,
                                      const int64_t* hard_img, ScoreFn score,
                                      const std::vector<int64_t>& row_counts,
                                      const std::vector<int64_t>& col_counts) {
  const auto& pos = p.pos;
  std::vector<Term<acc_t>> terms;
  for (int64_t i = 0; i < p.ni; ++i) {
    const acc_t row_max = hard_cap[i] >= 0 && p.max_violation ? score(i, hard_cap[i]) : acc_t(0);
    for (int64_t k = pos.row_ptr[i]; k < pos.row_ptr[i + 1]; ++k) {
      const int64_t c = pos.row_cols[k];
      if (p.max_violation) {
        if (hard_cap[i] >= 0 && active(p.margin, p.pos_score_row[k], row_max)) {
          terms.push_back({i, c, -g[c]});
          terms.push_back({i, hard_cap[i], g[c]});
        }
      } else if (row_counts[k] > 0) {
        terms.push_back({i, c, -g[c] * static_cast<acc_t>(row_counts[k])});
      }
    }
  }
  for (int64_t c = 0; c < p.nc; ++c) {
    const acc_t col_max = hard_img[c] >= 0 && p.max_violation ? score(hard_img[c], c) : acc_t(0);
    for (int64_t k = pos.col_ptr[c]; k < pos.col_ptr[c + 1]; ++k) {
      const int64_t i = pos.col_rows[k];
      if (p.max_violation) {
        if (hard_img[c] >= 0 && active(p.margin, p.pos_score_col[k], col_max)) {
          terms.push_back({i, c, -g[c]});
          terms.push_back({hard_img[c], c, g[c]});
        }
      } else if (col_counts[k] > 0) {
        terms.push_back({i, c, -g[c] * static_cast<acc_t>(col_counts[k])});
      }
    }
  }
  return terms;
}

// Gradient of the column hinges of one row: cell c is active when it is a negative
// and (margin - S[first positive of c, c]) + S[i, c] > 0. A free function so that
// __restrict__ holds and the loop vectorises (branch-free: the outcome is random).
template <typename acc_t, typename T>
void column_hinge_grads(int64_t n, int32_t id, const int32_t* __restrict__ keys, const T* __restrict__ s,
                        const acc_t* __restrict__ threshold, const acc_t* __restrict__ g,
                        acc_t* __restrict__ buf, int32_t* __restrict__ count) {
  for (int64_t c = 0; c < n; ++c) {
    const bool on = (keys[c] != id) & (threshold[c] + static_cast<acc_t>(s[c]) > acc_t(0));
    buf[c] += on ? g[c] : acc_t(0);
    count[c] += on;
  }
}

// Dense sum-of-hinges gradient over negative cells, one row at a time; counts the
// active hinges of every positive pair for sparse_terms.
template <typename acc_t>
struct HingeGradScan {
  const Problem<acc_t>& p;
  const acc_t* g;
  std::vector<int64_t> row_counts;   // per row-CSR positive
  PerChunk<int32_t> count_first;     // active hinges of each column's first positive (32-bit: vectorises with fp32)
  PerChunk<int64_t> count_extra;     // ... of its further positives, per col-CSR positive
  PerChunk<acc_t> row_buffer;        // one row of gradient in acc precision

  HingeGradScan(const Problem<acc_t>& problem, const acc_t* grad)
      : p(problem),
        g(grad),
        row_counts(problem.pos.row_cols.size(), 0),
        count_first(problem.n_chunks, std::vector<int32_t>(problem.nc, 0)),
        count_extra(problem.n_chunks, std::vector<int64_t>(problem.pos.col_rows.size(), 0)),
        row_buffer(problem.n_chunks, std::vector<acc_t>(problem.nc)) {}

  // Writes the gradient of row i (global index) of S into out[0..nc); positive cells get 0.
  template <typename T, typename Out>
  void scan_row(int64_t chunk, int64_t i, const T* __restrict__ s, Out* __restrict__ out) {
    const int32_t id = p.img_key[i];
    const int32_t* cap_ids = p.cap_key.data();
    const auto& pos = p.pos;
    acc_t* __restrict__ buf = row_buffer[chunk].data();
    std::fill(buf, buf + p.nc, acc_t(0));
    for (int64_t k = pos.row_ptr[i]; k < pos.row_ptr[i + 1]; ++k) {
      const acc_t threshold = p.margin - p.pos_score_row[k];
      const acc_t gk = g[pos.row_cols[k]];
      int32_t count = 0;
      for (int64_t c = 0; c < p.nc; ++c) {
        const bool on = (cap_ids[c] != id) & (threshold + static_cast<acc_t>(s[c]) > acc_t(0));
        buf[c] += on ? gk : acc_t(0);
        count += on;
      }
      row_counts[k] += count;
    }
    column_hinge_grads(p.nc, id, cap_ids, s, p.col_threshold.data(), g, buf, count_first[chunk].data());
    int64_t* extra = count_extra[chunk].data();
    for (int64_t c : p.multi_cols) {
      if (cap_ids[c] == id) continue;
      for (int64_t k = pos.col_ptr[c] + 1; k < pos.col_ptr[c + 1]; ++k)
        if (active(p.margin, p.pos_score_col[k], static_cast<acc_t>(s[c]))) {
          buf[c] += g[c];
          ++extra[k];
        }
    }
    for (int64_t c = 0; c < p.nc; ++c) out[c] = static_cast<Out>(buf[c]);
  }

  // Active-hinge counts per col-CSR positive, summed over chunks.
  std::vector<int64_t> col_counts() const {
    const auto& pos = p.pos;
    std::vector<int64_t> total(pos.col_rows.size(), 0);
    for (int64_t chunk = 0; chunk < p.n_chunks; ++chunk)
      for (int64_t c = 0; c < p.nc; ++c) {
        if (p.n_positive_rows(c) == 0) continue;
        total[pos.col_ptr[c]] += count_first[chunk][c];
        for (int64_t k = pos.col_ptr[c] + 1; k < pos.col_ptr[c + 1]; ++k) total[k] += count_extra[chunk][k];
      }
    return total;
  }
};

// ------------------------------------------------------------------ checks
void check_cpu_ids(const Tensor& ids, const char* name, int64_t n) {
  TORCH_CHECK(ids.device().is_cpu(), name, " must be a CPU tensor, got ", ids.device());
  check_ids(ids, n, name);
}

void check_scores(const Tensor& scores, const Tensor& img_ids, const Tensor& cap_ids) {
  TORCH_CHECK(scores.device().is_cpu(), "scores must be a CPU tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D, got shape ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be floating, got ", scores.scalar_type());
  check_cpu_ids(img_ids, "img_ids", scores.size(0));
  check_cpu_ids(cap_ids, "cap_img_ids", scores.size(1));
}

void check_embeddings(const Tensor& img, const Tensor& cap, const Tensor& img_ids, const Tensor& cap_ids) {
  TORCH_CHECK(img.device().is_cpu() && cap.device().is_cpu(), "img and cap must be CPU tensors");
  TORCH_CHECK(img.dim() == 2 && cap.dim() == 2 && img.size(1) == cap.size(1),
              "img (Ni, d) and cap (Nc, d) must be 2-D with equal d, got ", img.sizes(), " and ", cap.sizes());
  TORCH_CHECK(at::isFloatingType(img.scalar_type()) && img.scalar_type() == cap.scalar_type(),
              "img and cap must share a floating dtype, got ", img.scalar_type(), " and ", cap.scalar_type());
  check_cpu_ids(img_ids, "img_ids", img.size(0));
  check_cpu_ids(cap_ids, "cap_img_ids", cap.size(0));
}

// ------------------------------------------------------------------ scores entry point
std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& scores_in, const Tensor& img_ids_in,
                                               const Tensor& cap_ids_in, double margin, bool max_violation) {
  check_scores(scores_in, img_ids_in, cap_ids_in);
  check_finite(scores_in, "scores");
  const Tensor scores = scores_in.contiguous(), img_ids = img_ids_in.contiguous(), cap_ids = cap_ids_in.contiguous();
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hardest_negative_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t nc = scores.size(1);
    auto score = [&](int64_t i, int64_t c) { return static_cast<acc_t>(s[i * nc + c]); };
    Problem<acc_t> problem(img_ids, cap_ids, margin, max_violation, score);
    ForwardScan<acc_t> scan(problem);
    problem.for_rows(0, problem.ni, [&](int64_t chunk, int64_t i) { scan.scan_row(chunk, i, s + i * nc); });
    result = scan.finish(c10::CppTypeToScalarType<acc_t>::value);
  });
  return result;
}

Tensor backward_cpu(const Tensor& grad_in, const Tensor& scores_in, const Tensor& img_ids_in, const Tensor& cap_ids_in,
                    const Tensor& hard_cap_in, const Tensor& hard_img_in, double margin, bool max_violation) {
  check_scores(scores_in, img_ids_in, cap_ids_in);
  const Tensor scores = scores_in.contiguous(), img_ids = img_ids_in.contiguous(), cap_ids = cap_ids_in.contiguous();
  const Tensor hard_cap = hard_cap_in.contiguous(), hard_img = hard_img_in.contiguous();
  Tensor grad_scores = max_violation ? at::zeros_like(scores) : at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hardest_negative_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor grad = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* out = grad_scores.data_ptr<scalar_t>();
    const int64_t nc = scores.size(1);
    auto score = [&](int64_t i, int64_t c) { return static_cast<acc_t>(s[i * nc + c]); };
    Problem<acc_t> problem(img_ids, cap_ids, margin, max_violation, score);
    std::vector<int64_t> row_counts, col_counts;
    if (!max_violation) {
      HingeGradScan<acc_t> scan(problem, grad.data_ptr<acc_t>());
      problem.for_rows(0, problem.ni,
                       [&](int64_t chunk, int64_t i) { scan.scan_row(chunk, i, s + i * nc, out + i * nc); });
      row_counts = std::move(scan.row_counts);
      col_counts = scan.col_counts();
    }
    const auto terms = sparse_terms(problem, grad.data_ptr<acc_t>(), hard_cap.data_ptr<int64_t>(),
                                    hard_img.data_ptr<int64_t>(), score, row_counts, col_counts);
    for (const auto& t : terms) {
      scalar_t& cell = out[t.row * nc + t.col];
      cell = static_cast<scalar_t>(static_cast<acc_t>(cell) + t.value);
    }
  });
  return grad_scores;
}

// ------------------------------------------------------------------ embedding entry point
// score(i, c) = <img[i], cap[c]> for acc-typed contiguous embeddings.
template <typename acc_t>
auto dot_score(const Tensor& img, const Tensor& cap) {
  const acc_t* a = img.data_ptr<acc_t>();
  const acc_t* b = cap.data_ptr<acc_t>();
  const int64_t d = img.size(1);
  return [=](int64_t i, int64_t c) {
    acc_t sum = 0;
    for (int64_t k = 0; k < d; ++k) sum += a[i * d + k] * b[c * d + k];
    return sum;
  };
}

// S rows [i0, i0 + rows) as an acc-typed (rows, nc) tile.
Tensor score_tile(const Tensor& img_acc, const Tensor& cap_acc, int64_t i0, int64_t rows) {
  return at::mm(img_acc.narrow(0, i0, rows), cap_acc.t()).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> embed_forward_cpu(const Tensor& img_in, const Tensor& cap_in,
                                                     const Tensor& img_ids_in, const Tensor& cap_ids_in,
                                                     double margin, bool max_violation) {
  check_embeddings(img_in, cap_in, img_ids_in, cap_ids_in);
  check_finite(img_in, "img");
  check_finite(cap_in, "cap");
  const Tensor img_ids = img_ids_in.contiguous(), cap_ids = cap_ids_in.contiguous();
  std::tuple<Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img_in.scalar_type(), "hardest_negative_embed_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor img = img_in.to(acc_type).contiguous(), cap = cap_in.to(acc_type).contiguous();
    auto score = dot_score<acc_t>(img, cap);
    Problem<acc_t> problem(img_ids, cap_ids, margin, max_violation, score);
    ForwardScan<acc_t> scan(problem);
    for (int64_t i0 = 0; i0 < problem.ni; i0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, problem.ni - i0);
      const Tensor tile = score_tile(img, cap, i0, rows);
      const acc_t* t = tile.data_ptr<acc_t>();
      problem.for_rows(i0, i0 + rows,
                       [&](int64_t chunk, int64_t i) { scan.scan_row(chunk, i, t + (i - i0) * problem.nc); });
    }
    result = scan.finish(acc_type);
  });
  return result;
}

std::tuple<Tensor, Tensor> embed_backward_cpu(const Tensor& grad_in, const Tensor& img_in, const Tensor& cap_in,
                                              const Tensor& img_ids_in, const Tensor& cap_ids_in,
                                              const Tensor& hard_cap_in, const Tensor& hard_img_in, double margin,
                                              bool max_violation) {
  check_embeddings(img_in, cap_in, img_ids_in, cap_ids_in);
  const Tensor img_ids = img_ids_in.contiguous(), cap_ids = cap_ids_in.contiguous();
  const Tensor hard_cap = hard_cap_in.contiguous(), hard_img = hard_img_in.contiguous();
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img_in.scalar_type(), "hardest_negative_embed_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor img = img_in.to(acc_type).contiguous(), cap = cap_in.to(acc_type).contiguous();
    const Tensor grad = grad_in.to(acc_type).contiguous();
    auto score = dot_score<acc_t>(img, cap);
    Problem<acc_t> problem(img_ids, cap_ids, margin, max_violation, score);
    Tensor grad_img = at::zeros_like(img), grad_cap = at::zeros_like(cap);
    std::vector<int64_t> row_counts, col_counts;
    if (!max_violation) {
      HingeGradScan<acc_t> scan(problem, grad.data_ptr<acc_t>());
      Tensor g_tile = at::empty({std::min(kTileRows, problem.ni), problem.nc}, img.options());
      for (int64_t i0 = 0; i0 < problem.ni; i0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, problem.ni - i0);
        const Tensor tile = score_tile(img, cap, i0, rows);
        const acc_t* t = tile.data_ptr<acc_t>();
        acc_t* gt = g_tile.data_ptr<acc_t>();
        problem.for_rows(i0, i0 + rows, [&](int64_t chunk, int64_t i) {
          scan.scan_row(chunk, i, t + (i - i0) * problem.nc, gt + (i - i0) * problem.nc);
        });
        const Tensor g_rows = g_tile.narrow(0, 0, rows);
        grad_img.narrow(0, i0, rows).copy_(at::mm(g_rows, cap));
        grad_cap.addmm_(g_rows.t(), img.narrow(0, i0, rows));
      }
      row_counts = std::move(scan.row_counts);
      col_counts = scan.col_counts();
    }
    const auto terms = sparse_terms(problem, grad.data_ptr<acc_t>(), hard_cap.data_ptr<int64_t>(),
                                    hard_img.data_ptr<int64_t>(), score, row_counts, col_counts);
    // Sparse terms: grad_img[row] += value * cap[col], grad_cap[col] += value * img[row] (in order).
    const int64_t d = img.size(1);
    const acc_t *a = img.data_ptr<acc_t>(), *b = cap.data_ptr<acc_t>();
    acc_t *ga = grad_img.data_ptr<acc_t>(), *gb = grad_cap.data_ptr<acc_t>();
    for (const auto& t : terms)
      for (int64_t k = 0; k < d; ++k) {
        ga[t.row * d + k] += t.value * b[t.col * d + k];
        gb[t.col * d + k] += t.value * a[t.row * d + k];
      }
    result = {grad_img.to(img_in.scalar_type()), grad_cap.to(cap_in.scalar_type())};
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("hardest_negative_forward", &forward_cpu);
  m.impl("hardest_negative_backward", &backward_cpu);
  m.impl("hardest_negative_embed_forward", &embed_forward_cpu);
  m.impl("hardest_negative_embed_backward", &embed_backward_cpu);
}

}  // namespace sgfused
