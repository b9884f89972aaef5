from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_positive


class FairGrad(GramAggregator):
    """FairGrad, α-fair resource allocation between tasks (Ban & Ji, ICML 2024, `Fair Resource
    Allocation in Multi-Task Learning <https://arxiv.org/abs/2402.15638>`_).

    The update step of Algorithm 1: the paper allocates the update between the tasks by the
    α-fair utility ``Σ_i (g_iᵀ d)^{1−α} / (1 − α)`` of their first-order loss decreases; its
    optimality condition gives ``d = Σ_i w_i g_i`` with the weights the positive solution of
    ``G w = w^{-1/α}`` (elementwise power), solved as in the official code. ``α = 1`` is
    proportional fairness, larger α moves towards max-min fairness. Every task's decrease is then
    positive, ``g_iᵀ d = w_i^{-1/α} > 0``: the update is non-conflicting (see below for
    degenerate gradients, where some decreases are 0).

    The system is solved natively to rounding level (the official code stops
    ``scipy.optimize.least_squares`` at its default tolerances): it is the stationarity condition
    of the strictly convex ``Φ(w) = ½ wᵀ G w − Σ_i h(w_i)`` with ``h'(w) = w^{-1/α}``, minimised
    by Newton's method with a positivity-preserving backtracking line search on the
    trace-normalised G; the weights are then rescaled to G's scale.

    Scaling (stated by the equation itself): ``J → cJ`` gives ``w → c^{-2α/(1+α)} w`` and
    ``d → c^{(1−α)/(1+α)} d``; the update is scale-invariant for α = 1, not linear under scaling.

    Degenerate inputs: when some non-negative combination of the gradients vanishes (a zero
    gradient, two opposite gradients, gradients that positively span a subspace) the system has
    no positive solution, and no update decreases the losses of the tasks in that combination.
    A ridge on G (tiny private components for every gradient) keeps the weights finite, but its
    update still conflicts with those tasks at cosines of order 1, however small the ridge; as the
    ridge vanishes the update tends to a well-defined limit, which is what is returned: those
    tasks get no decrease (the update is orthogonal to their gradients, their weights only remove
    its component along them and may be zero or negative; a zero gradient gets weight 0), and the
    other tasks share the rest by FairGrad on their gradients projected off the span of those. The
    combinations are found to the rounding of G (``T ε₃₂`` relative, the error of a Gram matrix of
    float32 gradients; below that a float32 G is noise, possibly indefinite): the min-norm point
    of the convex hull of the gradients (MGDA's problem) vanishes to that level. When every task
    is in such a combination (Pareto-stationary gradients) the weights and the update are 0. With
    T = 1 the update is ``||g||^{-2α/(1+α)} g``.

    Args:
        alpha: the fairness parameter α > 0.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = check_positive("alpha", alpha)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.fairgrad_weights(G, self.alpha)
