// IMTL-G (Liu et al., 2021, "Towards Impartial Multi-task Learning", ICLR 2021): the weights α
// (Σ α = 1) for which the update g = Σ_t α_t g_t has the same projection on every task's unit
// gradient u_t = g_t / ||g_t||. The paper's closed form, with task 1 as reference:
//
//     α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,   α_1 = 1 − Σ_{t>=2} α_t,
//     D = [g_1 − g_2, ..., g_1 − g_T]ᵀ,   U = [u_1 − u_2, ..., u_1 − u_T]ᵀ,
//
// where every entry is a dot product (g_i − g_j)ᵀ(u_k − u_l), i.e. a combination of G_ik / ||g_k||.
// Singular D Uᵀ (duplicated or linearly dependent gradients) uses the pseudo-inverse.
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
// sweep; used only when the fast elimination finds D Uᵀ singular.
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

at::Tensor imtlg_weights(const at::Tensor& gram) {
  Matrix G = gram_matrix(gram, "mtlgrad.imtlg_weights");
  normalise_trace(G);  // the weights are scale-invariant; this keeps the thresholds below absolute
  const int64_t T = G.n;
  Vector weights(static_cast<size_t>(T), 0.0);
  // A zero gradient has no unit vector: it gets weight 0 and no say in the projections.
  std::vector<int64_t> tasks;
  for (int64_t i = 0; i < T; ++i)
    if (G(i, i) > 1e-30) tasks.push_back(i);
  if (tasks.empty()) return to_tensor(weights);
  const int64_t m = int64_t(tasks.size()) - 1;  // unknowns α_2..α_n of the non-zero tasks
  Vector norm(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) norm[i] = std::sqrt(G(tasks[i], tasks[i]));
  // g_i · u_j for positions i, j in `tasks`.
  auto gu = [&](int64_t i, int64_t j) { return G(tasks[size_t(i)], tasks[size_t(j)]) / norm[size_t(j)]; };

  Vector x;
  if (m > 0) {
    // α_{2:} (D Uᵀ) = g_1 Uᵀ, i.e. (D Uᵀ)ᵀ x = (g_1 Uᵀ)ᵀ with (D Uᵀ)_ij = (g_1 − g_{i+1})ᵀ(u_1 − u_{j+1}).
    Matrix At(m);  // (D Uᵀ)ᵀ
    Vector rhs(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) {
      rhs[size_t(j)] = gu(0, 0) - gu(0, j + 1);
      for (int64_t i = 0; i < m; ++i) At(j, i) = gu(0, 0) - gu(0, j + 1) - gu(i + 1, 0) + gu(i + 1, j + 1);
    }
    // Gaussian elimination when D Uᵀ is clearly regular (pivots above 1e-10 of its largest entry),
    // else the minimum-norm least-squares solution (singular values below 1e-10 of the largest
    // dropped).
    if (!solve(At, rhs, x, 1e-10)) x = pseudo_inverse_solve(At, rhs, 1e-10);
  }
  double rest = 1;
  for (int64_t i = 0; i < m; ++i) {
    weights[size_t(tasks[size_t(i + 1)])] = x[size_t(i)];
    rest -= x[size_t(i)];
  }
  weights[size_t(tasks[0])] = rest;
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) { m.def("imtlg_weights(Tensor gram) -> Tensor weights"); }

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("imtlg_weights", &imtlg_weights); }

}  // namespace mtlgrad::solvers
