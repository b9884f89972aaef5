from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_main_task


class CosineGating(GramAggregator):
    """Auxiliary-task gating by gradient similarity (Du et al., 2018, `Adapting Auxiliary Losses
    Using Gradient Similarity <https://arxiv.org/abs/1812.02224>`_).

    Task ``main`` is the task of interest, all others are auxiliary. The update is
    ``g_main + Σ_k w_k g_k`` where an auxiliary gradient counts only while its cosine with the main
    gradient is positive: ``w_k = 1`` if ``cos(g_main, g_k) > 0`` else ``0`` (the paper's
    unweighted variant, the default), or ``w_k = max(cos(g_main, g_k), 0)`` with ``weighted=True``
    (its weighted variant). A zero gradient has no direction: its cosine counts as 0, so the gate
    is closed (for every auxiliary task when the main gradient is zero). The main weight is 1.

    The update never conflicts with the main task (``g_mainᵀ d >= ||g_main||²``). Linear under
    scaling; with T = 1 the update is the main gradient.
    """

    def __init__(self, main: int = 0, weighted: bool = False) -> None:
        if not isinstance(main, int) or isinstance(main, bool) or main < 0:
            raise ValueError(f"main must be a non-negative int (a task index), got {main!r}")
        if not isinstance(weighted, bool):
            raise TypeError(f"weighted must be a bool, got {weighted!r}")
        self.main = main
        self.weighted = weighted

    def _weights(self, G: Tensor) -> Tensor:
        check_main_task(self.main, G.shape[0], "CosineGating")
        return torch.ops.mtlgrad.cosine_gating_weights(G, self.main, self.weighted)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"main": self.main, "weighted": self.weighted}
