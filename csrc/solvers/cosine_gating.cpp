// Gradient-similarity gating of auxiliary tasks (Du et al., 2018, "Adapting Auxiliary Losses Using
// Gradient Similarity", arXiv:1812.02224): the main task keeps weight 1; an auxiliary gradient g_k
// counts only while cos(g_main, g_k) > 0, with weight 1 (unweighted variant) or cos(g_main, g_k)
// (weighted variant). The cosines come from the main task's row of G.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor cosine_gating_weights(const at::Tensor& gram, int64_t main, bool weighted) {
  const char* op = "mtlgrad.cosine_gating_weights";
  Matrix G = gram_matrix(gram, op);
  const int64_t T = G.n;
  TORCH_CHECK_VALUE(0 <= main && main < T, op, ": main task ", main, " is out of range for ", T, " tasks");
  normalise_trace(G);  // cosines are scale-free; this keeps the products away from under/overflow
  Vector weights(static_cast<size_t>(T), 0.0);
  weights[size_t(main)] = 1;
  const double main_norm = std::sqrt(G(main, main));
  for (int64_t k = 0; k < T; ++k) {
    if (k == main) continue;
    const double norm = std::sqrt(G(k, k));
    // A zero gradient (main or auxiliary) has no direction: its cosine counts as 0, gate closed.
    const double cosine =
        main_norm > 0 && norm > 0 ? std::clamp(G(main, k) / main_norm / norm, -1.0, 1.0) : 0.0;
    if (cosine > 0) weights[size_t(k)] = weighted ? cosine : 1.0;
  }
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `main` is the index of the main task.
  m.def("cosine_gating_weights(Tensor gram, int main, bool weighted) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("cosine_gating_weights", &cosine_gating_weights); }

}  // namespace mtlgrad::solvers
