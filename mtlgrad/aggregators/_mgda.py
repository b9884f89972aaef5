from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_choice

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GramAggregator):
    """MGDA, the multiple-gradient descent algorithm as used by Sener & Koltun (NeurIPS 2018,
    `Multi-Task Learning as Multi-Objective Optimization <https://arxiv.org/abs/1810.04650>`_).

    The update is the minimum-norm point of the convex hull of the task gradients: weights
    ``w = argmin_{w >= 0, Σ w = 1} ||Σ_t w_t ĝ_t||²`` (the paper's Eq. 3, which its Algorithm 2
    approximates by Frank-Wolfe). Here it is solved **exactly** (to rounding) by a finite
    active-set method: by least-distance programming (Lawson & Hanson, 1974, ch. 23) the
    simplex problem is the non-negative least-squares problem ``min_{y >= 0} ||Jᵀy||² + (Σ y − 1)²``
    with ``w = y / Σ y``, solved on the Gram matrix by the same native Lawson-Hanson solver as
    :class:`UPGrad`; also exact when the min-norm point is 0 (Pareto-stationary gradients). The
    problem is posed in units of the smallest squared gradient norm (the min-norm point is no
    longer than the shortest gradient), so it is resolved whatever the spread of the norms.

    ``normalization`` is the official code's ``gradient_normalizers`` (an option the paper does
    not discuss): ``ĝ_t = g_t / n_t`` with ``n_t`` = 1 (``"none"``), ``||g_t||`` (``"l2"``), the
    task loss (``"loss"``) or loss × ``||g_t||`` (``"loss+"``). As in the official code, the
    problem is solved on the normalised gradients and the solution scales the **original**
    losses: ``d = Σ_t w_t g_t`` (not ``Σ_t w_t ĝ_t``). A zero gradient stays zero under ``"l2"``
    (the official code divides 0 by 0). The loss-based choices need the task losses
    (``aggregate(..., losses=...)`` or ``weights(G, losses)``), which must be positive.

    Linear under scaling and permutation invariant; non-conflicting for ``normalization="none"``
    (``g_i · d >= ||d||²`` for every task), not in general after normalisation (``d`` then
    combines the original gradients). The weights sum to 1; with T = 1 the update is the
    gradient. Where the min-norm point has several weight vectors (duplicated or dependent
    gradients), one of them is returned.
    """

    def __init__(self, normalization: str = "none") -> None:
        self.normalization = check_choice("normalization", normalization, _NORMALIZATIONS)

    def _hyperparameters(self) -> dict[str, str]:
        return {"normalization": self.normalization}

    def _weights(self, G: Tensor) -> Tensor:
        if self.normalization in ("loss", "loss+"):
            raise ValueError(
                f"MGDA(normalization={self.normalization!r}) needs the task losses: pass "
                f"losses=... to aggregate() or weights()"
            )
        return torch.ops.mtlgrad.mgda_weights(G, self.normalization, None)

    def _weights_given_losses(self, G: Tensor, losses: Tensor) -> Tensor:
        if self.normalization not in ("loss", "loss+"):
            return self._weights(G)
        return torch.ops.mtlgrad.mgda_weights(G, self.normalization, losses)
