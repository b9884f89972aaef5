// Gradient matching for auxiliary tasks (in the spirit of ARML, Shi et al., 2020, "Auxiliary Task
// Reweighting for Minimum-data Learning"): non-negative auxiliary weights a minimising
// ||g_main - Σ_k a_k g_k||², i.e. the non-negative QP min_{a >= 0} ½ aᵀ G_AA a - G_Amᵀ a on the
// auxiliary block A of G. The weights are 1 for the main task and a_k for the auxiliaries.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "dense.h"
#include "nonneg_qp.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor gradient_matching_weights(const at::Tensor& gram, int64_t main) {
  Matrix G = gram_matrix(gram, "mtlgrad.gradient_matching_weights");
  const int64_t T = G.n;
  TORCH_CHECK_VALUE(main >= 0 && main < T, "mtlgrad.gradient_matching_weights: main task ", main,
                    " is out of range for ", T, " tasks");
  normalise_trace(G);  // a is scale-invariant; the QP's tolerances are relative
  Vector weights(size_t(T), 0.0);
  weights[size_t(main)] = 1.0;
  if (T == 1) return to_tensor(weights);
  const int64_t A = T - 1;
  auto task = [main](int64_t k) { return k < main ? k : k + 1; };  // k-th auxiliary task
  Matrix Q(A);
  Vector c(static_cast<size_t>(A));
  for (int64_t k = 0; k < A; ++k) {
    for (int64_t l = 0; l < A; ++l) Q(k, l) = G(task(k), task(l));
    c[size_t(k)] = -G(task(k), main);
  }
  NonnegQP qp(Q);
  const Vector& a = qp.solve(c);
  for (int64_t k = 0; k < A; ++k) weights[size_t(task(k))] = a[size_t(k)];
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `main` is the index of the main task.
  m.def("gradient_matching_weights(Tensor gram, int main) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("gradient_matching_weights", &gradient_matching_weights); }

}  // namespace mtlgrad::solvers
