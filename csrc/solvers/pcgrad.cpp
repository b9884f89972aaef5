// PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1) on
// coefficient vectors: every projected gradient is a combination Σ_k c_k g_k of the original
// ones, so g_i^PC · g_j = (G c)_j and the whole recursion runs on G. G c is kept up to date as c
// changes, so a conflict test costs O(1) and only an actual projection costs O(T).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <numeric>

#include "dense.h"
#include "random.h"

namespace mtlgrad::solvers {
namespace {

at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed) {
  Matrix G = gram_matrix(gram, "mtlgrad.pcgrad_weights");
  normalise_trace(G);  // the projections are scale-invariant; this keeps the tests below O(1)
  const int64_t T = G.n;
  SplitMix64 rng{static_cast<uint64_t>(seed)};
  Vector weights(static_cast<size_t>(T), 0.0);
  Vector c(static_cast<size_t>(T), 0.0);
  Vector products(static_cast<size_t>(T), 0.0);  // G c: g_i^PC · g_k for every k
  std::vector<int64_t> others;
  others.reserve(size_t(T));
  for (int64_t i = 0; i < T; ++i) {
    std::fill(c.begin(), c.end(), 0.0);
    c[size_t(i)] = 1.0;
    for (int64_t k = 0; k < T; ++k) products[size_t(k)] = G(i, k);
    others.clear();
    for (int64_t j = 0; j < T; ++j)
      if (j != i) others.push_back(j);
    rng.shuffle(others);  // "for g_j in B \ {g_i} in random order"
    for (int64_t j : others) {
      const double gjj = G(j, j);
      const double conflict = products[size_t(j)];  // g_i^PC · g_j
      if (!(gjj > 0) || !(conflict < 0)) continue;  // a zero gradient conflicts with nothing
      const double step = -conflict / gjj;
      c[size_t(j)] += step;
      for (int64_t k = 0; k < T; ++k) products[size_t(k)] += step * G(j, k);
    }
    for (int64_t k = 0; k < T; ++k) weights[size_t(k)] += c[size_t(k)];
  }
  return to_tensor(weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `seed` drives the random order of the projections (drawn from a torch.Generator by the caller).
  m.def("pcgrad_weights(Tensor gram, int seed) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("pcgrad_weights", &pcgrad_weights); }

}  // namespace mtlgrad::solvers
