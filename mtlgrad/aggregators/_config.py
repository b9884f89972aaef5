from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class ConFIG(GramAggregator):
    """ConFIG, conflict-free inverse gradients (Liu, Chu, Thuerey, arXiv 2024, `ConFIG: Towards
    Conflict-free Training of Physics Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_).

    Eq. (2) of the paper: with the unit gradients ``u_i = g_i / ||g_i||`` (rows of U), the
    direction ``x = U⁺ 1`` has the same positive projection ``u_iᵀ x = 1`` on every unit gradient
    (when they are linearly independent), and the update is ``(Σ_i g_iᵀ x̂) x̂`` with
    ``x̂ = x / ||x||``: the direction of x, with the length of the sum of the gradients'
    projections on it.

    In Gram form ``x = Uᵀ (U Uᵀ)⁺ 1``, where ``U Uᵀ`` is the matrix of cosines, so the native
    solver needs only G: one symmetric eigen-decomposition of the cosine matrix C for its
    pseudo-inverse (eigenvalues below 1e-10 of the largest count as zero, i.e. singular values of U
    below ~1e-5 of the largest), then ``w = c (1ᵀ G c) / (cᵀ G c)`` with
    ``c_i = (C⁺ 1)_i / ||g_i||``.

    Conventions: equal task weights (the vector of ones, the default of the official code and of
    TorchJD); the pseudo-inverse gives the minimum-norm least-squares solution, which the official
    code's default ``lstsq`` also returns for linearly independent gradients. A zero gradient has a
    zero unit vector (as in the official code) and so no influence on the direction. When ``x``
    vanishes (e.g. two opposite gradients) or G = 0 the update is zero.

    Non-conflicting when the non-zero gradients are linearly independent (then
    ``g_iᵀ d ∝ ||g_i|| > 0``); permutation invariant; linear under scaling. With T = 1 the update
    is the one gradient.
    """

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.config_weights(G)
