from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlgrad._task_weights import task_weight_list
from mtlgrad.weighting._base import LossWeighting


class Constant(LossWeighting):
    """Fixed, user-chosen task weights: ``Σ_t w_t L_t``.

    Hand-tuned weights are the strongest simple baseline when the losses have very different
    scales. The weights are not state (nothing changes during training); they move with
    ``weighting.to(device)``.

    Args:
        weights: one finite, non-negative weight per task (a sequence of numbers or a 1-D
            tensor); the number of tasks is its length.
    """

    def __init__(self, weights: Sequence[float] | Tensor) -> None:
        values = task_weight_list(weights, non_negative=True)
        super().__init__(len(values))
        self.register_buffer(
            "fixed_weights", torch.tensor(values, dtype=torch.float64), persistent=False
        )

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        _, stacked = self._stack(losses)
        return self._weighted_sum(stacked, self.fixed_weights)

    def extra_repr(self) -> str:
        return f"weights={[float(w) for w in self.fixed_weights.tolist()]}"
