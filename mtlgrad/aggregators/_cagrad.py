from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_nonnegative


class CAGrad(GramAggregator):
    """CAGrad, conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021,
    `Conflict-Averse Gradient Descent for Multi-task Learning <https://arxiv.org/abs/2110.14048>`_).

    Algorithm 1 of the paper: the update maximises the worst task's first-order decrease within a
    ball around the mean gradient ``g0``,
    ``max_d min_i g_iᵀ d  s.t.  ||d − g0|| ≤ √φ``,  ``√φ = c ||g0||``;
    through its dual, ``min_{w ∈ Δ} g_wᵀ g0 + √φ ||g_w||``, it is
    ``d = g0 + (√φ / ||g_w||) g_w``. ``c = 0`` gives the mean gradient; larger c moves towards
    the worst-case (MGDA-like) direction.

    The native solver is exact rather than iterative: for a level t, the update closest to
    ``g0`` that gives every task at least t is a small QP (Goldfarb–Idnani dual active set, on G),
    its multipliers are linear in t between changes of the active set, and the level where the
    distance to ``g0`` reaches ``√φ`` is found by solving that quadratic per active set; the
    result satisfies the optimality conditions to rounding level (zero duality gap), where the
    official code stops SLSQP at its default tolerance. Every candidate is verified afresh; for
    nearly dependent gradients, where that verification can fail, the best verified lower level is
    returned (a feasible update, not quite optimal), or at worst the mean gradient.

    Conventions:

    - ``rescale`` as in the official code: 0 returns ``d`` (the paper's Algorithm 1, and
      TorchJD), 1 (default, the official code's) divides it by ``1 + c²``, 2 by ``1 + c``.
    - Where the paper's formula is undefined (``g_w = 0``: the gradients have 0 in their convex
      hull and the best worst-case decrease is 0), the maximiser closest to ``g0`` is returned
      (the paper's primal problem has many maximisers there; the official code divides by
      ``||g_w|| + 1e-8``, TorchJD returns 0).
    - A mean gradient that vanishes (up to rounding) gives the ball a zero radius: d = g0.

    Linear under scaling, permutation invariant. With T = 1 the update is ``(1 + c) g`` before
    rescaling.

    Args:
        c: radius of the ball, relative to ``||g0||``; ``c >= 0`` (default 0.5, as in the official
            code).
        rescale: 0, 1 (default) or 2, see above.
    """

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        self.c = check_nonnegative("c", c)
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.cagrad_weights(G, self.c, self.rescale)
