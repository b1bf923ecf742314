// C++ smoke test of the LibTorch build (CMakeLists.txt, run by ctest).
//
// Linked against libsgfused with --no-as-needed, so loading this program loads
// the library and its static initialisers register the sgfused operators. The
// test finds hardest_negative_forward through the dispatcher and checks it on a
// hand-made 3x3 score matrix against values worked out by hand from
// docs/hardest_negative_contract.md.
//
// Scores S (rows = images i, columns = captions c), positives on the diagonal
// (img_ids = cap_img_ids = {0, 1, 2}), margin m = 0.2, h(x) = max(0, x):
//
//          c=0   c=1   c=2
//   i=0 [ 0.9   0.45  0.8 ]
//   i=1 [ 0.3   0.7   0.6 ]
//   i=2 [ 0.4   0.4   0.5 ]
//
// Hardest negatives (max over the off-diagonal entries, lowest index on ties):
//   row 0: max(0.45, 0.8) = 0.8 at c=2      -> hard_cap[0] = 2
//   row 1: max(0.3, 0.6)  = 0.6 at c=2      -> hard_cap[1] = 2
//   row 2: max(0.4, 0.4)  = 0.4, tie c=0,1  -> hard_cap[2] = 0
//   col 0: max(0.3, 0.4)  = 0.4 at i=2      -> hard_img[0] = 2
//   col 1: max(0.45, 0.4) = 0.45 at i=0     -> hard_img[1] = 0
//   col 2: max(0.8, 0.6)  = 0.8 at i=0      -> hard_img[2] = 0
//   (the same in both modes)
//
// max_violation = true: per_caption[c] = h(m - S[c,c] + row_max[c]) + h(m - S[c,c] + col_max[c])
//   c=0: h(0.2 - 0.9 + 0.8) + h(0.2 - 0.9 + 0.4)  = 0.1 + 0   = 0.1
//   c=1: h(0.2 - 0.7 + 0.6) + h(0.2 - 0.7 + 0.45) = 0.1 + 0   = 0.1
//   c=2: h(0.2 - 0.5 + 0.4) + h(0.2 - 0.5 + 0.8)  = 0.1 + 0.5 = 0.6
//
// max_violation = false: sum of hinges over all negatives of the row and the column
//   c=0 (m - S = -0.7): row 0 h(-0.7+0.45) + h(-0.7+0.8) = 0 + 0.1
//                       col 0 h(-0.7+0.3)  + h(-0.7+0.4) = 0 + 0        -> 0.1
//   c=1 (m - S = -0.5): row 1 h(-0.5+0.3)  + h(-0.5+0.6) = 0 + 0.1
//                       col 1 h(-0.5+0.45) + h(-0.5+0.4) = 0 + 0        -> 0.1
//   c=2 (m - S = -0.3): row 2 h(-0.3+0.4)  + h(-0.3+0.4) = 0.1 + 0.1
//                       col 2 h(-0.3+0.8)  + h(-0.3+0.6) = 0.5 + 0.3    -> 1.0
//
// No hinge argument is within 0.05 of zero, so float32 rounding cannot flip one.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, double, bool);

int failures = 0;

void fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  ++failures;
}

void check_per_caption(const char* mode, const at::Tensor& got, const std::vector<double>& want) {
  if (got.scalar_type() != at::kFloat) {
    fail(std::string(mode) + ": per_caption dtype is " + c10::toString(got.scalar_type()) + ", expected Float");
    return;
  }
  if (got.dim() != 1 || got.size(0) != static_cast<int64_t>(want.size())) {
    fail(std::string(mode) + ": per_caption has shape " + c10::str(got.sizes()) + ", expected (3)");
    return;
  }
  const at::Tensor g = got.contiguous();
  const float* p = g.data_ptr<float>();
  for (size_t c = 0; c < want.size(); ++c) {
    if (!(std::fabs(static_cast<double>(p[c]) - want[c]) <= 1e-5)) {
      fail(std::string(mode) + ": per_caption[" + std::to_string(c) + "] = " + std::to_string(p[c]) +
           ", expected " + std::to_string(want[c]));
    }
  }
}

void check_index(const char* mode, const char* name, const at::Tensor& got, const std::vector<int64_t>& want) {
  if (got.scalar_type() != at::kLong) {
    fail(std::string(mode) + ": " + name + " dtype is " + c10::toString(got.scalar_type()) + ", expected Long");
    return;
  }
  if (got.dim() != 1 || got.size(0) != static_cast<int64_t>(want.size())) {
    fail(std::string(mode) + ": " + name + " has shape " + c10::str(got.sizes()) + ", expected (3)");
    return;
  }
  const at::Tensor g = got.contiguous();
  const int64_t* p = g.data_ptr<int64_t>();
  for (size_t k = 0; k < want.size(); ++k) {
    if (p[k] != want[k]) {
      fail(std::string(mode) + ": " + name + "[" + std::to_string(k) + "] = " + std::to_string(p[k]) +
           ", expected " + std::to_string(want[k]));
    }
  }
}

}  // namespace

int main() {
  try {
    // Throws if libsgfused was not loaded (its TORCH_LIBRARY block never ran).
    c10::OperatorHandle handle =
        c10::Dispatcher::singleton().findSchemaOrThrow("sgfused::hardest_negative_forward", "");
    auto op = handle.typed<Forward>();

    const std::vector<float> s = {0.9f, 0.45f, 0.8f,  //
                                  0.3f, 0.7f,  0.6f,  //
                                  0.4f, 0.4f,  0.5f};
    const std::vector<int64_t> ids = {0, 1, 2};
    const at::Tensor scores = at::tensor(s, at::kFloat).reshape({3, 3});
    const at::Tensor img_ids = at::tensor(ids, at::kLong);
    const at::Tensor cap_img_ids = at::tensor(ids, at::kLong);

    const std::vector<int64_t> want_hard_cap = {2, 2, 0};
    const std::vector<int64_t> want_hard_img = {2, 0, 0};

    {
      auto [per_caption, hard_cap, hard_img] = op.call(scores, img_ids, cap_img_ids, 0.2, true);
      check_per_caption("max_violation=true", per_caption, {0.1, 0.1, 0.6});
      check_index("max_violation=true", "hard_cap", hard_cap, want_hard_cap);
      check_index("max_violation=true", "hard_img", hard_img, want_hard_img);
    }
    {
      auto [per_caption, hard_cap, hard_img] = op.call(scores, img_ids, cap_img_ids, 0.2, false);
      check_per_caption("max_violation=false", per_caption, {0.1, 0.1, 1.0});
      check_index("max_violation=false", "hard_cap", hard_cap, want_hard_cap);
      check_index("max_violation=false", "hard_img", hard_img, want_hard_img);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (failures != 0) {
    std::fprintf(stderr, "sgfused smoke test: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("sgfused smoke test: hardest_negative_forward OK (max_violation true and false)\n");
  return 0;
}
