// FairGrad (Ban & Ji, 2024, "Fair Resource Allocation in Multi-Task Learning", Algorithm 1): the
// update d = Σ_i w_i g_i whose weights solve G w = w^{-1/α} (elementwise), w > 0.
//
// That system is the stationarity condition of the strictly convex function
//   Φ(w) = ½ wᵀ G w − Σ_i h(w_i),   h'(w) = w^{-1/α}   (h = log for α = 1, w^{1−1/α} / (1 − 1/α) else)
// on w > 0, so we minimise Φ by Newton's method with a step that keeps w positive and decreases Φ.
//
// Degenerate gradients. The system has no positive solution when some non-negative combination
// Σ_{i∈S} c_i g_i of the gradients vanishes (a zero gradient, two opposite ones, gradients that
// positively span a subspace): Σ_{i∈S} c_i g_iᵀ d = 0 for every d, so no update decreases all the
// losses of S. A ridge ρ on G (tiny private components for every gradient) keeps the weights
// finite but gives no usable answer: its update has g_iᵀ d = w_i^{-1/α} − ρ w_i with w ≈ t c along
// the vanishing combination, ρ t² |c|² ≈ Σ_S (t c_i)^{1−1/α}, so the tasks with the larger c_i
// conflict with it at a cosine of order 1 whatever ρ (an update of size ~ρ^{1/(1+α)}); and a ridge
// below the rounding of G (relative errors ~1e-7 of its diagonal when the gradients are float32,
// G being accumulated in float32 within chunks) does not even keep Φ convex: the weights grow
// until the line search stalls, and the update, a near-total cancellation, is rounding that
// conflicts with many tasks (half of 20, at cosines down to −0.25, in tests/test_fairgrad.py).
// What the ridge tends to as ρ -> 0 is well defined, and is what we compute: the tasks of S get
// no decrease (d is orthogonal to their gradients), and the others share the update fairly within
// the orthogonal complement of span(g_S): FairGrad on their gradients projected there. S is found
// to the rounding level of G (below).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "dense.h"
#include "nonneg_qp.h"

