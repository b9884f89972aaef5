from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, draw_seed, own_generator


class RLW(GramAggregator):
    """Random weighting (Lin et al., TMLR 2022, `Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_).

    Every call draws fresh weights ``λ = softmax(z)`` with ``z ~ N(0, I_T)``, the paper's main
    (default) choice of distribution, so the weights are positive and sum to 1 and the update is
    ``Σ_t λ_t g_t``. The paper weights the losses (RLW) or the shared-parameter gradients (RGW);
    for the shared parameters both give this update. The samples come from a native generator
    seeded per call from ``generator``: by default one of its own, seeded once from torch's global
    RNG (so ``torch.manual_seed`` reproduces a run), whose state is in :meth:`state_dict`.

    Linear under scaling for a given seed; with T = 1 the update is the one gradient.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = own_generator(generator)

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.rlw_weights(G, draw_seed(self.generator))
