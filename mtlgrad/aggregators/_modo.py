from __future__ import annotations

from typing import Any

from torch import Tensor

from mtlgrad.aggregators._base import check_nonnegative, check_positive
from mtlgrad.aggregators._double_sampling import DoubleSamplingAggregator
from mtlgrad.aggregators._simplex import project_onto_simplex


class MoDo(DoubleSamplingAggregator):
    """MoDo, multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen,
    NeurIPS 2023, `Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization
    and Conflict-Avoidance <https://arxiv.org/abs/2305.20057>`_; JMLR 2024; reference code:
    `heshandevaka/Trade-Off-MOL <https://github.com/heshandevaka/Trade-Off-MOL>`_).

    Each step takes the T task losses on **two or three independent sub-batches**, passed as
    ``2 T`` or ``3 T`` losses, sample-major (tasks ``0..T-1`` of sub-batch 1, then the same tasks
    of sub-batch 2, then of sub-batch 3); ``num_tasks`` is T. With ``J_s`` the T x P Jacobian of
    sub-batch s, the task weights ``λ`` (kept between steps, from ``1/T``) take one projected
    gradient step on ``½ ||Jᵀ λ||² + ½ ρ ||λ||²`` with the double-sampled, unbiased estimate
    ``J₁ J₂ᵀ λ`` of its gradient (the paper's Eq. 2.9a):

        ``λ ← Π_Δ(λ − γ (J₁ J₂ᵀ λ + ρ λ))``,

    where ``J₁ J₂ᵀ`` is the cross block of the step's Gram matrix (of the shared parameters'
    gradients, as for every method here) and ``Π_Δ`` the Euclidean projection onto the
    simplex. The update uses the new ``λ`` (Eq. 2.9b): with two sub-batches
    it is ``½ (J₁ + J₂)ᵀ λ`` (weights ``[λ/2, λ/2]``), with three it is ``J₃ᵀ λ`` (weights
    ``[0, 0, λ]``), which keeps the update independent of ``λ``'s step, as the reference code's
    ``three_grads`` option and LibMTL do. This is TorchJD 0.18's ``MoDoWeighting`` applied to
    ``J₁ J₂ᵀ`` (same defaults), with its two documented training loops.

    A training loop splits each batch into sub-batches and passes a dict of losses::

        optimizer = MTLOptimizer(torch.optim.SGD(params, lr=0.1), MoDo(num_tasks=2), trunk_params)
        for x, y in loader:
            losses = {}
            for s, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2)), start=1):
                z = trunk(xs)
                losses[f"a/{s}"] = loss_a(head_a(z), ys)
                losses[f"b/{s}"] = loss_b(head_b(z), ys)  # order: a/1, b/1, a/2, b/2
            optimizer.zero_grad()
            optimizer.backward(losses)
            optimizer.step()

    The order is positional: the dict's first T entries are sub-batch 1. By default each head gets
    its task's gradient summed over the sub-batches, unweighted (mtlgrad's convention for heads);
    ``scale_task_params=True`` gives the heads the weighted update too, as in TorchJD's examples,
    where ``λ`` weights every parameter's gradient.

    ``γ (J₁ J₂ᵀ + ρ I)`` is not scale-free: gradients of norm far from 1 move ``λ`` to a vertex at
    once or not at all (pick ``gamma`` for the gradients' scale). Stateful: ``λ`` is in
    :meth:`state_dict`; :meth:`reset` restarts it from uniform.

    Args:
        num_tasks: T, the number of tasks (each step has ``2 T`` or ``3 T`` losses).
        gamma: ``γ``, the step size of the weights (positive, default 0.1).
        rho: ``ρ``, the weights' ℓ2 regularisation (non-negative, default 0.1).
    """

    def __init__(self, num_tasks: int, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__(num_tasks)
        self.gamma = check_positive("gamma", gamma)
        self.rho = check_nonnegative("rho", rho)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "gamma": self.gamma, "rho": self.rho}

    def _step(self, cross: Tensor, simplex_weights: Tensor) -> tuple[Tensor, Tensor]:
        lam = simplex_weights
        lam = project_onto_simplex(lam - self.gamma * (cross @ lam + self.rho * lam))
        return lam, lam
