// sum_i x[i] y[i] in A (the inputs converted), with independent partial sums so that it vectorises
// without -ffast-math: a single running sum is one long dependency chain, about 16x slower.
#pragma once

#include <cstdint>

namespace sgfused {

template <typename T, typename A = T>
A dot(const T* x, const T* y, int64_t n) {
  constexpr int64_t kLanes = 128 / sizeof(A);
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += static_cast<A>(x[i + l]) * static_cast<A>(y[i + l]);
  A sum = 0;
  for (; i < n; ++i) sum += static_cast<A>(x[i]) * static_cast<A>(y[i]);
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

}  // namespace sgfused
