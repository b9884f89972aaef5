// CAGrad (Liu et al., 2021, "Conflict-Averse Gradient Descent for Multi-task Learning",
// Algorithm 1) on the Gram matrix.
//
// CAGrad's update solves  max_d min_i g_iᵀ d  s.t.  ||d − g0|| <= √φ,  g0 the mean gradient,
// √φ = c ||g0||; its dual (the paper's inner problem) is  min_{w ∈ Δ} g_wᵀ g0 + √φ ||g_w||, and
// d = g0 + (√φ / ||g_w||) g_w. Rather than iterating on the dual, we solve the primal exactly:
// for a level t, the update closest to g0 that gives every task at least t,
//   d(t) = argmin ||d − g0||  s.t.  g_iᵀ d >= t for all i,
// is a small strictly convex QP whose solution is d(t) = g0 + Σ_i λ_i g_i with multipliers λ >= 0.
// Its distance ||d(t) − g0|| grows with t, and CAGrad's update is d(t*) at the level where it
// reaches √φ; then λ = √φ w / ||g_w|| for the dual's w, and the weights are 1/T + λ_i.
//
// Each QP is solved exactly by the dual active-set method of Goldfarb & Idnani (1983) with the
// identity Hessian, written on G (the primal step z = g_p − Σ_{j∈A} r_j g_j has ||z||² and all its
// products from G). Between two changes of the active set A, λ_A(t) = G_AA⁻¹ (t 1 − c_A) is linear in
// t (c = G 1/T holds the products g_iᵀ g0), so ||d(t) − g0||² is a quadratic in t: its root at φ is
// the answer once the multipliers and slacks there check out; otherwise we re-solve at that level.
//
// When 0 is in the convex hull of the gradients, no d gives all tasks a positive t, and if
// d(0) is within √φ of g0 the optimum is t* = 0 with many maximisers; d(0), the one closest to g0
// (the paper's formula is 0/0 there: g_w = 0), is what we return.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// min ||d − g0||² / 2 s.t. g_iᵀ d >= t, with d = g0 + Σ λ_i g_i, by Goldfarb–Idnani.
class LevelProjection {
 public:
  LevelProjection(const Matrix& G, const Vector& c, double slack_tolerance)
      : G_(G), c_(c), T_(G.n), slack_tolerance_(slack_tolerance) {}

  enum class Status { kSolved, kInfeasible, kStalled };

  Status solve(double t) {
    active_.clear();
    set_aside_.clear();
    K_.clear();
    lambda_.assign(size_t(T_), 0.0);
    G_lambda_.assign(size_t(T_), 0.0);
    const int max_steps = 20 * int(T_) + 100;  // GI is finite; this only guards against rounding loops
    for (int steps = 0; steps < max_steps;) {
      // The most violated constraint not in A.
      int64_t p = -1;
      double worst = -slack_tolerance_;
      for (int64_t i = 0; i < T_; ++i) {
        if (in_active(i) || std::find(set_aside_.begin(), set_aside_.end(), i) != set_aside_.end()) continue;
        const double slack = c_[size_t(i)] + G_lambda_[size_t(i)] - t;
        if (slack < worst) worst = slack, p = i;
      }
      if (p < 0) return Status::kSolved;
      // Step towards satisfying constraint p, dropping the constraints whose multipliers reach 0.
      for (;; ++steps) {
        if (steps >= max_steps) return Status::kStalled;
        const size_t m = active_.size();
        Vector r(m, 0.0);  // r = G_AA⁻¹ G_Ap: g_p's coefficients on span(g_A)
        for (size_t a = 0; a < m; ++a)
          for (size_t b = 0; b < m; ++b) r[a] += K_[a * m + b] * G_(active_[b], p);
        double delta = G_(p, p);  // ||z||², z = g_p − Σ r_j g_j
        for (size_t a = 0; a < m; ++a) delta -= G_(p, active_[a]) * r[a];
        const double slack = c_[size_t(p)] + G_lambda_[size_t(p)] - t;
        const bool independent = delta > 1e-11 * G_(p, p);
        const double full_step = independent ? -slack / delta : kInf;
        double partial_step = kInf;
        size_t drop = m;
        for (size_t a = 0; a < m; ++a) {
          if (r[a] > 0) {
            const double limit = lambda_[size_t(active_[a])] / r[a];
            if (limit < partial_step) partial_step = limit, drop = a;
          }
        }
        if (full_step == kInf && partial_step == kInf) {
          // g_p is a combination of the active gradients with coefficients <= 0, so on the
          // active set g_pᵀ d = t Σ r_j: for t > 0 below t, so no d is feasible; for t <= 0 at
          // least t, and the violation is rounding: set p aside until the active set changes.
          if (t > 0) return Status::kInfeasible;
          set_aside_.push_back(p);
          break;
        }
        const double step = std::min(full_step, partial_step);
        for (size_t a = 0; a < m; ++a) lambda_[size_t(active_[a])] -= step * r[a];
        lambda_[size_t(p)] += step;
        for (int64_t i = 0; i < T_; ++i) {
          double zi = G_(i, p);  // g_iᵀ z
          for (size_t a = 0; a < m; ++a) zi -= G_(i, active_[a]) * r[a];
          G_lambda_[size_t(i)] += step * zi;
        }
        if (full_step <= partial_step) {
          add(p, r, delta);
          ++steps;
          break;
        }
        lambda_[size_t(active_[drop])] = 0;
        remove(drop);
      }
    }
    return Status::kStalled;
  }