namespace mtlgrad::solvers {
namespace {

// The rounding level of G, relative to the products it is made of: T ε₃₂ (as Aligned-MTL's rank cut
// and IMTL-G's), the relative error of a Gram matrix of float32 gradients. A non-negative
// combination w (Σ w = 1) vanishes to rounding when |Σ w_i g_i|² <= τ (Σ w_i ||g_i||)², and a
// gradient lies in a span to rounding when the part of it outside has |.|² <= τ ||g||².
constexpr double kFloat32Epsilon = 1.1920928955078125e-07;
constexpr int kMaxIterations = 200;

struct Potential {
  const Matrix& A;  // G / σ
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

// The positive root of A w = w^{-1/α} for the Gram matrix A of gradients none of whose non-negative
// combinations vanishes (so that Φ is bounded below and its minimiser is the root).
Vector positive_root(Matrix A, double alpha) {
  const int64_t T = A.n;
  const double sigma = normalise_trace(A);
  if (sigma == 0) return Vector(size_t(T), 0.0);  // not reached: zero gradients are in S
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
  return w;
}

// Rows and columns R of the Gram matrix of the gradients projected onto the orthogonal complement
// of span(g_S): G_RR − G_RS P G_SR, with P = D⁻¹ C_SS⁺ D⁻¹ (C_SS the cosines of S, D their norms:
// the pseudo-inverse is taken on the scale-free cosines, cut at |S| ε₃₂). `P_out` receives P.
Matrix project_off(const Matrix& G, const std::vector<int64_t>& S, const std::vector<int64_t>& R,
                   Matrix* P_out = nullptr) {
  const int64_t s = int64_t(S.size()), r = int64_t(R.size());
  Matrix out(r);
  for (int64_t a = 0; a < r; ++a)
    for (int64_t b = 0; b < r; ++b) out(a, b) = G(R[size_t(a)], R[size_t(b)]);
  if (s == 0) return out;
  Vector norm(static_cast<size_t>(s));
  for (int64_t i = 0; i < s; ++i) norm[size_t(i)] = std::sqrt(G(S[size_t(i)], S[size_t(i)]));
  Matrix C(s);
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < s; ++j)
      C(i, j) = G(S[size_t(i)], S[size_t(j)]) / (norm[size_t(i)] * norm[size_t(j)]);
  Matrix P = symmetric_pseudo_inverse(C, double(s) * kFloat32Epsilon);
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < s; ++j) P(i, j) /= norm[size_t(i)] * norm[size_t(j)];
  // out −= G_RS P G_SR, through PG = P G_SR (s x r).
  Matrix PG(std::max(s, r));
  for (int64_t i = 0; i < s; ++i)
    for (int64_t b = 0; b < r; ++b) {
      double v = 0;
      for (int64_t j = 0; j < s; ++j) v += P(i, j) * G(S[size_t(j)], R[size_t(b)]);
      PG(i, b) = v;
    }
  for (int64_t a = 0; a < r; ++a)
    for (int64_t b = 0; b < r; ++b) {
      double v = 0;
      for (int64_t i = 0; i < s; ++i) v += G(R[size_t(a)], S[size_t(i)]) * PG(i, b);
      out(a, b) -= v;
    }
  if (P_out != nullptr) *P_out = std::move(P);
  return out;
}

at::Tensor fairgrad_weights(const at::Tensor& gram, double alpha) {
  const char* op = "mtlgrad.fairgrad_weights";
  TORCH_CHECK_VALUE(alpha > 0 && std::isfinite(alpha), op, ": alpha must be positive, got ", alpha);
  const Matrix G = gram_matrix(gram, op);
  const int64_t T = G.n;
  const double tau = double(T) * kFloat32Epsilon;

  // S: the tasks in a non-negative combination of the gradients that vanishes to rounding, found
  // as min-norm points of the convex hull (MGDA's problem) of the gradients projected off the S
  // found so far, until that hull stays away from 0. A gradient in span(g_S) joins S at once
  // (-g_i is then in the cone of g_S, which is a subspace); so does a zero gradient.
  std::vector<char> in_S(static_cast<size_t>(T), 0);
  std::vector<int64_t> S, R;  // S without its zero gradients; the other tasks
  for (bool grew = true; grew;) {
    grew = false;
    R.clear();
    for (int64_t i = 0; i < T; ++i)
      if (!in_S[size_t(i)]) R.push_back(i);
    if (R.empty()) break;
    const Matrix H = project_off(G, S, R);
    for (size_t a = 0; a < R.size(); ++a) {
      const int64_t i = R[a];
      if (!(H(int64_t(a), int64_t(a)) > tau * G(i, i))) {
        in_S[size_t(i)] = 1;
        if (G(i, i) > 0) S.push_back(i);
        grew = true;
      }
    }
    if (grew) continue;
    const Vector w = min_norm_weights(H);
    double scale = 0;
    std::vector<double> contribution(R.size());
    for (size_t a = 0; a < R.size(); ++a) {
      contribution[a] = w[a] * std::sqrt(G(R[a], R[a]));
      scale += contribution[a];
    }
    if (!(dot(w, multiply(H, w)) <= tau * scale * scale)) break;  // no vanishing combination left
    const size_t largest =
        size_t(std::max_element(contribution.begin(), contribution.end()) - contribution.begin());
    for (size_t a = 0; a < R.size(); ++a) {
      if (a == largest || contribution[a] > std::sqrt(tau) * scale) {
        in_S[size_t(R[a])] = 1;
        S.push_back(R[a]);
        grew = true;
      }
    }
  }
  Vector weights(size_t(T), 0.0);
  if (R.empty()) return to_tensor(weights);  // no update decreases every loss: d = 0
  Matrix P;
  const Vector w = positive_root(project_off(G, S, R, &P), alpha);
  for (size_t a = 0; a < R.size(); ++a) weights[size_t(R[a])] = w[a];
  // w_S = −P G_SR w_R removes the update's component in span(g_S).
  for (size_t i = 0; i < S.size(); ++i) {
    double v = 0;
    for (size_t j = 0; j < S.size(); ++j) {
      double g = 0;
      for (size_t a = 0; a < R.size(); ++a) g += G(S[j], R[a]) * w[a];
      v += P(int64_t(i), int64_t(j)) * g;
    }
    weights[size_t(S[i])] = -v;
  }
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) { m.def("fairgrad_weights(Tensor gram, float alpha) -> Tensor weights"); }

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("fairgrad_weights", &fairgrad_weights); }

}  // namespace mtlgrad::solvers
