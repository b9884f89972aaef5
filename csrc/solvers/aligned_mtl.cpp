// Aligned-MTL (Senushkin et al., 2023, "Independent Component Alignment for Multi-Task Learning",
// Algorithm 1) on the Gram matrix: with G = V Λ Vᵀ, the balance transformation is
// B = sqrt(σ) V Λ^{-1/2} Vᵀ over the non-zero eigenvalues, the aligned gradients are the columns of
// Jᵀ B (orthogonal, all of norm sqrt(σ)), and their sum is d = Jᵀ B 1, i.e. the weights B 1.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "dense.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor aligned_mtl_weights(const at::Tensor& gram, c10::string_view scale_mode) {
  const char* op = "mtlgrad.aligned_mtl_weights";
  TORCH_CHECK_VALUE(scale_mode == "min" || scale_mode == "median" || scale_mode == "rmse", op,
                    ": scale_mode must be 'min', 'median' or 'rmse', got '", std::string(scale_mode), "'");
  Matrix G = gram_matrix(gram, op);
  normalise_trace(G);  // B is scale-free (sqrt(σ) / sqrt(λ)); this keeps the eigenvalues of order 1
  const int64_t T = G.n;
  Vector values;
  Matrix V;
  symmetric_eigen(G, values, V);  // ascending
  const double largest = values.back();
  // Rank as in the official code: eigenvalues above λ_max · T · eps count, with eps the float32
  // machine epsilon (torch.finfo() of the default dtype there). It is also the right threshold here:
  // G from float32 or 16-bit gradients is accumulated in float32 within chunks, so smaller
  // eigenvalues are rounding noise, and inverting them would swamp the update.
  const double tol = largest * double(T) * 1.1920928955078125e-07;
  int64_t first = 0;  // values[first..T) are kept
  while (first < T && !(values[size_t(first)] > tol)) ++first;
  const int64_t rank = T - first;
  // G = 0: no direction to align; any weights give d = 0 (B = I, as in TorchJD).
  if (rank == 0 || !(largest > 0)) return to_tensor(Vector(size_t(T), 1.0));
  double sigma = 0;
  if (scale_mode == "min") {
    sigma = values[size_t(first)];
  } else if (scale_mode == "median") {
    // torch.median's convention, used by the official code: the lower of the two middle values.
    sigma = values[size_t(first + (rank - 1) / 2)];
  } else {  // "rmse": the mean eigenvalue, as in the official code
    for (int64_t k = first; k < T; ++k) sigma += values[size_t(k)];
    sigma /= double(rank);
  }
  const double root_sigma = std::sqrt(sigma);
  Vector weights(size_t(T), 0.0);
  for (int64_t k = first; k < T; ++k) {
    double projection = 0;  // v_kᵀ 1
    for (int64_t i = 0; i < T; ++i) projection += V(i, k);
    const double coefficient = root_sigma * projection / std::sqrt(values[size_t(k)]);
    for (int64_t i = 0; i < T; ++i) weights[size_t(i)] += coefficient * V(i, k);
  }
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  m.def("aligned_mtl_weights(Tensor gram, str scale_mode) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("aligned_mtl_weights", &aligned_mtl_weights); }

}  // namespace mtlgrad::solvers