  // ||d(t) − g0||² = λᵀ G λ.
  double squared_distance() const { return dot(lambda_, G_lambda_); }

  // On the current active set, the level τ > t where ||d(τ) − g0|| = radius (the larger root of
  // (τ 1 − c_A)ᵀ K (τ 1 − c_A) = radius²), or NaN without an active constraint.
  double level_at(double radius) const {
    const size_t m = active_.size();
    if (m == 0) return std::numeric_limits<double>::quiet_NaN();
    double a = 0, b = 0, e = 0;
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < m; ++j) {
        const double k = K_[i * m + j];
        const double ci = c_[size_t(active_[i])], cj = c_[size_t(active_[j])];
        a += k, b += k * cj, e += ci * k * cj;
      }
    }
    const double discriminant = std::max(b * b - a * (e - radius * radius), 0.0);
    return (b + std::sqrt(discriminant)) / a;
  }

  // Moves along the current active set to level τ; returns whether that is the QP's solution
  // there (multipliers >= 0, every constraint satisfied).
  bool move_to(double tau) {
    const size_t m = active_.size();
    lambda_.assign(size_t(T_), 0.0);
    double largest = 0;
    for (size_t i = 0; i < m; ++i) {
      double v = 0;
      for (size_t j = 0; j < m; ++j) v += K_[i * m + j] * (tau - c_[size_t(active_[j])]);
      lambda_[size_t(active_[i])] = v;
      largest = std::max(largest, std::abs(v));
    }
    G_lambda_ = multiply(G_, lambda_);
    bool valid = true;
    for (size_t i = 0; i < m; ++i)
      if (lambda_[size_t(active_[i])] < -1e-12 * largest) valid = false;
    for (int64_t i = 0; i < T_; ++i)
      if (!in_active(i) && c_[size_t(i)] + G_lambda_[size_t(i)] - tau < -slack_tolerance_) valid = false;
    return valid;
  }

  const Vector& multipliers() const { return lambda_; }

 private:
  bool in_active(int64_t i) const { return std::find(active_.begin(), active_.end(), i) != active_.end(); }

  // K ← G_{A∪p, A∪p}⁻¹ by bordering: the Schur complement of the new row is delta.
  void add(int64_t p, const Vector& r, double delta) {
    const size_t m = active_.size(), n = m + 1;
    std::vector<double> K(n * n);
    for (size_t a = 0; a < m; ++a) {
      for (size_t b = 0; b < m; ++b) K[a * n + b] = K_[a * m + b] + r[a] * r[b] / delta;
      K[a * n + m] = K[m * n + a] = -r[a] / delta;
    }
    K[m * n + m] = 1 / delta;
    K_.swap(K);
    active_.push_back(p);
    set_aside_.clear();
  }

  // K ← G_{A∖q, A∖q}⁻¹ from the inverse of the larger matrix.
  void remove(size_t q) {
    const size_t m = active_.size(), n = m - 1;
    std::vector<double> K(n * n);
    const double kqq = K_[q * m + q];
    for (size_t a = 0, i = 0; a < m; ++a) {
      if (a == q) continue;
      for (size_t b = 0, j = 0; b < m; ++b) {
        if (b == q) continue;
        K[i * n + j] = K_[a * m + b] - K_[a * m + q] * K_[q * m + b] / kqq;
        ++j;
      }
      ++i;
    }
    K_.swap(K);
    active_.erase(active_.begin() + std::ptrdiff_t(q));
    set_aside_.clear();
  }

  const Matrix& G_;
  const Vector& c_;
  const int64_t T_;
  const double slack_tolerance_;
  std::vector<int64_t> active_;
  std::vector<int64_t> set_aside_;  // dependent constraints violated by rounding only (t <= 0)
  std::vector<double> K_;           // G_AA⁻¹, row-major |A| x |A|
  Vector lambda_;
  Vector G_lambda_;
};

