from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class Sum(GramAggregator):
    """Sum of the task gradients, ``d = Σ_t g_t`` (all weights 1).

    The plain multi-task baseline (equal weighting, summed). Linear under scaling, permutation
    invariant; not non-conflicting.
    """

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ones(G.shape[0], dtype=torch.float64)
