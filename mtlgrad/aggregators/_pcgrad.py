from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, draw_seed, own_generator


class PCGrad(GramAggregator):
    """PCGrad, "projecting conflicting gradients" (Yu et al., NeurIPS 2020,
    `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_).

    Algorithm 1 of the paper: for each task i, starting from ``g_i``, for every other task j in
    random order, if the current ``g_i^PC`` conflicts with ``g_j`` (negative dot product) it is
    projected onto the normal plane of ``g_j``:
    ``g_i^PC ← g_i^PC − (g_i^PC · g_j / ||g_j||²) g_j``. The update is the **sum** of the
    projected gradients, as in the paper and in most implementations (some libraries average).

    The recursion runs on coefficient vectors (every ``g_i^PC`` is a combination of the original
    gradients), so it needs only the Gram matrix. Each task's random order is drawn per call from
    ``generator``: by default one of its own, seeded once from torch's global RNG (so
    ``torch.manual_seed`` reproduces a run), whose state is in :meth:`state_dict`.
    Linear under scaling; with T = 1 the update is the one gradient.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = own_generator(generator)

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.pcgrad_weights(G, draw_seed(self.generator))
