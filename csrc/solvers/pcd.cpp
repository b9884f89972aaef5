// PCD, priority-constrained descent (Varam et al., "Not All Objectives Are Born Equal:
// Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026), in the
// form TorchJD 0.18 implements: task 0 is the primary objective, the others secondary. With the
// normalised gradients g̃_i = s_i g_i (s_i from a moving average of the squared norms, kept by the
// Python side and passed in as `scales`), the direction solves
//
//     min_d ½ ||d − g̃_1||²   subject to   g̃_jᵀ d >= τ_j ||g̃_j||²,   j = 2..T,
//
// and is rescaled to the norm of g_1. Stationarity gives d = g̃_1 + Σ_j μ_j g̃_j with KKT
// multipliers μ >= 0, so every inner product comes from G. The program is solved exactly by the
// dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian, as in TorchJD (the
// reference code enumerates the working sets, exponential in T; the minimiser is the same).
//
// Conventions (TorchJD's): g_1 = 0 gives 0; incompatible constraints (only possible with T >= 3,
// e.g. two anti-parallel secondary gradients) are dropped and the update is g_1; a direction that
// is zero to the rounding of G gives 0. The rounding of G is taken at float32's level, since
// the gradients are often float32 (TorchJD takes the Gram matrix's own dtype).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

constexpr const char* kOp = "mtlgrad.pcd_weights";
constexpr double kFloat32Epsilon = 1.1920928955078125e-07;
// Relative rounding of G, as in TorchJD: 10 ε of the gradients' precision.
constexpr double kPrecision = 10 * kFloat32Epsilon;
// A constraint holds when violated by at most this fraction of the largest diagonal entry.
constexpr double kSlackTolerance = 1e-9;

Vector checked_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble && t.device().is_cpu(), kOp, ": ", what,
                   " must be a float64 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, kOp, ": expected ", n, " ", what, ", got shape ",
                    t.sizes());
  const at::Tensor c = t.contiguous();
  const double* p = c.data_ptr<double>();
  Vector out(p, p + n);
  for (double v : out) TORCH_CHECK_VALUE(std::isfinite(v), kOp, ": ", what, " must be finite, got ", v);
  return out;
}

// The multipliers μ (size T − 1) of the program above on the Gram matrix G of the normalised
// gradients (primary first); all zero when the constraints are incompatible.
Vector solve_program(const Matrix& G, const Vector& taus) {
  const int64_t m = G.n - 1;
  Vector mu(size_t(m), 0.0);
  auto Gs = [&](int64_t i, int64_t j) { return G(i + 1, j + 1); };
  Vector b(static_cast<size_t>(m));  // b_j > 0 iff g_1 violates constraint j
  double diag_max = G(0, 0);
  for (int64_t j = 0; j < m; ++j) {
    b[size_t(j)] = taus[size_t(j)] * Gs(j, j) - G(j + 1, 0);
    diag_max = std::max(diag_max, Gs(j, j));
  }
  const double atol = kSlackTolerance * std::max(diag_max, std::numeric_limits<double>::min());
  const double dependence_tol = std::max(1e-9, kPrecision);
  std::vector<int64_t> active;
  std::vector<char> is_active(size_t(m), 0);
  auto slack = [&](int64_t j) {
    double s = -b[size_t(j)];
    for (int64_t k = 0; k < m; ++k) s += Gs(j, k) * mu[size_t(k)];
    return s;
  };
  const int64_t max_iterations = 10 * (m + 1);
  int64_t iterations = 0;
  while (iterations < max_iterations) {
    // The most violated inactive constraint (the active ones hold with equality, to rounding).
    int64_t p = -1;
    double slack_p = 0;
    for (int64_t j = 0; j < m; ++j) {
      if (is_active[size_t(j)]) continue;
      const double s = slack(j);
      if (p < 0 || s < slack_p) {
        p = j;
        slack_p = s;
      }
    }
    if (p < 0 || slack_p >= -atol) break;
    while (iterations < max_iterations) {
      ++iterations;
      // Dual step: +1 on μ_p, −r on the active μ; primal step along z = g_p − Σ r_j g_j, the part
      // of g_p orthogonal to the active gradients.
      const int64_t a = int64_t(active.size());
      Vector r(size_t(a), 0.0);
      double z_sq_norm = Gs(p, p);
      double partial_step = std::numeric_limits<double>::infinity();
      int64_t k_drop = -1;
      if (a > 0) {
        Matrix A(a);
        Vector rhs(static_cast<size_t>(a));
        for (int64_t i = 0; i < a; ++i) {
          rhs[size_t(i)] = Gs(active[size_t(i)], p);
          for (int64_t j = 0; j < a; ++j) A(i, j) = Gs(active[size_t(i)], active[size_t(j)]);
        }
        // The active gradients are independent (each entered with a non-zero z), so A is regular.
        if (!solve(A, rhs, r, 0.0)) return Vector(size_t(m), 0.0);
        for (int64_t i = 0; i < a; ++i) z_sq_norm -= rhs[size_t(i)] * r[size_t(i)];
        for (int64_t i = 0; i < a; ++i) {
          if (!(r[size_t(i)] > 0)) continue;
          const double ratio = mu[size_t(active[size_t(i)])] / r[size_t(i)];
          if (ratio < partial_step) {
            partial_step = ratio;
            k_drop = i;
          }
        }
      }
      // z = 0: g_p is a combination of the active gradients, no primal step is possible.
      const bool z_non_zero = z_sq_norm > dependence_tol * Gs(p, p);
      const double full_step = z_non_zero ? -slack_p / z_sq_norm : std::numeric_limits<double>::infinity();
      const double step = std::min(partial_step, full_step);
      if (std::isinf(step)) return Vector(size_t(m), 0.0);  // incompatible constraints
      for (int64_t i = 0; i < a; ++i) mu[size_t(active[size_t(i)])] -= step * r[size_t(i)];
      mu[size_t(p)] += step;
      if (full_step <= partial_step) {
        active.push_back(p);
        is_active[size_t(p)] = 1;
        break;
      }
      // The multiplier of active[k_drop] reached zero: drop it and try adding p again.
      mu[size_t(active[size_t(k_drop)])] = 0;
      is_active[size_t(active[size_t(k_drop)])] = 0;
      active.erase(active.begin() + k_drop);
      slack_p = slack(p);
    }
  }
  for (double& v : mu) v = std::max(v, 0.0);
  return mu;
}

