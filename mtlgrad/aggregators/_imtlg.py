from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class IMTLG(GramAggregator):
    """IMTL-G, the gradient part of impartial multi-task learning (Liu et al., ICLR 2021,
    `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_).

    The update ``g = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` has equal projections on all the unit
    gradients ``u_t = g_t / ||g_t||``. The weights are the paper's closed form, with task 1 as
    reference: ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹`` and ``α_1 = 1 − Σ_{t≥2} α_t``, where
    ``D = [g_1 − g_2, ..., g_1 − g_T]ᵀ`` and ``U = [u_1 − u_2, ..., u_1 − u_T]ᵀ``, all computed from
    the Gram matrix. When ``D Uᵀ`` is singular (duplicated or linearly dependent gradients) its
    pseudo-inverse is used (singular values below 1e-10 of the largest dropped); tasks with a zero
    gradient get weight 0 and the formula runs on the others.

    The weights sum to 1, as in the paper and in TorchJD's ``IMTLG`` (which computes
    ``pinv(G) √diag(G)`` normalised to sum 1: the same weights when ``G`` is invertible; for
    singular ``G`` the two pseudo-inverse generalisations differ). The weights may be negative: the
    update is not always non-conflicting. Linear under scaling; permutation invariant when the
    non-zero gradients are linearly independent; with T = 1 the update is the one gradient.
    """

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.imtlg_weights(G)
