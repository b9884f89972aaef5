from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class IMTLG(GramAggregator):
    """IMTL-G, the gradient part of impartial multi-task learning (Liu et al., ICLR 2021,
    `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_).

    The update ``g = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` has equal projections on all the unit
    gradients ``u_t = g_t / ||g_t||``. The paper's closed form takes task 1 as reference:
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹`` and ``α_1 = 1 − Σ_{t≥2} α_t``, where
    ``D = [g_1 − g_2, ..., g_1 − g_T]ᵀ`` and ``U = [u_1 − u_2, ..., u_1 − u_T]ᵀ``. Here the same
    conditions are solved from the Gram matrix as a system that treats all tasks alike, in the
    contributions ``β_t = α_t ||g_t||``: ``C β = λ 1`` and ``Σ_t β_t / ||g_t|| = 1``, with ``C``
    the cosine matrix. Its solution is the paper's whenever ``D Uᵀ`` is invertible. Tasks with a
    zero gradient get weight 0 and the formula runs on the others.

    Dependent gradients:

    - In general position (more tasks than the dimension of their span, no two parallel, e.g.
      three gradients in a plane) the only update with equal projections is **0**, and that is
      what IMTL-G returns, **even when no two gradients conflict**. It is the paper's formula
      where that is defined (three gradients in a plane: ``D Uᵀ`` is invertible and the weights
      combine the gradients to 0); with more tasks ``D Uᵀ`` is singular and the paper says
      nothing.
    - When the conditions leave several updates (parallel gradients: with ``g`` and ``3g`` every
      α has equal projections), the weights are ``λ = 1`` and the minimum-norm ``β = C⁺ 1``,
      normalised to sum 1: TorchJD's ``pinv(G) √diag(G)``, and for two parallel gradients the
      limit of nearly parallel ones, ``α ∝ 1 / ||g_t||``.
    - Singular values of the system below ``(T + 1) ε₃₂`` count as zero: that is the rounding of
      a Gram matrix of float32 gradients, so gradients parallel to that precision are treated as
      parallel, and the result does not depend on the order of the tasks (a pseudo-inverse of
      ``D Uᵀ`` with a cut relative to its own largest singular value inverts that rounding).

    The weights sum to 1, as in the paper and in TorchJD's ``IMTLG`` (the same weights when ``G``
    is invertible or the gradients are parallel; where only 0 has equal projections, TorchJD
    returns a least-squares compromise instead). The weights may be negative: the update is not
    always non-conflicting. Linear under scaling, permutation invariant; with T = 1 the update is
    the one gradient.
    """

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.imtlg_weights(G)
