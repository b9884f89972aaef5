// Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, 2017, "Machine Learning with
// Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, section 4 and section 5). Of T
// gradients, f may be Byzantine. The score of gradient i is the sum of its squared distances to
// its T − f − 2 closest other gradients,
//
//     s(i) = Σ_{i→j} ||g_i − g_j||²,
//
// and Multi-Krum averages the m gradients of lowest score (m = 1: Krum, the single best one). The
// squared distances come from G: ||g_i − g_j||² = G_ii + G_jj − 2 G_ij (clamped at 0, rounding).
// Ties (equal scores, equal distances) go to the lower task index, so the weights are a function
// of G alone; tied gradients at distance 0 are equal, and which one is taken does not change the
// update.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

constexpr const char* kOp = "mtlgrad.krum_weights";

at::Tensor krum_weights(const at::Tensor& gram, int64_t n_byzantine, int64_t n_selected) {
  Matrix G = gram_matrix(gram, kOp);
  const int64_t T = G.n;
  TORCH_CHECK_VALUE(n_byzantine >= 0, kOp, ": n_byzantine must be non-negative, got ", n_byzantine);
  TORCH_CHECK_VALUE(n_selected >= 1, kOp, ": n_selected must be positive, got ", n_selected);
  TORCH_CHECK_VALUE(T >= n_byzantine + 3, kOp, ": n_byzantine=", n_byzantine,
                    " needs at least n_byzantine + 3 = ", n_byzantine + 3,
                    " tasks (a score sums over T - n_byzantine - 2 >= 1 neighbours), got ", T);
  TORCH_CHECK_VALUE(n_selected <= T, kOp, ": n_selected=", n_selected, " exceeds the number of tasks, ", T);
  // The selection compares sums of squared distances only: dividing G by a positive constant
  // changes nothing, and keeps 1e-30 and 1e30 gradients away from underflow and overflow.
  normalise_trace(G);
  const int64_t neighbours = T - n_byzantine - 2;
  Vector score(static_cast<size_t>(T), 0.0), distances;
  distances.reserve(size_t(T));
  for (int64_t i = 0; i < T; ++i) {
    distances.clear();
    for (int64_t j = 0; j < T; ++j)
      if (j != i) distances.push_back(std::max(0.0, G(i, i) + G(j, j) - 2 * G(i, j)));
    std::partial_sort(distances.begin(), distances.begin() + neighbours, distances.end());
    // Summed in ascending order: the score does not depend on the order of the other tasks.
    double s = 0;
    for (int64_t k = 0; k < neighbours; ++k) s += distances[size_t(k)];
    score[size_t(i)] = s;
  }
  std::vector<int64_t> order(static_cast<size_t>(T));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return score[size_t(a)] < score[size_t(b)]; });
  Vector weights(size_t(T), 0.0);
  for (int64_t k = 0; k < n_selected; ++k) weights[size_t(order[size_t(k)])] = 1.0 / double(n_selected);
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  m.def("krum_weights(Tensor gram, int n_byzantine, int n_selected) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("krum_weights", &krum_weights); }

}  // namespace mtlgrad::solvers
