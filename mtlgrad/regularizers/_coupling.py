"""Soft-sharing couplings between corresponding parameters of the task networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlgrad.regularizers._stack import stack_task_weights

__all__ = ["l2_coupling", "trace_norm"]


def l2_coupling(weights: Sequence[Tensor]) -> Tensor:
    """Sum over task pairs of the squared Frobenius distances between corresponding parameters:
    ``Σ_{s<t} ||W_s - W_t||_F²``.

    Duong, Cohn, Bird & Cook (`Low resource dependency parsing: cross-lingual parameter sharing in
    a neural network parser <https://aclanthology.org/P15-2139/>`_, ACL 2015) couple the two
    tasks' networks with ``λ ||W_1 - W_2||_F²``; for T > 2 tasks every pair is coupled, which
    equals ``T Σ_t ||W_t - W̄||_F²`` (W̄ the mean over tasks) — the form computed here, without
    the cancellation of ``T Σ||W_t||² - ||Σ W_t||²``. With two tasks it is the paper's term.

    Args:
        weights: one tensor per task, all of one shape (e.g. the ``weight`` of layer 1 of every
            task's network).
    """
    W = stack_task_weights(weights, owner="l2_coupling")
    T = W.shape[1]
    centred = W - W.mean(dim=1, keepdim=True)
    return T * centred.pow(2).sum()


def trace_norm(weights: Sequence[Tensor]) -> Tensor:
    """Trace (nuclear) norm of the stacked task parameters: ``||W||_*`` with ``W`` the d x T
    matrix whose column t is task t's tensor flattened (:func:`stack_task_weights`).

    Yang & Hospedales (`Trace norm regularised deep multi-task learning
    <https://arxiv.org/abs/1606.04038>`_, ICLR 2017 workshop) stack corresponding layers of the T
    task networks into a tensor with the task as last axis and penalise a tensor trace norm; this
    is their "last axis flattening" (LAF) unfolding: the tensor is flattened into a matrix with one
    column per task (the nuclear norm of a matrix and of its transpose are equal, so the d x T and
    T x d unfoldings agree). Low rank across tasks means the task networks share a few directions.
    The gradient is the autograd one of the SVD's singular values (``U Vᵀ`` where the matrix has
    full rank; a subgradient otherwise).

    Args:
        weights: one tensor per task, all of one shape.
    """
    W = stack_task_weights(weights, owner="trace_norm")
    return torch.linalg.svdvals(W).sum()
