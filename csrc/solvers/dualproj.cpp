// DualProj: the projection of the mean gradient onto the dual cone {x : J x >= 0} (Quinton & Rey,
// 2024, "Jacobian Descent for Multi-Objective Optimization"; the projection of Lopez-Paz &
// Ranzato, 2017, "Gradient Episodic Memory for Continual Learning", Eq. 11). The projection of
// Jᵀu is Jᵀ(u + v) with v the solution of min_{v >= 0} ½ vᵀ G v + (G u)ᵀ v, here with u = 1/T.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "dense.h"
#include "nonneg_qp.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor dualproj_weights(const at::Tensor& gram, double reg_eps) {
  TORCH_CHECK_VALUE(std::isfinite(reg_eps) && reg_eps >= 0,
                    "mtlgrad.dualproj_weights: reg_eps must be non-negative, got ", reg_eps);
  Matrix G = gram_matrix(gram, "mtlgrad.dualproj_weights");
  normalise_trace(G);  // the projection is scale-invariant; the QP's tolerances are relative
  add_trace_relative_ridge(G, reg_eps);
  const int64_t T = G.n;
  const Vector u(size_t(T), 1.0 / double(T));
  NonnegQP qp(G);
  Vector weights = qp.solve(multiply(G, u));
  for (double& w : weights) w += 1.0 / double(T);
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `reg_eps` is added to the diagonal of G / trace(G) (TorchJD's convention); 0 solves exactly.
  m.def("dualproj_weights(Tensor gram, float reg_eps) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("dualproj_weights", &dualproj_weights); }

}  // namespace mtlgrad::solvers
