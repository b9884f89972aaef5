from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_main_task


class HydaLearn(GramAggregator):
    """HydaLearn, per-step weighting of auxiliary tasks by main-task gain (Verboven et al., 2020,
    `HydaLearn: Highly Dynamic Task Weighting for Multi-task Learning with Auxiliary Tasks
    <https://arxiv.org/abs/2008.11643>`_).

    Task ``main`` is the task of interest. HydaLearn sets the ratio of two tasks' weights to the
    ratio of the main-task gains ``δ_k`` that a step along each task's gradient brings,
    ``w_i / w_j = δ_i / δ_j``, recomputed at every mini-batch. The paper measures ``δ_k`` with a
    trial step ``−η g_k`` (an extra forward pass per task); here it is taken to first order,
    ``δ_k = η g_mainᵀ g_k`` (``η`` cancels in the ratios), which needs only the main task's row of
    the Gram matrix. So ``w_k ∝ max(g_mainᵀ g_k, 0)``, normalised to sum to 1; the main task's own
    gain is ``||g_main||²``.

    Choices where we could not check the paper's exact text: a negative gain (a step that would
    increase the main loss) gives weight 0, and the weights are normalised to sum 1. With a zero
    main gradient every gain is 0 and the weights are 1 for the main task, 0 for the others.

    Never conflicts with the main task. Linear under scaling; with T = 1 the update is the main
    gradient.
    """

    def __init__(self, main: int = 0) -> None:
        if not isinstance(main, int) or isinstance(main, bool) or main < 0:
            raise ValueError(f"main must be a non-negative int (a task index), got {main!r}")
        self.main = main

    def _weights(self, G: Tensor) -> Tensor:
        check_main_task(self.main, G.shape[0], "HydaLearn")
        return torch.ops.mtlgrad.hydalearn_weights(G, self.main)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"main": self.main}
