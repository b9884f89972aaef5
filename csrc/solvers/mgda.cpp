// MGDA (Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization"): the
// minimum-norm point of the convex hull of the (optionally normalised) task gradients,
// min_{w in simplex} wᵀ G w (the paper's Eq. 3 / Algorithm 2 problem), solved exactly by
// least-distance programming (min_norm_weights in nonneg_qp.h).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "dense.h"
#include "nonneg_qp.h"

namespace mtlgrad::solvers {
namespace {

constexpr const char* kOp = "mtlgrad.mgda_weights";

// Task losses as doubles, checked: the loss normalisations divide by them.
Vector task_losses(const std::optional<at::Tensor>& losses, int64_t T, std::string_view normalization) {
  TORCH_CHECK_VALUE(losses.has_value() && losses->defined(), kOp, ": normalization='", normalization,
                    "' needs the task losses");
  const at::Tensor& l = *losses;
  TORCH_CHECK_TYPE(l.scalar_type() == at::kDouble && l.device().is_cpu(), kOp,
                   ": the losses must be a float64 CPU tensor, got ", l.scalar_type(), " on ", l.device());
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == T, kOp, ": expected ", T,
                    " losses (one per task), got shape ", l.sizes());
  const at::Tensor lc = l.contiguous();
  const double* p = lc.data_ptr<double>();
  Vector out(p, p + T);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(std::isfinite(out[size_t(t)]) && out[size_t(t)] > 0, kOp, ": normalization='",
                      normalization, "' divides by the task losses, which must be positive and finite; task ",
                      t, " has loss ", out[size_t(t)]);
  return out;
}

at::Tensor mgda_weights(const at::Tensor& gram, c10::string_view normalization_view,
                        const std::optional<at::Tensor>& losses) {
  const std::string_view normalization(normalization_view.data(), normalization_view.size());
  Matrix G = gram_matrix(gram, kOp);
  const int64_t T = G.n;
  // Sener & Koltun's official code divides each task gradient by a normaliser (1, its norm, its
  // loss, or both) before solving; here ĝ_t = scale_t g_t, so Ĝ = diag(scale) G diag(scale). A
  // zero gradient stays zero (its norm is no scale), instead of the official code's 0/0.
  Vector scale(size_t(T), 1.0);
  const bool by_norm = normalization == "l2" || normalization == "loss+";
  const bool by_loss = normalization == "loss" || normalization == "loss+";
  TORCH_CHECK_VALUE(by_norm || by_loss || normalization == "none", kOp,
                    ": normalization must be one of 'none', 'l2', 'loss', 'loss+'; got '", normalization,
                    "'");
  if (by_loss) {
    const Vector l = task_losses(losses, T, normalization);
    for (int64_t t = 0; t < T; ++t) scale[size_t(t)] /= l[size_t(t)];
  }
  if (by_norm) {
    for (int64_t t = 0; t < T; ++t) {
      const double norm = std::sqrt(std::max(G(t, t), 0.0));
      scale[size_t(t)] = norm > 0 ? scale[size_t(t)] / norm : 0.0;
    }
  }
  if (by_norm || by_loss) {
    // The solution does not change when every ĝ_t is scaled alike; keeping the scales <= 1 keeps
    // Ĝ finite for extreme losses.
    const double largest = *std::max_element(scale.begin(), scale.end());
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j)
        G(i, j) *= largest > 0 ? (scale[size_t(i)] / largest) * (scale[size_t(j)] / largest) : 0.0;
  }
  return to_tensor(min_norm_weights(std::move(G)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtlgrad, m) {
  // `normalization`: 'none', 'l2', 'loss' or 'loss+'; the last two need `losses` (T values).
  m.def("mgda_weights(Tensor gram, str normalization, Tensor? losses) -> Tensor weights");
}

TORCH_LIBRARY_IMPL(mtlgrad, CPU, m) { m.impl("mgda_weights", &mgda_weights); }

}  // namespace mtlgrad::solvers
