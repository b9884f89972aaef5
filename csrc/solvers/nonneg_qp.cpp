#include "nonneg_qp.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mtlgrad::solvers {
namespace {

// A bound variable enters only if its (scaled) dual value exceeds this fraction of the terms it is
// made of (|c| plus |Q x|, in the scaled problem): far above the rounding of a dot product
// of a few hundred terms, far below anything that changes the answer.
constexpr double kDualTolerance = 1e-12;
// An entering column whose Cholesky pivot² is below this fraction of its diagonal entry is
// dependent on the free columns to rounding (e.g. a duplicated gradient): it would make the free
// block singular, and its direction is already spanned (its KKT violation is at most
// sqrt(kPivotTolerance) relative), so it is skipped.
constexpr double kPivotTolerance = 1e-12;

}  // namespace

NonnegQP::NonnegQP(const Matrix& Q)
    : Q_(Q.n),
      n_(Q.n),
      scale_(size_t(Q.n)),
      c_(size_t(Q.n)),
      result_(size_t(Q.n)),
      x_(size_t(Q.n)),
      dual_(size_t(Q.n)),
      z_(size_t(Q.n)),
      column_(size_t(Q.n)),
      inv_diag_(size_t(Q.n)),
      is_free_(size_t(Q.n)),
      skipped_(size_t(Q.n)),
      L_(size_t(Q.n * Q.n)) {
  free_.reserve(size_t(n_));
  order_.reserve(size_t(n_));
  // D_ii: the power of two nearest 1 / sqrt(Q_ii), so that D Q D has its diagonal in [1/2, 2)
  // and the scaling itself rounds nothing (equal columns stay exactly equal, ties stay ties).
  for (int64_t i = 0; i < n_; ++i) {
    const double qii = Q(i, i);
    int exponent = 0;
    if (qii > 0 && std::isfinite(qii)) std::frexp(qii, &exponent);          // qii = m 2^exponent, m >= 1/2
    const int half = exponent >= 0 ? exponent / 2 : -((1 - exponent) / 2);  // floor(exponent / 2)
    scale_[size_t(i)] = qii > 0 && std::isfinite(qii) ? std::ldexp(1.0, -half) : 0.0;
  }
  for (int64_t i = 0; i < n_; ++i)
    for (int64_t j = 0; j < n_; ++j) Q_(i, j) = scale_[size_t(i)] * Q(i, j) * scale_[size_t(j)];
  for (int64_t i = 0; i < n_; ++i) q_max_ = std::max(q_max_, Q_(i, i));
}

bool NonnegQP::append(int64_t j) {
  const int64_t k = int64_t(free_.size());
  const double qjj = Q_(j, j);
  if (!(qjj > 0)) return false;
  // Row k of the factor: L[0:k, 0:k] l = Q[free, j], pivot² = Q_jj - |l|².
  double pivot2 = qjj;
  for (int64_t r = 0; r < k; ++r) {
    const double* Lr = &L_[size_t(r * n_)];
    const double l = (Q_(free_[size_t(r)], j) - dot(Lr, column_.data(), r)) * inv_diag_[size_t(r)];
    column_[size_t(r)] = l;
    pivot2 -= l * l;
  }
  if (!(pivot2 > kPivotTolerance * qjj)) return false;
  double* Lk = &L_[size_t(k * n_)];
  std::copy(column_.begin(), column_.begin() + k, Lk);
  Lk[k] = std::sqrt(pivot2);
  inv_diag_[size_t(k)] = 1 / Lk[k];
  return true;
}

