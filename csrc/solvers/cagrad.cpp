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
// identity Hessian, written on the matrix C of cosines: the constraints are u_iᵀ d >= t / ||g_i||
// with unit normals u_i, so that gradients of very different norms are resolved alike, and the
// primal step z = u_p − Σ_{j∈A} r_j u_j has ||z||² and all its products from C. Between two changes
// of the active set A, the multipliers μ_A(t) = C_AA⁻¹ (t v_A − ĉ_A) are linear in t (v_i = 1 / ||g_i||,
// ĉ_i = u_iᵀ g0), so ||d(t) − g0||² is a quadratic in t: its root at φ is the answer once the
// multipliers and slacks there check out; otherwise we re-solve at that level.
//
// When 0 is in the convex hull of the gradients, no d gives all tasks a positive t, and if d(0) is
// within √φ of g0 the optimum is t* = 0 with many maximisers; d(0), the one closest to g0 (the
// paper's formula is 0/0 there: g_w = 0), is what we return.
//
// Every candidate is checked afresh before it is used (level reached, inside the ball, multipliers
// >= 0, no catastrophic cancellation in Σ λ_i g_i). With nearly dependent gradients, where the
// active-set algebra can lose its accuracy, a level search that cannot verify the exact answer
// returns the best verified lower level (feasible, suboptimal), or at worst d = g0.
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

// min ||d − g0||² / 2 s.t. u_iᵀ d >= t v_i, with d = g0 + Σ μ_i u_i, by Goldfarb–Idnani.
class LevelProjection {
 public:
  // Slacks below -slack_tolerance are violations; dependent constraints are tolerated down to
  // -loose_tolerance, the accuracy left to a nearly singular active set.
  LevelProjection(const Matrix& C, const Vector& c_hat, const Vector& v, double slack_tolerance,
                  double loose_tolerance)
      : C_(C),
        c_hat_(c_hat),
        v_(v),
        n_(C.n),
        slack_tolerance_(slack_tolerance),
        loose_tolerance_(loose_tolerance) {}

  enum class Status { kSolved, kInfeasible, kStalled };

