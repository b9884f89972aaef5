from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

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
            if not math.isfinite(w):
                raise ValueError(f"weights[{t}] must be finite, got {w!r}")
        self.fixed_weights = torch.tensor([float(w) for w in values], dtype=torch.float64)

    def _weights(self, G: Tensor) -> Tensor:
        T, n = G.shape[0], self.fixed_weights.shape[0]
        if n != T:
            raise ValueError(f"Constant has {n} weights (one per task), but got {T} tasks")
        return self.fixed_weights.clone()

    def _hyperparameters(self) -> dict[str, Any]:
        return {"weights": self.fixed_weights.tolist()}
