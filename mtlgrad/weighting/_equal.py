from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlgrad.weighting._base import LossWeighting


class Equal(LossWeighting):
    """Equal weighting: the plain sum of the task losses, ``Σ_t L_t`` (every weight 1).

    The usual multi-task baseline ("EW" in LibMTL, linear scalarisation with unit weights). It
    has no state and needs nothing but the losses.

    Args:
        num_tasks: T.
    """

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        _, stacked = self._stack(losses)
        self.weights = torch.ones_like(stacked).detach()
        return stacked.sum()
