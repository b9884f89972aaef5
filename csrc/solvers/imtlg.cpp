// IMTL-G (Liu et al., 2021, "Towards Impartial Multi-task Learning", ICLR 2021): the weights α
// (Σ α = 1) for which the update g = Σ_t α_t g_t has the same projection on every task's unit
// gradient u_t = g_t / ||g_t||. The paper's closed form takes task 1 as reference:
//
//     α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 − Σ_{t>=2} α_t,
//     D = [g_1 − g_2, ..., g_1 − g_T]ᵀ,   U = [u_1 − u_2, ..., u_1 − u_T]ᵀ.
//
// The same conditions are solved here as a system that treats every task alike (imtlg_weights):
// the paper's weights whenever D Uᵀ is invertible. When it is not (duplicated, parallel or
// dependent gradients), a pseudo-inverse of D Uᵀ depends on the reference task (its minimum-norm
// choice, and its cut-off, relative to D Uᵀ's largest singular value: for nearly parallel
// gradients D Uᵀ is all rounding, which it would invert); the choice made below does not depend
// on the order of the tasks.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

// x = M⁺ b for a general square M, by a one-sided Jacobi SVD (Hestenes): rotations orthogonalise the
// columns of M (rows of W = Mᵀ here, for contiguous access) and accumulate V, so that M V = W_finalᵀ
// with orthogonal columns σ_k u_k. Singular values below rtol · σ_max count as zero. O(T³) per
// sweep; used only when the fast elimination finds the system singular.
Vector pseudo_inverse_solve(const Matrix& M, const Vector& b, double rtol) {
  const int64_t n = M.n;
  Matrix W(n), Vt = Matrix::identity(n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) W(j, i) = M(i, j);
  auto row = [n](Matrix& A, int64_t i) { return A.data.data() + i * n; };
  auto rotate = [n](double* __restrict p, double* __restrict q, double c, double s) {
    for (int64_t k = 0; k < n; ++k) {
      const double ap = p[k], aq = q[k];
      p[k] = c * ap - s * aq;
      q[k] = s * ap + c * aq;
    }
  };
  Vector norm2(static_cast<size_t>(n));
  // Rows are orthogonal once every |w_pᵀw_q| <= tol ||w_p|| ||w_q|| (tol at the rounding level of a
  // dot product); rows below 1e-14 of the largest are numerically zero (far below the pseudo-inverse's
  // cut) and are left alone, since rotating noise never converges.
  const double tol = std::max(1e-15, 4 * double(n) * std::numeric_limits<double>::epsilon());
  for (int sweep = 0; sweep < 60; ++sweep) {
    // Squared row norms, recomputed every sweep and updated exactly by each rotation in between.
    double largest = 0;
    for (int64_t k = 0; k < n; ++k) {
      norm2[size_t(k)] = dot(row(W, k), row(W, k), n);
      largest = std::max(largest, norm2[size_t(k)]);
    }
    const double negligible = 1e-28 * largest;
    bool rotated = false;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const double a = norm2[size_t(p)], bb = norm2[size_t(q)];
        if (a <= negligible || bb <= negligible) continue;
        const double g = dot(row(W, p), row(W, q), n);
        if (std::abs(g) <= tol * std::sqrt(a * bb)) continue;
        rotated = true;
        const double zeta = (bb - a) / (2 * g);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::abs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        rotate(row(W, p), row(W, q), c, s);
        rotate(row(Vt, p), row(Vt, q), c, s);
        norm2[size_t(p)] = a - t * g;
        norm2[size_t(q)] = bb + t * g;
      }
    }
    if (!rotated) break;
  }
  Vector sigma2(static_cast<size_t>(n));
  double largest = 0;
  for (int64_t k = 0; k < n; ++k) {
    sigma2[size_t(k)] = dot(row(W, k), row(W, k), n);
    largest = std::max(largest, sigma2[size_t(k)]);
  }
  Vector x(static_cast<size_t>(n), 0.0);
  for (int64_t k = 0; k < n; ++k) {
    if (!(sigma2[size_t(k)] > rtol * rtol * largest)) continue;
    // (σ_k u_k)ᵀ b / σ_k²
    const double coef = dot(row(W, k), b.data(), n) / sigma2[size_t(k)];
    for (int64_t j = 0; j < n; ++j) x[size_t(j)] += coef * Vt(k, j);
  }
  return x;
}

