// UPGrad (Quinton & Rey, 2024, "Jacobian Descent for Multi-Objective Optimization"): the mean of
// the projections of every task gradient onto the dual cone {x : J x >= 0}. By the paper's
// Proposition 1, the projection of Jᵀu is Jᵀ(u + v) with v the solution of the non-negative QP
// min_{v >= 0} ½ vᵀ G v + (G u)ᵀ v, so the whole method runs on G: one QP per task (u = e_i).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "dense.h"
#include "nonneg_qp.h"

namespace mtlgrad::solvers {
namespace {

// The T projections are independent: threads take contiguous blocks of at least this many tasks
// (each with its own solver workspace); the sum below runs in a fixed order, so the result does
// not depend on the thread count. Up to T = 128 the whole solve takes a few ms on one core, and a
// parallel region costs more than it saves on a busy machine (a descheduled thread stalls it).
constexpr int64_t kTasksPerThread = 128;

at::Tensor upgrad_weights(const at::Tensor& gram, double reg_eps) {
  TORCH_CHECK_VALUE(std::isfinite(reg_eps) && reg_eps >= 0,
                    "mtlgrad.upgrad_weights: reg_eps must be non-negative, got ", reg_eps);
  Matrix G = gram_matrix(gram, "mtlgrad.upgrad_weights");
  normalise_trace(G);  // the projections are scale-invariant; the QP's tolerances are relative
  add_trace_relative_ridge(G, reg_eps);
  const int64_t T = G.n;
  Matrix projections(T);  // row i: the weights u + v of the projection of g_i
  at::parallel_for(0, T, kTasksPerThread, [&](int64_t begin, int64_t end) {
    NonnegQP qp(G);
    Vector c(static_cast<size_t>(T));
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < T; ++k) c[size_t(k)] = G(i, k);  // G e_i (G is symmetric)
      const Vector& v = qp.solve(c);
      for (int64_t k = 0; k < T; ++k) projections(i, k) = v[size_t(k)];
      projections(i, i) += 1.0;
    }
  });
  Vector weights(size_t(T), 0.0);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t k = 0; k < T; ++k) weights[size_t(k)] += projections(i, k);
  for (double& w : weights) w /= double(T);
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `reg_eps` is added to the diagonal of G / trace(G) (TorchJD's convention); 0 solves exactly.
  m.def("upgrad_weights(Tensor gram, float reg_eps) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("upgrad_weights", &upgrad_weights); }

}  // namespace mtlgrad::solvers
