// Nash-MTL (Navon et al., 2022, "Multi-Task Learning as a Bargaining Game", arXiv:2202.01017): the
// Nash bargaining solution d = Σ_i α_i g_i, where α > 0 solves G α = 1/α, found by the paper's
// sequence of convex problems (the concave-convex procedure of the official code, `optim_niter`
// iterations). Iteration k linearises φ(α) = Σ_i log α_i + Σ_i log β_i(α), β = G α, at α_k and solves
//
//     min_α  Σ_i β_i(α) + ∇φ(α_k)ᵀ α    s.t.  φ_i(α) = log α_i + log β_i(α) >= 0,   (P_k)
//
// a linear objective under convex constraints, which the official code hands to cvxpy/ECOS. Here it
// is solved natively, exactly:
//   * The fixed point α* (G α* = 1/α*) is the minimiser of the strictly convex
//     h(α) = ½ αᵀGα − Σ log α_i; damped Newton finds it in a few steps (h is self-concordant).
//   * If every constraint of (P_k) is active at its solution, that solution is α* (the only positive
//     solution of α_i β_i = 1). So α* is checked first with the KKT conditions of (P_k): it is
//     optimal iff the multipliers λ = (I + D G D)⁻¹ D c (D = diag α*, c the objective) are >= 0.
//     This holds in practice from any start near α*, so an iteration costs one Cholesky.
//   * Otherwise (P_k) is solved by a log-barrier interior-point method (Newton on
//     t cᵀα − Σ log φ_i(α), t increased tenfold until the duality gap T/t is below 1e-11 of the
//     objective).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

