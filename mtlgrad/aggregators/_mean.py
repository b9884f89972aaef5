from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class Mean(GramAggregator):
    """Mean of the task gradients, ``d = (1/T) Σ_t g_t`` (all weights 1/T).

    Linear under scaling, permutation invariant; not non-conflicting.
    """

    def _weights(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
