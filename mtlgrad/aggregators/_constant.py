from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad._task_weights import task_weight_list
from mtlgrad.aggregators._base import GramAggregator


class Constant(GramAggregator):
    """Fixed, user-chosen task weights: ``d = Σ_t w_t g_t = Jᵀ w`` (TorchJD's ``Constant``).

    The weights do not depend on the gradients, so the update is linear in J (linear under
    scaling); it is permutation invariant only when the tasks and the weights are permuted
    together. Not non-conflicting. ``Constant([1.0] * T)`` is :class:`Sum`.

    Args:
        weights: one finite weight per task (a sequence of numbers or a 1-D tensor); any sign.
            The number of tasks of every call must equal its length.
    """

    def __init__(self, weights: Sequence[float] | Tensor) -> None:
        values = task_weight_list(weights, non_negative=False)
        self.fixed_weights = torch.tensor(values, dtype=torch.float64)

    def _weights(self, G: Tensor) -> Tensor:
        T, n = G.shape[0], self.fixed_weights.shape[0]
        if n != T:
            raise ValueError(f"Constant has {n} weights (one per task), but got {T} tasks")
        return self.fixed_weights.clone()

    def _hyperparameters(self) -> dict[str, Any]:
        return {"weights": self.fixed_weights.tolist()}
