from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import check_nonnegative, check_positive, check_positive_int
from mtlgrad.aggregators._double_sampling import DoubleSamplingAggregator
from mtlgrad.aggregators._simplex import project_onto_simplex


class SDMGrad(DoubleSamplingAggregator):
    """SDMGrad, stochastic direction-oriented multiple-gradient descent (Xiao, Ban & Ji,
    NeurIPS 2023, `Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms <https://arxiv.org/abs/2305.18409>`_; reference code: `OptMN-Lab/SDMGrad
    <https://github.com/OptMN-Lab/SDMGrad>`_).

    Each step takes the T task losses on **two or three independent sub-batches** (``ξ``,
    ``ξ'`` and ``ζ`` in the paper), passed as ``2 T`` or ``3 T`` losses, sample-major, as for
    :class:`MoDo`; ``num_tasks`` is T. The weights ``w`` (kept between steps, from ``1/T``)
    minimise ``½ ||Jᵀ (w + λ w̃)||²`` over the simplex, a direction pulled towards the average
    gradient ``g₀ = Jᵀ w̃`` (``w̃ = 1/T``), by ``iterations`` projected stochastic gradient steps
    with momentum (Algorithm 1, with the reference code's SGD momentum), using the
    double-sampled estimate ``A = J_ξ J_ξ'ᵀ`` (the cross block of the step's Gram matrix)
    normalised as in the reference code and TorchJD:

        ``Â = A / s²``,  ``s`` = the mean of ``√max(A_ii, 0)``,
        ``u ← μ u + Â (w + λ w̃)``,  ``w ← Π_Δ(w − lr u)``  (``u`` from 0 at every step).

    The update is ``d = Jᵀ (w + λ w̃) / (1 + λ)`` on the third sub-batch (weights
    ``[0, 0, v]``, ``v = (w + λ w̃) / (1 + λ)``), or on the mean of the two with two sub-batches
    (weights ``[v/2, v/2]``). ``λ = 0`` is stochastic MGDA; a large ``λ`` tends to the average
    gradient.

    This is TorchJD 0.18's ``SDMGradWeighting`` applied to ``A`` (same defaults: ``lr=10``,
    ``momentum=0.5``, 20 iterations, ``λ = 0.3`` as in the paper's experiments) with one
    difference: TorchJD divides by ``s² + 1e-8`` (the reference code adds 1e-4 to each diagonal
    entry), which makes the weights depend on the gradients' scale when they are small; here the
    division is by ``s²`` exactly, so the weights are invariant to scaling the gradients. When no
    diagonal entry of ``A`` is positive (``s = 0``), ``A`` is divided by its largest absolute
    entry instead (``A = 0``: the weights stay). The preference is the average gradient only.

    The training loop is :class:`MoDo`'s (a dict of the sub-batches' losses, sample-major).
    Stateful: ``w`` is in :meth:`state_dict`; :meth:`reset` restarts it from uniform.

    Args:
        num_tasks: T, the number of tasks (each step has ``2 T`` or ``3 T`` losses).
        lambda_: ``λ``, the pull towards the average gradient (non-negative, default 0.3).
        lr: the step size of the inner solve (positive, default 10).
        momentum: its momentum, in [0, 1) (default 0.5).
        iterations: its number of steps per training step (positive, default 20).
    """

    def __init__(
        self,
        num_tasks: int,
        lambda_: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        iterations: int = 20,
    ) -> None:
        super().__init__(num_tasks)
        self.lambda_ = check_nonnegative("lambda_", lambda_)
        self.lr = check_positive("lr", lr)
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.iterations = check_positive_int("iterations", iterations)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "num_tasks": self.num_tasks,
            "lambda_": self.lambda_,
            "lr": self.lr,
            "momentum": self.momentum,
            "iterations": self.iterations,
        }

    def _step(self, cross: Tensor, simplex_weights: Tensor) -> tuple[Tensor, Tensor]:
        T = self.num_tasks
        preference = torch.full((T,), 1.0 / T, dtype=torch.float64)
        s = cross.diagonal().clamp_min(0).sqrt().mean()
        if s > 0:
            normalised = cross / s**2
        else:
            largest = cross.abs().max()
            normalised = cross / largest if largest > 0 else cross
        w = simplex_weights
        velocity = torch.zeros_like(w)
        for _ in range(self.iterations):
            velocity = self.momentum * velocity + normalised @ (w + self.lambda_ * preference)
            w = project_onto_simplex(w - self.lr * velocity)
        return w, (w + self.lambda_ * preference) / (1 + self.lambda_)