  Status solve(double t) {
    active_.clear();
    set_aside_.clear();
    tolerated_.clear();
    K_.clear();
    mu_.assign(size_t(n_), 0.0);
    C_mu_.assign(size_t(n_), 0.0);
    const int max_steps = 20 * int(n_) + 100;  // GI is finite; this only guards against rounding loops
    for (int steps = 0; steps < max_steps;) {
      // The most violated constraint not in A.
      int64_t p = -1;
      double worst = -slack_tolerance_;
      for (int64_t i = 0; i < n_; ++i) {
        if (contains(active_, i) || contains(set_aside_, i)) continue;
        const double slack = c_hat_[size_t(i)] + C_mu_[size_t(i)] - t * v_[size_t(i)];
        if (slack < worst && (slack < -loose_tolerance_ || !contains(tolerated_, i))) worst = slack, p = i;
      }
      if (p < 0) {
        // Solved, unless the products accumulated over the steps have drifted: check them afresh.
        const Vector fresh = multiply(C_, mu_);
        bool drifted = false;
        for (int64_t i = 0; i < n_ && !drifted; ++i) {
          const double slack = c_hat_[size_t(i)] + fresh[size_t(i)] - t * v_[size_t(i)];
          drifted = !contains(active_, i) && !contains(set_aside_, i) &&
                    slack < (contains(tolerated_, i) ? -loose_tolerance_ : -slack_tolerance_);
        }
        C_mu_ = fresh;
        if (!drifted) return Status::kSolved;
        ++steps;
        continue;
      }
      // Step towards satisfying constraint p, dropping the constraints whose multipliers reach 0.
      for (;; ++steps) {
        if (steps >= max_steps) return Status::kStalled;
        const size_t m = active_.size();
        Vector r(m, 0.0);  // r = C_AA⁻¹ C_Ap: u_p's coefficients on span(u_A)
        for (size_t a = 0; a < m; ++a)
          for (size_t b = 0; b < m; ++b) r[a] += K_[a * m + b] * C_(active_[b], p);
        double delta = 1;  // ||z||², z = u_p − Σ r_j u_j
        for (size_t a = 0; a < m; ++a) delta -= C_(p, active_[a]) * r[a];
        const double slack = c_hat_[size_t(p)] + C_mu_[size_t(p)] - t * v_[size_t(p)];
        // u_p is (numerically) in span(u_A) when ||z||² is within its rounding error, which grows with
        // the condition of C_AA (bounded through trace(K) and m = ||C_AA||'s bound) and with the
        // cancellation in 1 − C_pA r; and in any case below 1e-11 (z below ~3e-6 of a unit vector).
        double trace = 0, spread = 1;
        for (size_t a = 0; a < m; ++a) trace += K_[a * m + a], spread += std::abs(r[a]);
        const double noise = 1e-14 * double(m) * trace * spread;
        const double full_step = delta > std::max(1e-11, noise) ? -slack / delta : kInf;
        double partial_step = kInf;
        size_t drop = m;
        for (size_t a = 0; a < m; ++a) {
          if (r[a] > 0) {
            const double limit = mu_[size_t(active_[a])] / r[a];
            if (limit < partial_step) partial_step = limit, drop = a;
          }
        }
        if (full_step == kInf && partial_step == kInf) {
          // u_p is (numerically) a combination of the active normals with coefficients <= 0, so no
          // step along the active set raises u_pᵀ d. For t <= 0 the constraint holds in exact
          // arithmetic (u_pᵀ d = t Σ r_j v_j on the active set, and the v_j are positive): the
          // violation is rounding, and p is set aside until the active set changes, then tolerated
          // up to the loose tolerance. For t > 0, unless the violation is that small, no d reaches t.
          if (t > 0 && slack < -loose_tolerance_) return Status::kInfeasible;
          set_aside_.push_back(p);
          if (!contains(tolerated_, p)) tolerated_.push_back(p);
          break;
        }
        const double step = std::min(full_step, partial_step);
        for (size_t a = 0; a < m; ++a) mu_[size_t(active_[a])] -= step * r[a];
        mu_[size_t(p)] += step;
        for (int64_t i = 0; i < n_; ++i) {
          double zi = C_(i, p);  // u_iᵀ z
          for (size_t a = 0; a < m; ++a) zi -= C_(i, active_[a]) * r[a];
          C_mu_[size_t(i)] += step * zi;
        }
        if (full_step <= partial_step) {
          add(p, r, delta);
          ++steps;
          break;
        }
        mu_[size_t(active_[drop])] = 0;
        remove(drop);
      }
    }
    return Status::kStalled;
  }

