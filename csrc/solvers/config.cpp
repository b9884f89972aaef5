// ConFIG (Liu et al., 2024, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
// Networks", Eq. 2) on the Gram matrix. With unit vectors u_i = g_i / ||g_i|| (rows of U), the
// conflict-free direction x = U⁺ 1 = Uᵀ (U Uᵀ)⁺ 1 = Σ_i a_i u_i, where a = C⁺ 1 and C = U Uᵀ is the
// matrix of cosines; in the original gradients x = Σ_i c_i g_i with c_i = a_i / ||g_i||. The update is
// (Σ_i g_iᵀ x̂) x̂ with x̂ = x / ||x||, i.e. the weights c (1ᵀ G c) / (cᵀ G c).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor config_weights(const at::Tensor& gram) {
  Matrix G = gram_matrix(gram, "mtlgrad.config_weights");
  normalise_trace(G);  // the weights are scale-free; this keeps c and G c of order 1
  const int64_t T = G.n;
  Vector norms(size_t(T), 0.0);
  for (int64_t i = 0; i < T; ++i) norms[size_t(i)] = std::sqrt(std::max(G(i, i), 0.0));
  // Cosines; a zero gradient has no unit vector and gets a zero row and column (as the
  // reference implementations do by zeroing its NaN unit vector).
  Matrix C(T);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j)
      if (norms[size_t(i)] > 0 && norms[size_t(j)] > 0)
        C(i, j) = G(i, j) / (norms[size_t(i)] * norms[size_t(j)]);
  // a = C⁺ 1: the least-squares solution of minimum norm of u_iᵀ x = 1 (exact when the unit vectors
  // are linearly independent), in the span of the gradients.
  const Matrix C_pinv = symmetric_pseudo_inverse(C);
  const Vector a = multiply(C_pinv, Vector(size_t(T), 1.0));
  Vector c(size_t(T), 0.0);
  for (int64_t i = 0; i < T; ++i)
    if (norms[size_t(i)] > 0) c[size_t(i)] = a[size_t(i)] / norms[size_t(i)];
  const Vector Gc = multiply(G, c);
  const double squared_norm = dot(c, Gc);  // ||x||²
  double projections = 0;                  // Σ_i g_iᵀ x
  for (double v : Gc) projections += v;
  // x = 0 (two opposite gradients: 1 is orthogonal to the range of C; or G = 0): no direction, no
  // update. ||x||² = Σ_k (v_kᵀ 1)² / λ_k over C's eigenpairs, with λ_k <= T: unless 1 is orthogonal
  // to the range of C it is far above 1e-20, and rounding leaves far less when it is.
  if (!(squared_norm > 1e-20)) return to_tensor(Vector(size_t(T), 0.0));
  const double length = projections / squared_norm;
  for (double& v : c) v *= length;
  return to_tensor(c);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) { m.def("config_weights(Tensor gram) -> Tensor weights"); }

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("config_weights", &config_weights); }

}  // namespace mtlgrad::solvers
