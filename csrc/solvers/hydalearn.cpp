// HydaLearn (Verboven et al., 2020, "HydaLearn: Highly Dynamic Task Weighting for Multi-task Learning
// with Auxiliary Tasks", arXiv:2008.11643): per-step task weights proportional to the gain of the
// main task from a step along each task's gradient, w_i / w_j = δ_i / δ_j. To first order a step
// −η g_k changes the main loss by −η g_mainᵀ g_k, so δ_k ∝ G[main, k] (η cancels in the ratios).
// Negative gains (a step that would increase the main loss) give weight 0; the weights sum to 1.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor hydalearn_weights(const at::Tensor& gram, int64_t main) {
  const char* op = "mtlgrad.hydalearn_weights";
  Matrix G = gram_matrix(gram, op);
  const int64_t T = G.n;
  TORCH_CHECK_VALUE(0 <= main && main < T, op, ": main task ", main, " is out of range for ", T, " tasks");
  normalise_trace(G);  // the gains' ratios are scale-free
  Vector weights(static_cast<size_t>(T), 0.0);
  double total = 0;
  for (int64_t k = 0; k < T; ++k) total += (weights[size_t(k)] = std::max(G(main, k), 0.0));
  if (total > 0) {
    for (double& w : weights) w /= total;
  } else {
    // A zero main gradient: no task can improve the main task to first order; keep the main task
    // alone (the update is then its zero gradient).
    weights[size_t(main)] = 1;
  }
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `main` is the index of the main task.
  m.def("hydalearn_weights(Tensor gram, int main) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("hydalearn_weights", &hydalearn_weights); }

}  // namespace mtlgrad::solvers
