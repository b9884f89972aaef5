from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_nonnegative


class DualProj(GramAggregator):
    """DualProj: the mean gradient projected onto the dual cone of the gradients (Quinton & Rey,
    2024, `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_;
    the projection is that of Lopez-Paz & Ranzato, 2017, `Gradient Episodic Memory for Continual
    Learning <https://arxiv.org/abs/1706.08840>`_, Eq. 11).

    ``d = π_J((1/T) Σ_i g_i)`` with ``π_J(x) = argmin_{y : J y >= 0} ||y − x||²`` (Quinton & Rey,
    Eq. 3). By their Proposition 1, ``π_J(Jᵀu) = Jᵀ(u + v)`` where ``v`` solves the non-negative
    QP ``min_{v >= 0} ½ vᵀ G v + (G u)ᵀ v``, here with ``u = 1/T``; the weights are ``u + v``.

    The QP is solved **exactly** (to rounding) by the native active-set method shared with
    :class:`UPGrad`, with no regulariser and every constraint tested relative to its own
    gradient's norm (gradients whose norms span many decades are resolved alike). ``reg_eps > 0``
    adds ``reg_eps`` to the diagonal of ``G / trace(G)`` before solving, as TorchJD's ``reg_eps``
    (default 1e-4 there). The solution is scale-free (TorchJD zeroes G below ``norm_eps``
    instead).

    Non-conflicting, linear under scaling, permutation invariant; the mean when it conflicts with
    no gradient; with T = 1 the update is the gradient. With ``reg_eps > 0`` only nearly
    non-conflicting: ``J d >= −reg_eps · trace(G) · w``.
    """

    def __init__(self, reg_eps: float = 0.0) -> None:
        self.reg_eps = check_nonnegative("reg_eps", reg_eps)

    def _hyperparameters(self) -> dict[str, float]:
        return {"reg_eps": self.reg_eps}

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.dualproj_weights(G, self.reg_eps)