void NonnegQP::factor_all(const std::vector<int64_t>& indices) {
  // Same result as append() for each index in turn (a column whose pivot vanishes is left out),
  // but right-looking: the trailing updates are contiguous row updates, which vectorise, where
  // append's forward substitutions are chains of short dot products.
  const int64_t m = int64_t(indices.size());
  for (int64_t r = 0; r < m; ++r) {
    double* Ar = &L_[size_t(r * n_)];
    const double* Qr = &Q_.data[size_t(indices[size_t(r)] * n_)];
    for (int64_t t = 0; t <= r; ++t) Ar[t] = Qr[indices[size_t(t)]];
  }
  std::vector<char>& kept = skipped_;  // scratch: which of the m columns enter the factor
  for (int64_t col = 0; col < m; ++col) {
    const double qjj = Q_(indices[size_t(col)], indices[size_t(col)]);
    const double pivot2 = L_[size_t(col * n_ + col)];
    kept[size_t(col)] = qjj > 0 && pivot2 > kPivotTolerance * qjj;
    if (!kept[size_t(col)]) continue;  // dependent on the kept ones: it updates nothing
    const double pivot = std::sqrt(pivot2);
    L_[size_t(col * n_ + col)] = pivot;
    const double inv = 1 / pivot;
    for (int64_t r = col + 1; r < m; ++r) {
      const double l = L_[size_t(r * n_ + col)] * inv;
      L_[size_t(r * n_ + col)] = l;
      column_[size_t(r)] = l;
    }
    for (int64_t r = col + 1; r < m; ++r) {
      double* Ar = &L_[size_t(r * n_)];
      const double lr = column_[size_t(r)];
      for (int64_t t = col + 1; t <= r; ++t) Ar[t] -= lr * column_[size_t(t)];
    }
  }
  // Keep the rows and columns of the kept indices.
  int64_t k = 0;
  for (int64_t r = 0; r < m; ++r) {
    if (!kept[size_t(r)]) continue;
    double* dst = &L_[size_t(k * n_)];
    const double* src = &L_[size_t(r * n_)];
    int64_t t2 = 0;
    for (int64_t t = 0; t <= r; ++t)
      if (kept[size_t(t)]) dst[t2++] = src[t];
    inv_diag_[size_t(k)] = 1 / dst[k];
    free_.push_back(indices[size_t(r)]);
    is_free_[size_t(indices[size_t(r)])] = 1;
    ++k;
  }
  std::fill(kept.begin(), kept.end(), 0);
}

void NonnegQP::remove_at(int64_t pos) {
  const int64_t k = int64_t(free_.size());
  // Dropping row and column `pos` of L leaves L' with L'L'ᵀ = (Q[free', free'] minus a rank-one
  // term carried by the dropped column below the diagonal); adding it back to the trailing block
  // is a rank-one *update* (stable, O(k²)), not a refactorisation.
  const int64_t m = k - 1 - pos;  // rows below pos
  for (int64_t b = 0; b < m; ++b) column_[size_t(b)] = L_[size_t((pos + 1 + b) * n_ + pos)];
  for (int64_t i = pos + 1; i < k; ++i) {
    double* dst = &L_[size_t((i - 1) * n_)];
    const double* src = &L_[size_t(i * n_)];
    std::copy(src, src + pos, dst);
    std::copy(src + pos + 1, src + i + 1, dst + pos);
  }
  for (int64_t a = 0; a < m; ++a) {
    double* La = &L_[size_t((pos + a) * n_)];
    const double laa = La[pos + a];
    const double xa = column_[size_t(a)];
    const double r = std::sqrt(laa * laa + xa * xa);  // entries are O(1): diag(D Q D) is in [1/2, 2)
    const double cos = r / laa, sin = xa / laa, inv_cos = laa / r;
    La[pos + a] = r;
    inv_diag_[size_t(pos + a)] = 1 / r;
    for (int64_t b = a + 1; b < m; ++b) {
      double& lba = L_[size_t((pos + b) * n_ + pos + a)];
      lba = (lba + sin * column_[size_t(b)]) * inv_cos;
      column_[size_t(b)] = cos * column_[size_t(b)] - sin * lba;
    }
  }
  free_.erase(free_.begin() + pos);
}