at::Tensor cagrad_weights(const at::Tensor& gram, double c, int64_t rescale) {
  const char* op = "mtlgrad.cagrad_weights";
  TORCH_CHECK_VALUE(c >= 0 && std::isfinite(c), op, ": c must be non-negative, got ", c);
  TORCH_CHECK_VALUE(rescale >= 0 && rescale <= 2, op, ": rescale must be 0, 1 or 2, got ", rescale);
  Matrix G = gram_matrix(gram, op);
  normalise_trace(G);  // the problem is homogeneous in the gradients: the multipliers are scale-free
  const int64_t T = G.n;
  // The official code's rescaling of the update: none, 1 / (1 + c²) or 1 / (1 + c).
  const double factor = rescale == 0 ? 1.0 : rescale == 1 ? 1 / (1 + c * c) : 1 / (1 + c);
  Vector weights(size_t(T), 1.0 / double(T));
  const Vector products = multiply(G, weights);  // g_iᵀ g0
  double largest_entry = 0, largest_diagonal = 0;
  for (int64_t i = 0; i < T; ++i) {
    largest_diagonal = std::max(largest_diagonal, G(i, i));
    for (int64_t j = 0; j < T; ++j) largest_entry = std::max(largest_entry, std::abs(G(i, j)));
  }
  const double squared_norm_g0 = dot(weights, products);
  // g0 = 0 (below the rounding of its T² products) or c = 0: the ball is a point, d = g0.
  if (!(squared_norm_g0 > 16 * std::numeric_limits<double>::epsilon() * largest_entry) || c == 0) {
    for (double& v : weights) v *= factor;
    return to_tensor(weights);
  }
  const double radius = c * std::sqrt(squared_norm_g0);
  // Slacks g_iᵀ d − t are of the order of ||g_i|| (||g0|| + √φ); below 1e-13 of that they are 0.
  const double slack_tolerance = 1e-13 * std::sqrt(largest_diagonal) * (std::sqrt(squared_norm_g0) + radius);
  LevelProjection projection(G, products, slack_tolerance);

  // Bracket the level: d(t_low) is within the radius of g0 (at the smallest g_iᵀ g0, d = g0 itself),
  // d(t_high) beyond it or infeasible. Each iteration proposes the level where the current active
  // set's distance reaches the radius; a proposal outside the bracket is replaced by bisection (or,
  // with no upper end yet, by a growing step).
  const int64_t first = std::min_element(products.begin(), products.end()) - products.begin();
  double t_low = products[size_t(first)];
  double t_high = kInf;
  double expansion = radius * std::sqrt(largest_diagonal);
  Vector best(size_t(T), 0.0);  // multipliers at t_low (none: d = g0)
  Vector lambda;
  bool found = false;
  double t = t_low + radius * std::sqrt(G(first, first));  // exact if only `first` becomes active
  for (int iteration = 0; iteration < 100 && !found; ++iteration) {
    if (!(t > t_low && t < t_high)) {
      t = std::isfinite(t_high) ? 0.5 * (t_low + t_high) : t_low + expansion;
      expansion *= 2;
    }
    const auto status = projection.solve(t);
    if (status == LevelProjection::Status::kInfeasible) {
      // No d gives every task more than 0 (t > 0 here): 0 is in the convex hull of the gradients,
      // and t* <= 0. If d(0) is within the radius, t* = 0 and d(0) is the answer.
      t_high = std::min(t_high, 0.0);
      if (t_low >= 0) {  // t_low = 0: already the answer
        lambda = best;
        found = true;
      } else if (projection.solve(0) == LevelProjection::Status::kSolved &&
                 projection.squared_distance() <= radius * radius) {
        lambda = projection.multipliers();
        found = true;
      }
      t = 0.5 * (t_low + t_high);
      continue;
    }
    if (status == LevelProjection::Status::kStalled) {  // rounding trouble: shrink the bracket
      t_high = t;
      continue;
    }
    if (projection.squared_distance() <= radius * radius) {
      t_low = t;
      best = projection.multipliers();
    } else {
      t_high = t;
    }
    const double level = projection.level_at(radius);
    if (std::isfinite(level) && projection.move_to(level)) {
      lambda = projection.multipliers();
      found = true;
    }
    t = level;
  }
  if (!found) lambda = best;  // the best feasible level found; within the radius of g0
  for (int64_t i = 0; i < T; ++i) weights[size_t(i)] = factor * (weights[size_t(i)] + lambda[size_t(i)]);
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("cagrad_weights", &cagrad_weights); }

}  // namespace mtlgrad::solvers