at::Tensor pcd_weights(const at::Tensor& gram, const at::Tensor& scales, const at::Tensor& taus) {
  const Matrix G = gram_matrix(gram, kOp);
  const int64_t T = G.n;
  const Vector s = checked_vector(scales, T, "scales (one per task)");
  const Vector tau = checked_vector(taus, T - 1, "taus (one per secondary task)");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(s[size_t(t)] >= 0, kOp, ": the scales must be non-negative; task ", t, " has ",
                      s[size_t(t)]);
  for (int64_t j = 0; j + 1 < T; ++j)
    TORCH_CHECK_VALUE(tau[size_t(j)] >= 0 && tau[size_t(j)] <= 1, kOp, ": tau must lie in [0, 1]; task ",
                      j + 1, " has ", tau[size_t(j)]);
  Vector weights(size_t(T), 0.0);
  if (!(G(0, 0) > 0)) return to_tensor(weights);  // g_1 = 0: the update is 0
  // The normalised Gram matrix, divided by its mean diagonal entry: the multipliers do not depend
  // on a common factor, and the tolerances above become relative.
  Matrix Gn(T);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) Gn(i, j) = G(i, j) * s[size_t(i)] * s[size_t(j)];
  normalise_trace(Gn);
  const Vector mu = solve_program(Gn, tau);
  // v: the weights of d̃ on the original gradients; its squared norm from G, and the scale of the
  // rounding of that value (Σ |v_i| ||g_i||)².
  Vector v(static_cast<size_t>(T));
  v[0] = s[0];
  for (int64_t j = 1; j < T; ++j) v[size_t(j)] = mu[size_t(j - 1)] * s[size_t(j)];
  double sq_norm = 0, magnitude = 0;
  for (int64_t i = 0; i < T; ++i) {
    magnitude += std::abs(v[size_t(i)]) * std::sqrt(std::max(G(i, i), 0.0));
    for (int64_t j = 0; j < T; ++j) sq_norm += v[size_t(i)] * G(i, j) * v[size_t(j)];
  }
  if (!(sq_norm > kPrecision * magnitude * magnitude)) return to_tensor(weights);
  const double rescale = std::sqrt(G(0, 0) / sq_norm);
  for (int64_t i = 0; i < T; ++i) weights[size_t(i)] = v[size_t(i)] * rescale;
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  m.def("pcd_weights(Tensor gram, Tensor scales, Tensor taus) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("pcd_weights", &pcd_weights); }

}  // namespace mtlgrad::solvers
