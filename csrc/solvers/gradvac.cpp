// GradVac (Wang et al., 2021, "Gradient Vaccine", Algorithm 1) on coefficient vectors, like PCGrad:
// every adjusted gradient g_i' is a combination Σ_k c_k g_k of the original ones, so the cosines
// cos(g_i', g_j) = cᵀ G e_j / (sqrt(cᵀ G c) ||g_j||) come from G alone.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "dense.h"
#include "random.h"

namespace mtlgrad::solvers {
namespace {

// Returns the summed coefficients of the adjusted gradients and the updated T x T EMA targets.
std::tuple<at::Tensor, at::Tensor> gradvac_weights(const at::Tensor& gram, const at::Tensor& targets,
                                                   double beta, int64_t seed) {
  const char* op = "mtlgrad.gradvac_weights";
  Matrix G = gram_matrix(gram, op);
  normalise_trace(G);  // cosines and the coefficient ratio ||g_i'|| / ||g_j|| are scale-free
  const int64_t T = G.n;
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == T && targets.size(1) == T, op,
                    ": expected T x T targets for T = ", T, ", got shape ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kDouble && targets.device().is_cpu(), op,
                   ": the targets must be a float64 CPU tensor");
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, op, ": beta must be in [0, 1], got ", beta);
  at::Tensor phi_hat = targets.contiguous().clone();
  double* target = phi_hat.data_ptr<double>();
  for (int64_t k = 0; k < T * T; ++k)
    TORCH_CHECK_VALUE(target[k] >= -1 && target[k] <= 1, op,
                      ": the targets are cosines and must lie in [-1, 1], got ", target[k]);

  SplitMix64 rng{static_cast<uint64_t>(seed)};
  Vector weights(static_cast<size_t>(T), 0.0);
  Vector c(static_cast<size_t>(T), 0.0);
  Vector cG(static_cast<size_t>(T), 0.0);  // g_i' · g_k for every k
  std::vector<int64_t> others;
  others.reserve(size_t(T));
  for (int64_t i = 0; i < T; ++i) {
    std::fill(c.begin(), c.end(), 0.0);
    c[size_t(i)] = 1.0;
    for (int64_t k = 0; k < T; ++k) cG[size_t(k)] = G(i, k);
    // The same draws as PCGrad's, so that beta = 0 (targets stay 0) reproduces PCGrad exactly.
    others.clear();
    for (int64_t j = 0; j < T; ++j)
      if (j != i) others.push_back(j);
    rng.shuffle(others);
    for (int64_t j : others) {
      const double norm_i = std::sqrt(std::max(dot(c, cG), 0.0));
      const double norm_j = std::sqrt(std::max(G(j, j), 0.0));
      // A zero gradient has no direction: no cosine, so neither an adjustment nor an EMA update.
      if (!(norm_i > 0) || !(norm_j > 0)) continue;
      const double phi = std::clamp(cG[size_t(j)] / (norm_i * norm_j), -1.0, 1.0);
      double& phi_target = target[i * T + j];
      if (phi < phi_target) {
        // The paper's closed form for the a that makes cos(g_i' + a g_j, g_j) equal the target. A target
        // of exactly 1 cannot be reached by a finite a (unless g_i' is already parallel to g_j).
        const double sin_target = std::sqrt(std::max(1 - phi_target * phi_target, 0.0));
        if (sin_target > 0) {
          const double sin_phi = std::sqrt(std::max(1 - phi * phi, 0.0));
          const double a = norm_i * (phi_target * sin_phi - phi * sin_target) / (norm_j * sin_target);
          c[size_t(j)] += a;
          for (int64_t k = 0; k < T; ++k) cG[size_t(k)] += a * G(j, k);
        }
      }
      phi_target = (1 - beta) * phi_target + beta * phi;
    }
    for (int64_t k = 0; k < T; ++k) weights[size_t(k)] += c[size_t(k)];
  }
  return {to_tensor(weights), phi_hat};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // Returns the weights and the updated T x T EMA targets (the input targets are not modified).
  m.def(
      "gradvac_weights(Tensor gram, Tensor targets, float beta, int seed) -> (Tensor weights, Tensor "
      "targets)");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("gradvac_weights", &gradvac_weights); }

}  // namespace mtlgrad::solvers