void NonnegQP::solve_free(const Vector& c, Vector& z) const {
  const int64_t k = int64_t(free_.size());
  for (int64_t r = 0; r < k; ++r) {  // L y = -c[free]
    const double* Lr = &L_[size_t(r * n_)];
    z[size_t(r)] = (-c[size_t(free_[size_t(r)])] - dot(Lr, z.data(), r)) * inv_diag_[size_t(r)];
  }
  for (int64_t r = k - 1; r >= 0; --r) {  // Lᵀ z = y, by columns of Lᵀ (rows of L: contiguous)
    const double* Lr = &L_[size_t(r * n_)];
    const double zr = z[size_t(r)] * inv_diag_[size_t(r)];
    z[size_t(r)] = zr;
    for (int64_t t = 0; t < r; ++t) z[size_t(t)] -= Lr[t] * zr;
  }
}

void NonnegQP::update_dual(const Vector& c) {
  // -(Q x + c), row by row of Q over the free set (Q is symmetric): contiguous, vectorised.
  for (int64_t i = 0; i < n_; ++i) dual_[size_t(i)] = -c[size_t(i)];
  for (int64_t i : free_) {
    const double xi = x_[size_t(i)];
    const double* Qi = &Q_.data[size_t(i * n_)];
    for (int64_t t = 0; t < n_; ++t) dual_[size_t(t)] -= xi * Qi[t];
  }
}

const Vector& NonnegQP::solve(const Vector& unscaled_c) {
  TORCH_INTERNAL_ASSERT(int64_t(unscaled_c.size()) == n_);
  for (int64_t i = 0; i < n_; ++i) c_[size_t(i)] = scale_[size_t(i)] * unscaled_c[size_t(i)];
  const Vector& c = c_;
  std::fill(x_.begin(), x_.end(), 0.0);
  std::fill(is_free_.begin(), is_free_.end(), 0);
  std::fill(skipped_.begin(), skipped_.end(), 0);
  free_.clear();
  converged_ = false;
  iterations_ = 0;
  double c_max = 0;
  for (int64_t i = 0; i < n_; ++i) {
    dual_[size_t(i)] = -c[size_t(i)];
    c_max = std::max(c_max, std::abs(c[size_t(i)]));
  }
  // Lawson-Hanson terminates after finitely many steps in exact arithmetic (the objective falls
  // strictly at every entry); the cap only guards against rounding-induced cycling.
  const int64_t max_iterations = 10 * n_ + 50;
  {  // warm start (see the header)
    const double tolerance = kDualTolerance * c_max;
    order_.clear();
    for (int64_t i = 0; i < n_; ++i)
      if (dual_[size_t(i)] > tolerance) order_.push_back(i);
    std::stable_sort(order_.begin(), order_.end(),
                     [&](int64_t a, int64_t b) { return dual_[size_t(a)] > dual_[size_t(b)]; });
    factor_all(order_);
    while (!free_.empty()) {
      solve_free(c, z_);
      bool dropped = false;
      for (int64_t r = int64_t(free_.size()) - 1; r >= 0; --r) {
        if (!(z_[size_t(r)] > 0)) {
          is_free_[size_t(free_[size_t(r)])] = 0;
          remove_at(r);
          dropped = true;
        }
      }
      if (!dropped) break;
    }
    for (size_t r = 0; r < free_.size(); ++r) x_[size_t(free_[r])] = z_[r];
    update_dual(c);
  }
  while (iterations_ < max_iterations) {
    double x_sum = 0;
    for (double v : x_) x_sum += v;
    double best = kDualTolerance * (c_max + q_max_ * x_sum);
    int64_t j = -1;
    for (int64_t i = 0; i < n_; ++i) {
      if (!is_free_[size_t(i)] && !skipped_[size_t(i)] && dual_[size_t(i)] > best) {
        best = dual_[size_t(i)];
        j = i;
      }
    }
    if (j < 0) {
      converged_ = true;
      break;
    }
    ++iterations_;
    if (!append(j)) {
      skipped_[size_t(j)] = 1;
      continue;
    }
    free_.push_back(j);
    is_free_[size_t(j)] = 1;
    bool entering = true;
    bool moved = true;
    while (true) {
      const int64_t k = int64_t(free_.size());
      solve_free(c, z_);
      bool feasible = true;
      for (int64_t r = 0; r < k; ++r) feasible = feasible && z_[size_t(r)] > 0;
      if (feasible) {
        for (int64_t r = 0; r < k; ++r) x_[size_t(free_[size_t(r)])] = z_[size_t(r)];
        break;
      }
      if (entering && !(z_[size_t(k - 1)] > 0)) {
        // In exact arithmetic a positive dual value guarantees z_j > 0; this is rounding.
        remove_at(k - 1);
        is_free_[size_t(j)] = 0;
        skipped_[size_t(j)] = 1;
        moved = false;
        break;
      }
      entering = false;
      // Move from x towards z until the first free variable reaches zero, and bind it.
      double alpha = 1;
      int64_t blocking = -1;
      for (int64_t r = 0; r < k; ++r) {
        const double zr = z_[size_t(r)];
        if (zr > 0) continue;
        const double xr = x_[size_t(free_[size_t(r)])];
        const double a = xr / (xr - zr);
        if (blocking < 0 || a < alpha) {
          alpha = a;
          blocking = r;
        }
      }
      for (int64_t r = 0; r < k; ++r) {
        double& xr = x_[size_t(free_[size_t(r)])];
        xr += alpha * (z_[size_t(r)] - xr);
      }
      x_[size_t(free_[size_t(blocking)])] = 0;
      for (int64_t r = k - 1; r >= 0; --r) {
        const int64_t i = free_[size_t(r)];
        if (x_[size_t(i)] <= 0) {
          x_[size_t(i)] = 0;
          is_free_[size_t(i)] = 0;
          remove_at(r);
        }
      }
      if (++iterations_ >= max_iterations) break;
    }
    if (moved) std::fill(skipped_.begin(), skipped_.end(), 0);
    update_dual(c);
  }
  if (!converged_)
    TORCH_WARN_ONCE("mtlgrad: the non-negative QP solver stopped after ", iterations_,
                    " iterations without meeting its tolerance (T = ", n_, ")");
  for (int64_t i = 0; i < n_; ++i) result_[size_t(i)] = scale_[size_t(i)] * x_[size_t(i)];
  return result_;
}

