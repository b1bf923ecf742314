// Implementation and operator kernels of the shared input checks (csrc/input_checks.h; schemas
// in csrc/ops.cpp).
//
// The operators return a fresh tensor so that a compiled graph uses their output
// and cannot drop them as dead code: checked_lengths / checked_ids return the
// checked int64 tensor, check_finite returns a copy of `carry` (small tensors
// such as ids, which the caller passes on to its kernel). Kernels for CPU and
// CUDA tensors: the checks are plain ATen calls.
#include "../input_checks.h"

#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

namespace sgfused {

void check_lengths(const at::Tensor& lens, int64_t count, int64_t padded, c10::string_view name) {
  TORCH_CHECK(lens.scalar_type() == at::kLong, name, " must be int64, got ", lens.scalar_type());
  TORCH_CHECK_VALUE(lens.dim() == 1 && lens.numel() == count, name, " must have shape (", count, ") (one length per set), got ",
                    lens.sizes());
  if (count == 0) return;
  const auto [low_t, high_t] = at::aminmax(lens);
  const int64_t low = low_t.item<int64_t>(), high = high_t.item<int64_t>();
  TORCH_CHECK_VALUE(low >= 1 && high <= padded, name, " must lie in [1, ", padded,
                    "] (the padded length), got values in [", low, ", ", high, "]");
}

void check_ids(const at::Tensor& ids, int64_t count, c10::string_view name) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == count, name, " must have shape (", count, "), got ", ids.sizes());
}

void check_finite(const at::Tensor& values, c10::string_view name) {
  if (values.numel() == 0 || !at::isFloatingType(values.scalar_type())) return;
  const auto [low, high] = at::aminmax(values);  // NaN propagates into both: one pass, no full-size mask
  if (at::isfinite(at::stack({low, high})).all().item<bool>()) return;
  const at::Tensor bad = at::logical_not(at::isfinite(values)).nonzero()[0];
  std::ostringstream where;
  where << "(";
  for (int64_t i = 0; i < bad.numel(); ++i) where << (i ? ", " : "") << bad[i].item<int64_t>();
  where << (bad.numel() == 1 ? ",)" : ")");
  at::Tensor value = values;
  for (int64_t i = 0; i < bad.numel(); ++i) value = value.select(0, bad[i].item<int64_t>());
  const double v = value.item<double>();
  const char* what = std::isnan(v) ? "NaN" : (v > 0 ? "inf" : "-inf");
  TORCH_CHECK_VALUE(false, name, " contains ", what, " (first at index ", where.str(), "); it must be finite");
}

namespace {

at::Tensor checked_lengths_op(const at::Tensor& lens, int64_t count, int64_t padded, c10::string_view name) {
  check_lengths(lens, count, padded, name);
  return lens.clone(at::MemoryFormat::Contiguous);
}

at::Tensor checked_ids_op(const at::Tensor& ids, int64_t count, c10::string_view name) {
  check_ids(ids, count, name);
  return ids.clone(at::MemoryFormat::Contiguous);
}

at::Tensor check_finite_op(const at::Tensor& values, c10::string_view name, const at::Tensor& carry) {
  check_finite(values, name);
  return carry.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

}  // namespace sgfused

TORCH_LIBRARY_IMPL(sgfused, CPU, m) {
  m.impl("checked_lengths", &sgfused::checked_lengths_op);
  m.impl("checked_ids", &sgfused::checked_ids_op);
  m.impl("check_finite", &sgfused::check_finite_op);
}

TORCH_LIBRARY_IMPL(sgfused, CUDA, m) {
  m.impl("checked_lengths", &sgfused::checked_lengths_op);
  m.impl("checked_ids", &sgfused::checked_ids_op);
  m.impl("check_finite", &sgfused::check_finite_op);
}
