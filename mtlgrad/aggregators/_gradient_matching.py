from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_main_task


class GradientMatching(GramAggregator):
    """Auxiliary-task weights that match the main task's gradient, in the spirit of ARML (Shi et
    al., NeurIPS 2020, `Auxiliary Task Reweighting for Minimum-data Learning
    <https://arxiv.org/abs/2010.08244>`_).

    Task ``main`` is the task that matters; the others are auxiliary. Their weights are the
    non-negative least-squares fit of the main gradient by the auxiliary ones,
    ``a = argmin_{a >= 0} ||g_main − Σ_{k≠main} a_k g_k||²``, solved **exactly** on the Gram
    matrix by the native Lawson-Hanson solver (``min_{a >= 0} ½ aᵀ G_AA a − G_A,mainᵀ a``), which
    tests every auxiliary relative to its own gradient's norm: one 1e-8 of the others is used
    whenever it improves the fit. The weights are 1 for the main task and ``a_k`` for the
    auxiliaries: ``d = g_main + Σ_k a_k g_k``.

    This is the matching objective **at the current parameters**. ARML itself minimises a
    divergence between the main task's likelihood and the weighted auxiliary likelihood over the
    parameter distribution, in practice ``E_θ ||∇L_main − Σ_k α_k ∇L_k||²`` over parameters
    sampled by Langevin dynamics, with α updated by gradient steps every few iterations and
    renormalised to sum to the number of auxiliary tasks. Here there is no sampling, no step size
    and no sum constraint: the weights match the gradients of the current step exactly (an
    auxiliary task whose gradient does not help to reproduce the main one gets weight 0).

    Linear under scaling and permutation invariant (with ``main`` following its task); with T = 1
    the update is the main gradient. Where several ``a`` give the same fit (duplicated or
    dependent auxiliary gradients), one of them is returned; ``d`` is the same.
    """

    def __init__(self, main: int) -> None:
        if not isinstance(main, int) or isinstance(main, bool) or main < 0:
            raise ValueError(f"main must be a non-negative int (a task index), got {main!r}")
        self.main = main

    def _hyperparameters(self) -> dict[str, int]:
        return {"main": self.main}

    def _weights(self, G: Tensor) -> Tensor:
        check_main_task(self.main, G.shape[0], "GradientMatching")
        return torch.ops.mtlgrad.gradient_matching_weights(G, self.main)
