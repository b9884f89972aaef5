// FairGrad (Ban & Ji, 2024, "Fair Resource Allocation in Multi-Task Learning", Algorithm 1): the
// update d = Σ_i w_i g_i whose weights solve G w = w^{-1/α} (elementwise), w > 0.
//
// That system is the stationarity condition of the strictly convex function
//   Φ(w) = ½ wᵀ G w − Σ_i h(w_i),   h'(w) = w^{-1/α}   (h = log for α = 1, w^{1−1/α} / (1 − 1/α) else)
// on w > 0, so we minimise Φ by Newton's method with a step that keeps w positive and decreases Φ.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

// Added to the diagonal of the trace-normalised G. The system has no positive solution when some
// positive combination of the gradients vanishes (a zero gradient, two opposite ones, more tasks
// than dimensions around the origin): the weights along it grow without bound. The ridge keeps them
// finite, ≈ kRidge^{-α/(1+α)} (1e6 for α = 1), and moves well-posed solutions by ~1e-12 relative.
constexpr double kRidge = 1e-12;
constexpr int kMaxIterations = 200;

struct Potential {
  const Matrix& A;  // G / σ + kRidge I
  double alpha;

  double power(double w) const { return std::pow(w, -1 / alpha); }  // h'(w) = w^{-1/α}
  double h(double w) const { return alpha == 1 ? std::log(w) : std::pow(w, 1 - 1 / alpha) / (1 - 1 / alpha); }
  double value(const Vector& w) const {
    double quadratic = 0, concave = 0;
    for (int64_t i = 0; i < A.n; ++i) {
      double Aw = 0;
      for (int64_t j = 0; j < A.n; ++j) Aw += A(i, j) * w[size_t(j)];
      quadratic += w[size_t(i)] * Aw;
      concave += h(w[size_t(i)]);
    }
    return 0.5 * quadratic - concave;
  }
};

at::Tensor fairgrad_weights(const at::Tensor& gram, double alpha) {
  const char* op = "mtlgrad.fairgrad_weights";
  TORCH_CHECK_VALUE(alpha > 0 && std::isfinite(alpha), op, ": alpha must be positive, got ", alpha);
  Matrix A = gram_matrix(gram, op);
  const int64_t T = A.n;
  const double sigma = normalise_trace(A);
  // G = 0: every update is zero; no weights solve the system, and any will do.
  if (sigma == 0) return to_tensor(Vector(size_t(T), 1.0));
  for (int64_t i = 0; i < T; ++i) A(i, i) += kRidge;
  const Potential phi{A, alpha};

  // Start from the solution for the diagonal of A, scaled by the best factor along that ray
  // (κ^{1+1/α} = Σ v_i^{1−1/α} / vᵀ A v, where Φ's derivative in κ vanishes).
  Vector w(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) w[size_t(i)] = std::pow(A(i, i), -alpha / (1 + alpha));
  {
    const Vector Av = multiply(A, w);
    double numerator = 0;
    for (double v : w) numerator += v * phi.power(v);
    const double kappa = std::pow(numerator / dot(w, Av), alpha / (1 + alpha));
    for (double& v : w) v *= kappa;
  }

  // Residual r = A w − w^{-1/α} (Φ's gradient) and its size relative to the terms it is made of,
  // max_i |r_i| / ((|A| w)_i + w_i^{-1/α}): converged at the rounding level.
  const auto residual_of = [&](const Vector& x, Vector& r) {
    const Vector Ax = multiply(A, x);
    double relative = 0;
    for (int64_t i = 0; i < T; ++i) {
      const double target = phi.power(x[size_t(i)]);
      r[size_t(i)] = Ax[size_t(i)] - target;
      double magnitude = target;
      for (int64_t j = 0; j < T; ++j) magnitude += std::abs(A(i, j)) * x[size_t(j)];
      relative = std::max(relative, std::abs(r[size_t(i)]) / magnitude);
    }
    return relative;
  };
  const auto n = static_cast<size_t>(T);
  Vector residual(n), trial_residual(n), step(n), scaled_rhs(n), trial(n);
  double value = phi.value(w), relative = residual_of(w, residual);
  Matrix H(T);
  for (int iteration = 0; iteration < kMaxIterations && relative > 1e-13; ++iteration) {
    // Newton step Δ = −H⁻¹ r with H = A + diag(w^{-1/α−1} / α), solved in relative units
    // Δ = W y (W = diag(w)) so that weights of very different sizes are resolved alike.
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = 0; j < T; ++j) H(i, j) = w[size_t(i)] * A(i, j) * w[size_t(j)];
      H(i, i) += phi.power(w[size_t(i)]) * w[size_t(i)] / alpha;
      scaled_rhs[size_t(i)] = -w[size_t(i)] * residual[size_t(i)];
    }
    Vector y;
    if (!solve(H, scaled_rhs, y, 1e-300)) break;  // H is positive definite; only NaN stops here
    double largest_step = 1;                      // keep w positive: w_i (1 + τ y_i) > 0
    for (int64_t i = 0; i < T; ++i)
      if (y[size_t(i)] < 0) largest_step = std::min(largest_step, 0.99 / -y[size_t(i)]);
    double slope = 0;  // Φ'(w)ᵀ Δ < 0
    for (int64_t i = 0; i < T; ++i) {
      step[size_t(i)] = w[size_t(i)] * y[size_t(i)];
      slope += residual[size_t(i)] * step[size_t(i)];
    }
    // Backtracking: a sufficient decrease of Φ (Armijo) or, once Φ's changes fall below its
    // rounding, of the relative residual.
    double tau = largest_step, trial_value = value, trial_relative = relative;
    bool accepted = false;
    for (int halving = 0; halving < 60 && !accepted; ++halving, tau *= 0.5) {
      for (int64_t i = 0; i < T; ++i) trial[size_t(i)] = w[size_t(i)] + tau * step[size_t(i)];
      trial_value = phi.value(trial);
      trial_relative = residual_of(trial, trial_residual);
      accepted = trial_value <= value + 1e-4 * tau * slope || trial_relative <= (1 - 1e-4 * tau) * relative;
    }
    if (!accepted) break;  // no decrease left at this precision
    w.swap(trial);
    residual.swap(trial_residual);
    value = trial_value;
    relative = trial_relative;
  }
  // Back to the scale of G: if G = σ Ĝ and Ĝ ŵ = ŵ^{-1/α}, then w = σ^{-α/(1+α)} ŵ solves G w = w^{-1/α}.
  const double factor = std::pow(sigma, -alpha / (1 + alpha));
  for (double& v : w) v *= factor;
  return to_tensor(w);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) { m.def("fairgrad_weights(Tensor gram, float alpha) -> Tensor weights"); }

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("fairgrad_weights", &fairgrad_weights); }

}  // namespace mtlgrad::solvers