// In-place Cholesky factorisation A = L Lᵀ (L in the lower triangle). False if A is not positive
// definite to working precision.
bool cholesky(Matrix& A) {
  const int64_t n = A.n;
  for (int64_t j = 0; j < n; ++j) {
    double d = A(j, j);
    for (int64_t k = 0; k < j; ++k) d -= A(j, k) * A(j, k);
    if (!(d > 0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    A(j, j) = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double s = A(i, j);
      for (int64_t k = 0; k < j; ++k) s -= A(i, k) * A(j, k);
      A(i, j) = s / ljj;
    }
  }
  return true;
}

// Solves L Lᵀ x = b with the factor from cholesky().
Vector cholesky_solve(const Matrix& L, Vector b) {
  const int64_t n = L.n;
  for (int64_t i = 0; i < n; ++i) {
    double s = b[size_t(i)];
    for (int64_t k = 0; k < i; ++k) s -= L(i, k) * b[size_t(k)];
    b[size_t(i)] = s / L(i, i);
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    double s = b[size_t(i)];
    for (int64_t k = i + 1; k < n; ++k) s -= L(k, i) * b[size_t(k)];
    b[size_t(i)] = s / L(i, i);
  }
  return b;
}

// max_i |α_i β_i − 1|: the fixed-point residual, free of the scale of each gradient.
double fixed_point_residual(const Matrix& G, const Vector& alpha) {
  const Vector beta = multiply(G, alpha);
  double r = 0;
  for (size_t i = 0; i < alpha.size(); ++i) r = std::max(r, std::abs(alpha[i] * beta[i] - 1));
  return r;
}

enum class FixedPoint { kFound, kParetoStationary };

// The minimiser of h(α) = ½ αᵀGα − Σ log α_i (G trace-normalised, positive diagonal). h is bounded
// below iff some d has g_iᵀd > 0 for every task; otherwise (0 lies in the convex hull of the
// gradients: a Pareto-stationary point) Newton's iterates grow without bound along a v >= 0 with
// Jᵀv = 0, which is reported instead.
FixedPoint nash_fixed_point(const Matrix& G, Vector& alpha) {
  const int64_t n = G.n;
  alpha.assign(size_t(n), 0.0);
  for (int64_t i = 0; i < n; ++i) alpha[size_t(i)] = 1 / std::sqrt(G(i, i));  // exact if G is diagonal
  auto h = [&](const Vector& a) {
    const Vector Ga = multiply(G, a);
    double v = 0;
    for (int64_t i = 0; i < n; ++i) v += 0.5 * a[size_t(i)] * Ga[size_t(i)] - std::log(a[size_t(i)]);
    return v;
  };
  for (int iter = 0; iter < 200; ++iter) {
    const Vector Ga = multiply(G, alpha);
    Vector grad(static_cast<size_t>(n));
    Matrix H = G;
    for (int64_t i = 0; i < n; ++i) {
      grad[size_t(i)] = Ga[size_t(i)] - 1 / alpha[size_t(i)];
      H(i, i) += 1 / (alpha[size_t(i)] * alpha[size_t(i)]);
    }
    if (!cholesky(H)) break;  // cannot happen for a PSD G; keep the current iterate
    const Vector step = cholesky_solve(H, grad);
    const double decrement2 = dot(grad, step);  // squared Newton decrement
    // Inside the region of quadratic convergence (λ < 1/4) a full step stays in the domain
    // (|step_i| <= λ α_i) and decreases h; outside it, backtrack from the full step.
    double t = 1;
    if (decrement2 >= 0.0625) {
      for (int64_t i = 0; i < n; ++i)
        if (step[size_t(i)] > 0) t = std::min(t, 0.99 * alpha[size_t(i)] / step[size_t(i)]);
      const double h0 = h(alpha);
      Vector trial(static_cast<size_t>(n));
      for (int k = 0; k < 60; ++k, t *= 0.5) {
        for (int64_t i = 0; i < n; ++i) trial[size_t(i)] = alpha[size_t(i)] - t * step[size_t(i)];
        if (h(trial) <= h0 - 0.25 * t * decrement2) break;
      }
    }
    for (int64_t i = 0; i < n; ++i) alpha[size_t(i)] -= t * step[size_t(i)];
    // α_i √G_ii ≈ 1 / (√T cos(g_i, d)): beyond 1e8 no direction improves every task by more than
    // rounding noise.
    for (int64_t i = 0; i < n; ++i)
      if (!(alpha[size_t(i)] * std::sqrt(G(i, i)) < 1e8)) return FixedPoint::kParetoStationary;
    if (decrement2 < 1e-20) break;  // h within 1e-20 of its minimum: α* to ~1e-10 relative or better
  }
  return FixedPoint::kFound;
}

// Constraint values φ_i(α) = log α_i + log β_i; false outside the domain (α, β > 0).
bool constraint_values(const Matrix& G, const Vector& alpha, Vector& beta, Vector& phi) {
  beta = multiply(G, alpha);
  phi.resize(alpha.size());
  for (size_t i = 0; i < alpha.size(); ++i) {
    if (!(alpha[i] > 0) || !(beta[i] > 0)) return false;
    phi[i] = std::log(alpha[i]) + std::log(beta[i]);
  }
  return true;
}

// Log-barrier method for (P_k): min cᵀα s.t. φ_i(α) >= 0, from a strictly feasible start.
Vector barrier_solve(const Matrix& G, const Vector& c, Vector alpha) {
  const int64_t n = G.n;
  Vector beta, phi;
  auto barrier = [&](const Vector& a, double t) {
    Vector b, p;
    if (!constraint_values(G, a, b, p)) return std::numeric_limits<double>::infinity();
    double v = t * dot(c, a);
    for (double pi : p) {
      if (!(pi > 0)) return std::numeric_limits<double>::infinity();
      v -= std::log(pi);
    }
    return v;
  };
  double t = 1;
  for (int outer = 0; outer < 60; ++outer) {
    for (int iter = 0; iter < 100; ++iter) {
      constraint_values(G, alpha, beta, phi);
      // ∇φ_i = e_i / α_i + G_i / β_i;  ∇²φ_i = −e_i e_iᵀ / α_i² − G_i G_iᵀ / β_i².
      Matrix A(n);  // row i: ∇φ_i
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          A(i, j) = G(i, j) / beta[size_t(i)] + (i == j ? 1 / alpha[size_t(i)] : 0.0);
      Vector grad(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) {
        double s = t * c[size_t(j)];
        for (int64_t i = 0; i < n; ++i) s -= A(i, j) / phi[size_t(i)];
        grad[size_t(j)] = s;
      }
      Matrix H(n);
      for (int64_t i = 0; i < n; ++i) {
        const double wa = 1 / (phi[size_t(i)] * phi[size_t(i)]);
        const double wg = 1 / (beta[size_t(i)] * beta[size_t(i)] * phi[size_t(i)]);
        H(i, i) += 1 / (alpha[size_t(i)] * alpha[size_t(i)] * phi[size_t(i)]);
        for (int64_t j = 0; j < n; ++j) {
          const double aij = A(i, j) * wa, gij = G(i, j) * wg;
          if (aij == 0 && gij == 0) continue;
          for (int64_t k = 0; k < n; ++k) H(j, k) += aij * A(i, k) + gij * G(i, k);
        }
      }
      if (!cholesky(H)) break;
      const Vector step = cholesky_solve(H, grad);
      const double decrement2 = dot(grad, step);
      if (decrement2 < 1e-18) break;
      const double f0 = barrier(alpha, t);
      double s = 1;
      Vector trial(static_cast<size_t>(n));
      for (int k = 0; k < 60; ++k, s *= 0.5) {
        for (int64_t i = 0; i < n; ++i) trial[size_t(i)] = alpha[size_t(i)] - s * step[size_t(i)];
        if (barrier(trial, t) <= f0 - 0.25 * s * decrement2) break;
      }
      if (!(barrier(trial, t) < std::numeric_limits<double>::infinity())) break;
      alpha = trial;
      if (decrement2 < 1e-14) break;
    }
    if (double(n) / t <= 1e-11 * std::max(1.0, std::abs(dot(c, alpha)))) break;
    t *= 10;
  }
  return alpha;
}

// Solution of (P_k) linearised at `at` (α_k with G α_k > 0), given the fixed point α*.
Vector ccp_step(const Matrix& G, const Vector& at, const Vector& star) {
  const int64_t n = G.n;
  // c = ∇(Σ β_i) + ∇φ(α_k) = G 1 + 1/α_k + G (1/β_k)
  const Vector beta = multiply(G, at);
  Vector inv_beta(static_cast<size_t>(n)), c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) inv_beta[size_t(i)] = 1 / beta[size_t(i)];
  const Vector g_inv_beta = multiply(G, inv_beta);
  for (int64_t i = 0; i < n; ++i) {
    double row = 0;
    for (int64_t j = 0; j < n; ++j) row += G(i, j);
    c[size_t(i)] = row + 1 / at[size_t(i)] + g_inv_beta[size_t(i)];
  }
  // KKT at α*, where every constraint is active and ∇(α_i β_i) = β_i e_i + α_i G e_i:
  // c = Σ λ_i ∇(α_i β_i)  <=>  (I + D G D) λ = D c.
  Matrix M(n);
  Vector rhs(static_cast<size_t>(n));
  double largest = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) M(i, j) = star[size_t(i)] * G(i, j) * star[size_t(j)];
    M(i, i) += 1;
    rhs[size_t(i)] = star[size_t(i)] * c[size_t(i)];
  }
  if (cholesky(M)) {
    const Vector lambda = cholesky_solve(M, rhs);
    for (double l : lambda) largest = std::max(largest, std::abs(l));
    bool optimal = true;
    for (double l : lambda) optimal = optimal && l >= -1e-9 * std::max(1.0, largest);
    if (optimal) return star;
  }
  Vector interior = star;  // strictly feasible: α_i β_i = 1.01² > 1
  for (double& a : interior) a *= 1.01;
  return barrier_solve(G, c, interior);
}

