// Data-dependent input checks shared by every backend (docs/*_contract.md, "bad input").
//
// The C++ kernels call these functions directly; the Triton launchers and the
// reference path reach the very same code through the operators
// sgfused::checked_lengths / checked_ids / check_finite (csrc/cpu/input_checks.cpp),
// which also keeps the checks inside graphs that torch.compile builds: a
// registered operator runs at run time, where Python checks would be traced away.
#pragma once

#include <ATen/ATen.h>

namespace sgfused {

// `lens` is int64, 1-D with `count` values, each in [1, padded] (ValueError naming `name` otherwise).
void check_lengths(const at::Tensor& lens, int64_t count, int64_t padded, c10::string_view name);

// `ids` is int64 and 1-D with `count` values.
void check_ids(const at::Tensor& ids, int64_t count, c10::string_view name);

// `values` holds no NaN and no +-inf (ValueError naming `name` and the first such index). One
// min/max reduction when all is well.
void check_finite(const at::Tensor& values, c10::string_view name);

}  // namespace sgfused
