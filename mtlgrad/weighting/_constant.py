from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

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
        if isinstance(weights, Tensor):
            if weights.dim() != 1:
                raise ValueError(
                    f"weights must be 1-D (one per task), got shape {tuple(weights.shape)}"
                )
            values = weights.detach().double().cpu().tolist()
        else:
            try:
                values = list(weights)
            except TypeError:
                raise TypeError(
                    f"weights must be a sequence of numbers, got {type(weights).__name__}"
                ) from None
        if not values:
            raise ValueError("weights must hold one weight per task, got none")
        for t, w in enumerate(values):
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"weights[{t}] must be a number, got {type(w).__name__}")
            if not (math.isfinite(w) and w >= 0):  # NaN fails both
                raise ValueError(f"weights[{t}] must be finite and non-negative, got {w!r}")
        super().__init__(len(values))
        self.register_buffer(
            "fixed_weights", torch.tensor(values, dtype=torch.float64), persistent=False
        )

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        _, stacked = self._stack(losses)
        return self._weighted_sum(stacked, self.fixed_weights)

    def extra_repr(self) -> str:
        return f"weights={[float(w) for w in self.fixed_weights.tolist()]}"