Vector min_norm_weights(Matrix G) {
  const int64_t T = G.n;
  // The weights are scale-invariant, but the unit of G matters here: least-distance programming
  // weighs |Jᵀy|² against (1ᵀy − 1)², and the answer |Jᵀw| is at most the smallest gradient's
  // norm. In units of the mean squared norm, a gradient 1e-8 of the largest has its products with
  // the others 1e-16 below the 1 1ᵀ term, under the QP's dual tests: it (and the min-norm point it
  // makes) would be missed. In units of the smallest non-zero squared norm the answer is resolved
  // whatever the spread (floored at 1e-200 of the largest: G stays finite).
  double smallest = std::numeric_limits<double>::infinity(), largest = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (G(t, t) > 0) smallest = std::min(smallest, G(t, t));
    largest = std::max(largest, G(t, t));
  }
  if (largest > 0 && std::isfinite(largest)) {
    const double unit = std::max(smallest, 1e-200 * largest);
    for (double& v : G.data) v /= unit;
  }
  for (double& v : G.data) v += 1.0;  // Q = G + 1 1ᵀ
  NonnegQP qp(G);
  Vector y = qp.solve(Vector(size_t(T), -1.0));
  double total = 0;
  for (double v : y) total += v;
  // total = 1 / (1 + |min-norm point|²) in that unit, at least 1 / 2: never zero.
  for (double& v : y) v /= total;
  return y;
}

void add_trace_relative_ridge(Matrix& G, double reg_eps) {
  if (reg_eps == 0) return;
  for (int64_t i = 0; i < G.n; ++i) G(i, i) += reg_eps * double(G.n);
}

}  // namespace mtlgrad::solvers
