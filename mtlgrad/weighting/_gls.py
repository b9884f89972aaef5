from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from mtlgrad.weighting._base import LossWeighting


class GLS(LossWeighting):
    """Geometric Loss Strategy (Chennupati, Sistu, Yogamani & Rawashdeh, CVPR Workshops 2019,
    `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning <https://arxiv.org/abs/1904.08492>`_).

    The backpropagated objective is the geometric mean of the T task losses (the paper's GLS
    equation)::

        G = (Π_t L_t)^(1/T) = exp((1/T) Σ_t log L_t)

    computed through the logs, as on the right, so that neither the product's overflow (large
    losses, many tasks) nor its underflow (small losses) reaches the result. Its gradient is::

        ∇G = Σ_t (G / (T L_t)) ∇L_t

    i.e. a weighted sum of the task gradients whose weights ``G / (T L_t)`` (recorded in
    ``weights``) are largest for the tasks with the smallest losses: the objective is invariant to
    a fixed scale of any one loss up to a constant factor (``c L_t`` gives ``c^(1/T) G``), so no
    task dominates through its units.

    GLS has no state and nothing to learn. Every loss must be positive and finite (the method
    takes its log); otherwise the call raises a ``ValueError`` naming the task, before
    ``weights`` changes.

    Args:
        num_tasks: T.
    """

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        names, stacked = self._stack(losses)
        values = stacked.detach()
        valid = (values > 0) & (values < math.inf)  # NaN fails both
        if not bool(valid.all()):
            i = int((~valid).nonzero()[0])
            raise ValueError(
                f"GLS: the loss of {names[i]!r} must be positive and finite, got "
                f"{float(values[i])!r} (GLS takes the geometric mean of the losses)"
            )
        out = stacked.log().mean().exp()
        self.weights = out.detach() / (self.num_tasks * values)
        return out
