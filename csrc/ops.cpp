// The one place where every sgfused operator schema is declared.
//
// Device implementations register against these schemas from csrc/cpu/*.cpp and
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL; Python adds fake (meta) kernels and
// autograd formulas in sgfused/ops/*.py. Keeping the schemas in one file means
// the Python package, the LibTorch library built by CMake and the tests all see
// exactly the same operator signatures.
#include <torch/library.h>

#include "build_info.h"

namespace sgfused {

std::string build_info_json() {
  std::string backends = "\"cpu\"";
#ifdef SGFUSED_WITH_CUDA
  backends += ", \"cuda\"";
#endif
  return std::string("{\"backends\": [") + backends + "], " +
         "\"cuda_arch_list\": \"" + SGFUSED_CUDA_ARCHS + "\", " +
         "\"torch_version\": \"" + SGFUSED_TORCH_VERSION + "\", " +
         "\"openmp\": " +
#ifdef _OPENMP
         "true" +
#else
         "false" +
#endif
         "}";
}

}  // namespace sgfused

TORCH_LIBRARY(sgfused, m) {
  // In-batch hardest-negative mining (docs/hardest_negative_contract.md). Positives are the pairs with
  // img_ids[i] == cap_img_ids[c]. Returns, per caption c, the sum over its
  // positive images i of cost_cap(i, c) + cost_img(i, c) (float32, (Nc,)), the
  // hardest negative caption of every image row (int64, (Ni,), -1 if none) and
  // the hardest negative image of every caption column (int64, (Nc,), -1 if none).
  m.def(
      "hardest_negative_forward(Tensor scores, Tensor img_ids, Tensor cap_img_ids, "
      "float margin, bool max_violation) -> (Tensor, Tensor, Tensor)");
  // Gradient of the per-caption losses with respect to the scores.
  m.def(
      "hardest_negative_backward(Tensor grad_per_caption, Tensor scores, Tensor img_ids, "
      "Tensor cap_img_ids, Tensor hard_cap, Tensor hard_img, float margin, "
      "bool max_violation) -> Tensor");
  // Same loss from embeddings: scores = img @ cap^T, computed tile by tile and
  // never stored whole.
  m.def(
      "hardest_negative_embed_forward(Tensor img, Tensor cap, Tensor img_ids, "
      "Tensor cap_img_ids, float margin, bool max_violation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "hardest_negative_embed_backward(Tensor grad_per_caption, Tensor img, Tensor cap, "
      "Tensor img_ids, Tensor cap_img_ids, Tensor hard_cap, Tensor hard_img, float margin, "
      "bool max_violation) -> (Tensor, Tensor)");

  // All-pairs (or aligned-pairs) learned vector similarity
  // (docs/pairwise_similarity_contract.md): out = l2norm(W e(x_i, y_j) + b) with
  // e = (x - y)^2 ("distance") or l2norm(x) * l2norm(y) ("direction"); also returns ||W e + b|| for the backward.
  m.def(
      "pairwise_similarity_forward(Tensor x, Tensor y, Tensor weight, Tensor? bias, str mode, "
      "float eps, bool aligned) -> (Tensor, Tensor)");
  m.def(
      "pairwise_similarity_backward(Tensor grad_out, Tensor x, Tensor y, Tensor weight, Tensor? bias, "
      "Tensor out, Tensor norm, str mode, float eps, bool aligned) -> (Tensor, Tensor, Tensor, Tensor)");

  // Batched region-word cross-attention for all (query set, context set) pairs
  // with a similarity epilogue (docs/cross_attention_contract.md).
  // Returns the epilogue's output and small per-(pair, query) statistics
  // (Nq, Nc, Lq, 2) that the backward may reuse.
  m.def(
      "cross_attention_forward(Tensor queries, Tensor contexts, Tensor query_lens, Tensor context_lens, "
      "float smooth, float leaky, str norm, str epilogue, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_attention_backward(Tensor grad_out, Tensor queries, Tensor contexts, Tensor query_lens, "
      "Tensor context_lens, float smooth, float leaky, str norm, str epilogue, Tensor? weight, "
      "Tensor? bias, float eps, Tensor out, Tensor stats) -> (Tensor, Tensor, Tensor, Tensor)");

  // Late-interaction max-mean score of all (image, caption) pairs, SGM Eq. 6-7
  // (docs/max_sim_contract.md): scores (Nx, Ny) float32 (float64 for float64 input) and,
  // when with_indices, the argmax image node of every caption node (Nx, Ny, Ly) int64
  // (-1 at padding), else an empty (0,) int64 tensor. The backward takes those indices.
  m.def("max_sim_forward(Tensor x, Tensor y, Tensor x_lens, Tensor y_lens, bool with_indices) -> (Tensor, Tensor)");
  m.def(
      "max_sim_backward(Tensor grad_scores, Tensor x, Tensor y, Tensor x_lens, Tensor y_lens, Tensor indices) "
      "-> (Tensor, Tensor)");

  // Shared data-dependent input checks (csrc/input_checks.h, csrc/cpu/input_checks.cpp), for the
  // Triton operators and the reference path. Each returns a fresh tensor for the caller to use, so
  // that a compiled graph keeps it: the checked int64 lengths / ids, or a copy of `carry` once
  // `values` is known to be finite.
  m.def("checked_lengths(Tensor lens, int count, int padded, str name) -> Tensor");
  m.def("checked_ids(Tensor ids, int count, str name) -> Tensor");
  m.def("check_finite(Tensor values, str name, Tensor carry) -> Tensor");
}