  // On the current active set, the level τ > t where ||d(τ) − g0|| = radius (the larger root of
  // (τ v_A − ĉ_A)ᵀ K (τ v_A − ĉ_A) = radius²), or NaN without an active constraint.
  double level_at(double radius) const {
    const size_t m = active_.size();
    if (m == 0) return std::numeric_limits<double>::quiet_NaN();
    double a = 0, b = 0, e = 0;
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < m; ++j) {
        const double k = K_[i * m + j];
        const double vi = v_[size_t(active_[i])], vj = v_[size_t(active_[j])];
        const double ci = c_hat_[size_t(active_[i])], cj = c_hat_[size_t(active_[j])];
        a += vi * k * vj, b += vi * k * cj, e += ci * k * cj;
      }
    }
    const double discriminant = std::max(b * b - a * (e - radius * radius), 0.0);
    return (b + std::sqrt(discriminant)) / a;
  }

  // Moves along the current active set to level τ; returns whether that is the QP's solution there
  // (multipliers >= 0, every constraint satisfied).
  bool move_to(double tau) {
    const size_t m = active_.size();
    mu_.assign(size_t(n_), 0.0);
    double largest = 0;
    for (size_t i = 0; i < m; ++i) {
      double value = 0;
      for (size_t j = 0; j < m; ++j)
        value += K_[i * m + j] * (tau * v_[size_t(active_[j])] - c_hat_[size_t(active_[j])]);
      mu_[size_t(active_[i])] = value;
      largest = std::max(largest, std::abs(value));
    }
    C_mu_ = multiply(C_, mu_);
    for (size_t i = 0; i < m; ++i)
      if (mu_[size_t(active_[i])] < -1e-12 * largest) return false;
    for (int64_t i = 0; i < n_; ++i)
      if (!contains(active_, i) &&
          c_hat_[size_t(i)] + C_mu_[size_t(i)] - tau * v_[size_t(i)] < -slack_tolerance_)
        return false;
    return true;
  }

  const Vector& multipliers() const { return mu_; }

 private:
  static bool contains(const std::vector<int64_t>& set, int64_t i) {
    return std::find(set.begin(), set.end(), i) != set.end();
  }

  // K ← C_{A∪p, A∪p}⁻¹ by bordering: the Schur complement of the new row is delta.
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

  // K ← C_{A∖q, A∖q}⁻¹ from the inverse of the larger matrix.
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

  const Matrix& C_;
  const Vector& c_hat_;
  const Vector& v_;
  const int64_t n_;
  const double slack_tolerance_;
  const double loose_tolerance_;
  std::vector<int64_t> active_;
  std::vector<int64_t> set_aside_;  // dependent constraints skipped until the active set changes
  std::vector<int64_t> tolerated_;  // dependent constraints, violated by rounding only
  std::vector<double> K_;           // C_AA⁻¹, row-major |A| x |A|
  Vector mu_;                       // multipliers of the unit normals
  Vector C_mu_;
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
  double largest_entry = 0;
  for (double v : G.data) largest_entry = std::max(largest_entry, std::abs(v));
  const double squared_norm_g0 = dot(weights, products);
  const auto finish = [&](const Vector& lambda) {
    for (int64_t i = 0; i < T; ++i) weights[size_t(i)] = factor * (weights[size_t(i)] + lambda[size_t(i)]);
    return to_tensor(weights);
  };
  // g0 = 0 (below the rounding of its T² products) or c = 0: the ball is a point, d = g0.
  if (!(squared_norm_g0 > 16 * std::numeric_limits<double>::epsilon() * largest_entry) || c == 0)
    return finish(Vector(size_t(T), 0.0));
  const double radius = c * std::sqrt(squared_norm_g0);

  // The constraints of the non-zero gradients, on unit normals. A zero gradient's constraint,
  // 0 >= t, holds exactly for t <= 0 and never above: it only caps the level at 0.
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < T; ++i)
    if (G(i, i) > 0) rows.push_back(i);
  const auto n = int64_t(rows.size());
  Vector norms(static_cast<size_t>(n)), v(static_cast<size_t>(n)), c_hat(static_cast<size_t>(n));
  for (int64_t a = 0; a < n; ++a) {
    norms[size_t(a)] = std::sqrt(G(rows[size_t(a)], rows[size_t(a)]));
    v[size_t(a)] = 1 / norms[size_t(a)];
    c_hat[size_t(a)] = products[size_t(rows[size_t(a)])] * v[size_t(a)];
  }
  Matrix C(n);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b)
      C(a, b) = G(rows[size_t(a)], rows[size_t(b)]) * v[size_t(a)] * v[size_t(b)];
  // Slacks u_iᵀ d − t v_i are of the order of ||d|| <= ||g0|| + √φ; below 1e-13 of that they are 0,
  // and for dependent constraints below 1e-10 (the final check below allows 1e-9).
  const double product_scale = std::sqrt(squared_norm_g0) + radius;
  LevelProjection projection(C, c_hat, v, 1e-13 * product_scale, 1e-10 * product_scale);

  // Multipliers of the gradients from those of the unit normals, if they describe an update that
  // reaches level t (up to 1e-9 of the scale of the products), lies inside the ball (up to rounding)
  // and has multipliers >= 0 without a cancellation between the weighted gradients that would leave
  // d − g0 = Σ λ_i g_i to rounding (Σ |λ_i| |G_ij| |λ_j| beyond 1e12 times its scale): a last check
  // against rounding trouble with nearly dependent gradients.
  Vector lambda(size_t(T), 0.0);
  const double scale = radius * radius + squared_norm_g0;
  const auto accept = [&](const Vector& mu, double t, double tolerance) {
    Vector candidate(size_t(T), 0.0);
    double cancelled = 0;  // Σ |λ_i| |G_ij| |λ_j| <= (Σ |λ_i| ||g_i||)²
    for (int64_t a = 0; a < n; ++a) {
      if (!(mu[size_t(a)] >= 0) || !std::isfinite(mu[size_t(a)])) return false;
      candidate[size_t(rows[size_t(a)])] = mu[size_t(a)] * v[size_t(a)];
      cancelled += mu[size_t(a)];  // |λ_i| ||g_i||
    }
    if (!(cancelled * cancelled <= 1e12 * scale)) return false;
    const Vector C_mu = multiply(C, mu);
    for (int64_t a = 0; a < n; ++a)
      if (c_hat[size_t(a)] + C_mu[size_t(a)] - t * v[size_t(a)] < -1e-9 * std::sqrt(scale)) return false;
    if (!(dot(candidate, multiply(G, candidate)) <= radius * radius * (1 + tolerance))) return false;
    lambda.swap(candidate);
    return true;
  };

  // Bracket the level: d(t_low) is within the radius of g0 (at the smallest g_iᵀ g0, d = g0 itself),
  // d(t_high) beyond it or infeasible. Each iteration proposes the level where the current active
  // set's distance reaches the radius; a proposal outside the bracket is replaced by bisection (or,
  // with no upper end yet, by a growing step).
  double t_low = *std::min_element(products.begin(), products.end());
  double t_high = n < T ? 0.0 : kInf;                // a zero gradient caps the level at 0
  double expansion = radius * std::sqrt(double(T));  // ||g_i|| <= √T on the trace-normalised G
  Vector best(size_t(n), 0.0);                       // multipliers at t_low (none: d = g0)
  double t = kInf;
  if (n > 0) {  // exact if only the task with the smallest g_iᵀ g0 becomes active
    int64_t first = 0;
    for (int64_t a = 1; a < n; ++a)
      if (c_hat[size_t(a)] * norms[size_t(a)] < c_hat[size_t(first)] * norms[size_t(first)]) first = a;
    t = (c_hat[size_t(first)] + radius) * norms[size_t(first)];
  }
  bool found = false, zero_tried = false;
  for (int iteration = 0; iteration < 100 && !found && n > 0; ++iteration) {
    if (t_high <= 0 && !zero_tried) {
      // The level cannot exceed 0 (0 is in the convex hull of the gradients). If d(0) is within
      // the radius (up to rounding), t* = 0 and d(0) is the answer.
      zero_tried = true;
      if (t_low >= 0) {
        found = accept(best, t_low, 1e-9);  // t_low = 0 = t*
        continue;
      }
      if (projection.solve(0) == LevelProjection::Status::kSolved &&
          accept(projection.multipliers(), 0, 1e-12)) {
        found = true;
        continue;
      }
      t_high = 0;
    }
    if (!(t > t_low && t < t_high)) {
      t = std::isfinite(t_high) ? 0.5 * (t_low + t_high) : t_low + expansion;
      expansion *= 2;
    }
    const auto status = projection.solve(t);
    if (status == LevelProjection::Status::kInfeasible) {
      t_high = std::min(t_high, 0.0);  // no d gives every task t > 0: 0 is in the convex hull
      continue;
    }
    if (status == LevelProjection::Status::kStalled) {  // rounding trouble: shrink the bracket
      t_high = t;
      continue;
    }
    if (accept(projection.multipliers(), t, 1e-12)) {
      t_low = t;
      best = projection.multipliers();
      found = std::abs(dot(lambda, multiply(G, lambda)) - radius * radius) <= 1e-12 * radius * radius;
    } else {
      t_high = t;
    }
    const double level = projection.level_at(radius);
    if (!found && level > t_low && level < t_high && projection.move_to(level))
      found = accept(projection.multipliers(), level, 1e-9);
    t = level;
  }
  if (!found && !(n > 0 && accept(best, t_low, 1e-9))) lambda.assign(size_t(T), 0.0);  // d = g0 at worst
  return finish(lambda);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  m.def("cagrad_weights(Tensor gram, float c, int rescale) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("cagrad_weights", &cagrad_weights); }

}  // namespace mtlgrad::solvers
