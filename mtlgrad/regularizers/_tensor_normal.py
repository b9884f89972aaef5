"""The tensor-normal prior on stacked task parameters: its penalty and the maximum-likelihood
update of its covariances."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlgrad.regularizers._stack import stack_task_weights

__all__ = ["tensor_normal_covariances", "tensor_normal_penalty"]


def _stack(weights: Sequence[Tensor], owner: str) -> Tensor:
    """The task tensors stacked on a last, task mode: ``(D_1, ..., D_K, T)``."""
    stack_task_weights(weights, owner=owner)  # checks: non-empty, one shape, one dtype
    return torch.stack(list(weights), dim=-1)


def _mode_product(W: Tensor, M: Tensor, mode: int) -> Tensor:
    """``W ×_mode M``: the matrix ``M`` applied to mode ``mode`` of ``W``."""
    return torch.movedim(torch.tensordot(M, W, dims=([1], [mode])), 0, mode)


def _check_covariances(W: Tensor, covariances: Sequence[Tensor], owner: str) -> list[Tensor]:
    covs = list(covariances)
    if len(covs) != W.dim():
        raise ValueError(
            f"{owner}: expected {W.dim()} covariances (one per mode of the task tensors "
            f"{list(W.shape[:-1])}, then the task covariance), got {len(covs)}"
        )
    for m, (c, size) in enumerate(zip(covs, W.shape, strict=True)):
        if c.shape != (size, size):
            what = "the task covariance" if m == W.dim() - 1 else f"covariance {m}"
            raise ValueError(f"{owner}: {what} must be {size} x {size}, got {list(c.shape)}")
    return covs


def tensor_normal_penalty(weights: Sequence[Tensor], covariances: Sequence[Tensor]) -> Tensor:
    """``vec(W)ᵀ (Σ_1 ⊗ ... ⊗ Σ_K ⊗ Ω)⁻¹ vec(W)``, the negative log-density (up to the
    covariances' log-determinants and a factor 1/2) of the tensor-normal prior
    ``W ~ TN(0, Σ_1, ..., Σ_K, Ω)`` on the task tensors stacked on a last, task mode.

    Long, Cao, Wang & Yu (`Learning multiple tasks with multilinear relationship networks
    <https://arxiv.org/abs/1506.02117>`_, NeurIPS 2017; first version: Long & Wang, "Learning
    multiple tasks with deep relationship networks", 2015) put this prior on each task-specific
    layer: for a linear layer's ``(D_out, D_in)`` weights, ``Σ_1`` and ``Σ_2`` are the output-
    and input-feature covariances and ``Ω`` (T x T) the task covariance. It is the matrix-normal
    prior on the ``(D_1 ... D_K) x T`` unfolding with feature covariance ``Σ_1 ⊗ ... ⊗ Σ_K``.
    Computed as ``<W, W ×_1 Σ_1⁻¹ ... ×_{K+1} Ω⁻¹>`` (mode products, never the Kronecker
    product); the covariances are constants (see :func:`tensor_normal_covariances`).

    Args:
        weights: one tensor per task, all of one shape ``(D_1, ..., D_K)``.
        covariances: ``[Σ_1, ..., Σ_K, Ω]``, symmetric positive definite.
    """
    owner = "tensor_normal_penalty"
    W = _stack(weights, owner)
    covs = _check_covariances(W, covariances, owner)
    A = W
    for mode, c in enumerate(covs):
        precision = torch.cholesky_inverse(torch.linalg.cholesky(c.detach().to(W.dtype)))
        A = _mode_product(A, precision, mode)
    return (W * A).sum()


def tensor_normal_covariances(
    weights: Sequence[Tensor], covariances: Sequence[Tensor], eps: float = 1e-3
) -> list[Tensor]:
    """One sweep of the flip-flop maximum-likelihood updates of the tensor-normal covariances
    (Long et al. 2017, the closed-form step of their alternating optimisation), mode by mode,
    each using the ones already updated::

        Σ_k = W_(k) (⊗_{m != k} Σ_m)⁻¹ W_(k)ᵀ / Π_{m != k} D_m + eps I

    with ``W_(k)`` the mode-k unfolding of the stacked task tensors (detached) and the task
    mode last. ``eps`` keeps every covariance positive definite (an unfolding with fewer columns
    than rows is rank-deficient).

    Args:
        weights: one tensor per task, all of one shape.
        covariances: the current ``[Σ_1, ..., Σ_K, Ω]``.
        eps: the ridge added to each covariance (positive).

    Returns:
        The new covariances, in the same order.
    """
    owner = "tensor_normal_covariances"
    if not eps > 0:
        raise ValueError(f"{owner}: eps must be positive, got {eps!r}")
    W = _stack([w.detach() for w in weights], owner)
    covs = [c.detach().to(W.dtype).clone() for c in _check_covariances(W, covariances, owner)]
    for k in range(W.dim()):
        B = W
        for m, c in enumerate(covs):
            if m != k:
                B = _mode_product(B, torch.cholesky_inverse(torch.linalg.cholesky(c)), m)
        others = [m for m in range(W.dim()) if m != k]
        scatter = torch.tensordot(W, B, dims=(others, others))
        count = W.numel() // W.shape[k]
        new = scatter / count
        new = (new + new.T) / 2 + eps * torch.eye(W.shape[k], dtype=W.dtype, device=W.device)
        covs[k] = new
    return covs
