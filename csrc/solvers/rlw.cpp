// Random loss weighting (Lin et al., 2022, "Reasonable Effectiveness of Random Weighting: A Litmus
// Test for Multi-Task Learning", arXiv:2111.10603), with the paper's default distribution: fresh
// weights every step, λ = softmax(z) with z ~ N(0, I_T). The Gram matrix only gives T: the weights do
// not depend on the gradients.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "dense.h"
#include "random.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor rlw_weights(const at::Tensor& gram, int64_t seed) {
  const Matrix G = gram_matrix(gram, "mtlgrad.rlw_weights");
  const int64_t T = G.n;
  SplitMix64 rng{static_cast<uint64_t>(seed)};
  // 53-bit uniforms in [0, 1), so that the Python reference in the tests can reproduce them.
  auto uniform = [&] { return double(rng.next() >> 11) * 0x1p-53; };
  // Box-Muller, both outputs of each pair: z = √(−2 log(1 − u1)) (cos, sin)(2π u2).
  Vector z(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; i += 2) {
    const double u1 = uniform(), u2 = uniform();
    const double radius = std::sqrt(-2 * std::log(1 - u1));
    const double angle = 2 * std::numbers::pi * u2;
    z[size_t(i)] = radius * std::cos(angle);
    if (i + 1 < T) z[size_t(i + 1)] = radius * std::sin(angle);
  }
  const double largest = *std::max_element(z.begin(), z.end());
  double total = 0;
  for (double& v : z) total += (v = std::exp(v - largest));
  for (double& v : z) v /= total;
  return to_tensor(z);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `seed` drives the normal draws (drawn from a torch.Generator by the caller).
  m.def("rlw_weights(Tensor gram, int seed) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("rlw_weights", &rlw_weights); }

}  // namespace mtlgrad::solvers