// Returns (alpha, weights). `start` (None, or T values) is the previous call's α in the gradients'
// scale: the iterations start there (the official code's warm start). optim_niter == 0 reuses
// `start` as α. weights = α, scaled down so that ||Jᵀ w|| <= max_norm when max_norm > 0.
std::tuple<at::Tensor, at::Tensor> nash_mtl_weights(const at::Tensor& gram,
                                                    const std::optional<at::Tensor>& start_or_none,
                                                    int64_t optim_niter, double max_norm) {
  const char* op = "mtlgrad.nash_mtl_weights";
  const Matrix original = gram_matrix(gram, op);
  const int64_t T = original.n;
  TORCH_CHECK_VALUE(optim_niter >= 0, op, ": optim_niter must be non-negative, got ", optim_niter);
  TORCH_CHECK_VALUE(max_norm >= 0 && std::isfinite(max_norm), op, ": max_norm must be non-negative, got ",
                    max_norm);
  const at::Tensor start = start_or_none.has_value() ? *start_or_none : at::Tensor();
  const int64_t given = start.defined() ? start.numel() : 0;
  TORCH_CHECK_VALUE(given == 0 || (start.dim() == 1 && start.size(0) == T), op,
                    ": the starting weights must be None or hold one value per task (", T, "), got shape ",
                    start.sizes());
  TORCH_CHECK_VALUE(optim_niter > 0 || given == T, op,
                    ": reusing the weights (optim_niter = 0) needs the previous weights");
  Vector previous;
  if (given > 0) {
    const at::Tensor s = start.to(at::kDouble).contiguous();
    previous.assign(s.data_ptr<double>(), s.data_ptr<double>() + T);
  }

  Vector alpha(size_t(T), 0.0);
  Matrix G = original;
  const double scale = normalise_trace(G);
  if (optim_niter == 0) {
    alpha = previous;
  } else if (scale > 0) {
    // Tasks with a zero gradient (squared norm below 1e-30 of the mean) take no part in the
    // bargaining: no update changes their loss to first order. They get weight 0.
    std::vector<int64_t> active;
    for (int64_t i = 0; i < T; ++i)
      if (G(i, i) > 1e-30) active.push_back(i);
    const int64_t n = int64_t(active.size());
    Matrix Ga(n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) Ga(i, j) = G(active[size_t(i)], active[size_t(j)]);
    Vector star;
    if (nash_fixed_point(Ga, star) == FixedPoint::kFound) {
      // In normalised units α_n = α √scale. Start from the previous α when it is a valid
      // linearisation point (α > 0, G α > 0), else from α = 1 (the official initial value), else
      // from α* itself.
      const double root = std::sqrt(scale);
      auto valid = [&](const Vector& a) {
        for (double v : a)
          if (!(v > 0) || !std::isfinite(v)) return false;
        for (double b : multiply(Ga, a))
          if (!(b > 0) || !std::isfinite(b)) return false;
        return true;
      };
      Vector current;
      if (!previous.empty()) {
        current.resize(size_t(n));
        for (int64_t i = 0; i < n; ++i) current[size_t(i)] = previous[size_t(active[size_t(i)])] * root;
      }
      if (current.empty() || !valid(current)) current.assign(size_t(n), 1.0);
      if (!valid(current)) current = star;
      for (int64_t k = 0; k < optim_niter; ++k) {
        const Vector next = ccp_step(Ga, current, star);
        double change = 0, size = 0;
        for (int64_t i = 0; i < n; ++i) {
          change = std::max(change, std::abs(next[size_t(i)] - current[size_t(i)]));
          size = std::max(size, std::abs(current[size_t(i)]));
        }
        current = next;
        // The official stopping rules: the iterate solves G α = 1/α, or stopped moving (tighter
        // tolerances here, relative to α's size since the problem is scale-free).
        if (fixed_point_residual(Ga, current) < 1e-9 || change <= 1e-12 * size) break;
      }
      for (int64_t i = 0; i < n; ++i) alpha[size_t(active[size_t(i)])] = current[size_t(i)] / root;
    }
    // else: the active gradients are Pareto-stationary (0 is in their convex hull): no direction
    // improves every task, the bargaining problem has no solution, and the update is zero (α = 0),
    // the disagreement point.
  }

  // ||Jᵀα||² = αᵀGα with the caller's G.
  Vector weights = alpha;
  if (max_norm > 0) {
    const double norm = std::sqrt(std::max(dot(alpha, multiply(original, alpha)), 0.0));
    if (norm > max_norm)
      for (double& w : weights) w *= max_norm / norm;
  }
  return {to_tensor(alpha), to_tensor(weights)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // (alpha, weights); `start` is the previous alpha (or None), optim_niter = 0 reuses it.
  m.def(
      "nash_mtl_weights(Tensor gram, Tensor? start, int optim_niter, float max_norm) -> "
      "(Tensor alpha, Tensor weights)");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("nash_mtl_weights", &nash_mtl_weights); }

}  // namespace mtlgrad::solvers