// Singular values (and elimination pivots) of the cosine system below (n + 1) ε₃₂ count as
// zero: the cosines come from G, whose entries carry relative errors of a few ε₃₂ when the
// gradients are float32 (accumulated in float32 within chunks), so anything smaller is rounding
// that inverting would turn into an order-dependent answer.
constexpr double kFloat32Epsilon = 1.1920928955078125e-07;

at::Tensor imtlg_weights(const at::Tensor& gram) {
  Matrix G = gram_matrix(gram, "mtlgrad.imtlg_weights");
  normalise_trace(G);  // the weights are scale-invariant; this keeps the thresholds below absolute
  const int64_t T = G.n;
  Vector weights(static_cast<size_t>(T), 0.0);
  // A zero gradient has no unit vector: it gets weight 0 and no say in the projections.
  std::vector<int64_t> tasks;
  for (int64_t i = 0; i < T; ++i)
    if (G(i, i) > 1e-30) tasks.push_back(i);
  const int64_t n = int64_t(tasks.size());
  if (n == 0) return to_tensor(weights);
  Vector norm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) norm[size_t(i)] = std::sqrt(G(tasks[size_t(i)], tasks[size_t(i)]));

  // In the contributions β_k = α_k ||g_k||, the update is g = Σ_k β_k u_k and its projections are
  // u_iᵀ g = (C β)_i with C the cosine matrix: equal projections and Σ α = 1 read
  //     C β − λ 1 = 0,   Σ_k β_k / ||g_k|| = 1,
  // one square system in (β, λ) that treats the tasks alike (the paper's closed form picks task 1
  // as reference; its solution is the same whenever it is unique) and whose entries are O(1)
  // whatever the gradients' norms (the last row is divided by its norm).
  Matrix K(n + 1);
  Vector rhs(static_cast<size_t>(n + 1), 0.0);
  double row_norm = 0;
  for (int64_t k = 0; k < n; ++k) row_norm += 1 / (norm[size_t(k)] * norm[size_t(k)]);
  row_norm = std::sqrt(row_norm);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < n; ++k)
      K(i, k) = G(tasks[size_t(i)], tasks[size_t(k)]) / (norm[size_t(i)] * norm[size_t(k)]);
    K(i, n) = -1;
    K(n, i) = 1 / (norm[size_t(i)] * row_norm);
  }
  rhs[size_t(n)] = 1 / row_norm;
  const double tol = double(n + 1) * kFloat32Epsilon;
  // Gaussian elimination when the system is clearly regular: one solution (independent gradients,
  // or dependent ones whose only equal-projection update is 0).
  Vector x;
  double total = 0;  // Σ α
  auto sum_of_weights = [&] {
    total = 0;
    for (int64_t i = 0; i < n; ++i) total += x[size_t(i)] / norm[size_t(i)];
    return total;
  };
  if (!solve(K, rhs, x, tol) || !(std::abs(sum_of_weights()) > 1e-12)) {
    // Many solutions (duplicated, parallel or otherwise dependent gradients), or none. When some
    // update has equal, non-zero projections (1 is in the range of C), take λ = 1 and the
    // minimum-norm β = C⁺ 1, normalised to Σ α = 1 (TorchJD's pinv(G) √diag(G): for parallel
    // gradients, the limit of nearly parallel ones for T = 2, the harmonic mean of their norms);
    // otherwise the projections can only be equal at 0, and the minimum-norm solution of the
    // whole system gives d = 0 (or, with no solution at all, the least-squares one). Both are
    // invariant under a reordering of the tasks.
    Matrix C(n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < n; ++k) C(i, k) = K(i, k);
    const Vector beta = multiply(symmetric_pseudo_inverse(C, tol), Vector(size_t(n), 1.0));
    const Vector projections = multiply(C, beta);
    double miss = 0;
    for (double v : projections) miss = std::max(miss, std::abs(v - 1));
    x = beta;
    if (!(miss <= std::sqrt(tol)) || !(std::abs(sum_of_weights()) > 1e-12)) {
      x = pseudo_inverse_solve(K, rhs, tol);
      if (!(std::abs(sum_of_weights()) > 1e-12)) total = 1;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    weights[size_t(tasks[size_t(i)])] = x[size_t(i)] / (norm[size_t(i)] * total);
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) { m.def("imtlg_weights(Tensor gram) -> Tensor weights"); }

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("imtlg_weights", &imtlg_weights); }

}  // namespace mtlgrad::solvers
