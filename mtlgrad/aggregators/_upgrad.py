from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_nonnegative


class UPGrad(GramAggregator):
    """UPGrad, "unconflicting projection of gradients" (Quinton & Rey, 2024,
    `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_).

    The mean of the projections of every task gradient onto the dual cone of the gradients,
    ``d = (1/T) Σ_i π_J(g_i)`` with ``π_J(x) = argmin_{y : J y >= 0} ||y − x||²`` (the paper's
    Eq. 3 and its definition of UPGrad; equal preference ``1/T``, TorchJD's default). By the
    paper's Proposition 1, ``π_J(Jᵀu) = Jᵀ(u + v)`` where ``v`` solves the non-negative QP
    ``min_{v >= 0} ½ vᵀ G v + (G u)ᵀ v``; the weights are ``(1/T) Σ_i (e_i + v_i)``.

    Each QP is solved **exactly** (to rounding) by a native active-set method (Lawson-Hanson,
    warm-started from the conflicting tasks), with no regulariser: rank-deficient and duplicated
    gradients are handled by keeping the free set's columns independent. Every task's constraint is
    tested relative to its own gradient's norm, so a gradient 1e-8 of the largest is kept from
    conflicting like any other.
    ``reg_eps > 0`` adds ``reg_eps`` to the diagonal of ``G / trace(G)`` before solving, exactly
    as TorchJD's ``reg_eps`` (TorchJD's default is 1e-4); it slightly shrinks the projections
    towards the plain mean. TorchJD also zeroes G when its trace is below ``norm_eps``; here the
    solution is scale-free instead, so gradients scaled by 1e-15 give the same direction.

    Non-conflicting (``J d >= 0``), linear under scaling, permutation invariant; equal to the mean
    when no two gradients conflict; with T = 1 the update is the gradient. With ``reg_eps > 0``
    the projections are TorchJD's regularised ones and only nearly non-conflicting:
    ``J d >= −reg_eps · trace(G) · w`` (far from 0 when G is singular and the weights large).
    """

    def __init__(self, reg_eps: float = 0.0) -> None:
        self.reg_eps = check_nonnegative("reg_eps", reg_eps)

    def _hyperparameters(self) -> dict[str, float]:
        return {"reg_eps": self.reg_eps}

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.upgrad_weights(G, self.reg_eps)
