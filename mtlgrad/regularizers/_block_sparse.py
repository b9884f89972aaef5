"""Block-sparse (l1/lq) regularisation of the d x T task-weight matrix and its proximal operator."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_sparse_norm", "prox_block_sparse"]

PROX_Q = (1.0, 2.0, math.inf)


def _check_matrix(W: Tensor, owner: str) -> None:
    if not isinstance(W, Tensor) or W.dim() != 2:
        shape = list(W.shape) if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(
            f"{owner}: W must be a d x T matrix (rows = features, columns = tasks), got {shape}"
        )
    if not W.dtype.is_floating_point:
        raise TypeError(f"{owner}: W must be floating point, got {W.dtype}")


def _check_q(q: float, owner: str) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or q < 1:
        raise ValueError(f"{owner}: q must be a number >= 1 (or math.inf), got {q!r}")
    return float(q)


def block_sparse_norm(W: Tensor, q: float = 2) -> Tensor:
    """The l1/lq norm ``Σ_i ||W_i||_q`` of a d x T matrix: the sum over rows (features) of each
    row's lq norm across tasks.

    With ``q = 2`` this is the l2,1 norm of Argyriou, Evgeniou & Pontil (`Convex multi-task
    feature learning <https://doi.org/10.1007/s10994-007-5040-8>`_, Machine Learning 2008) and Liu,
    Ji & Ye (`Multi-task feature learning via efficient l2,1-norm minimization
    <https://arxiv.org/abs/1205.2631>`_, UAI 2009); other ``q >= 1`` give the l1/lq family (Liu &
    Ye, ICML 2010; ``q = inf`` is the l1/l∞ norm of Quattoni et al. 2009). Penalising it drives
    whole rows to zero: a feature is used by all tasks or by none. Differentiable (a subgradient
    at zero rows, as autograd gives for norms).

    Args:
        W: the d x T matrix, e.g. from :func:`stack_task_weights`.
        q: the norm inside each row, ``q >= 1`` or ``math.inf``.
    """
    _check_matrix(W, "block_sparse_norm")
    q = _check_q(q, "block_sparse_norm")
    return torch.linalg.vector_norm(W, ord=q, dim=1).sum()


def _project_l1_ball(V: Tensor, radius: float) -> Tensor:
    """The threshold θ_i of the Euclidean projection of each row of V onto the l1 ball of the
    given radius (sort-based, Duchi et al. ICML 2008): the projection is
    ``sign(v) max(|v| - θ, 0)``; θ = 0 for rows already inside the ball."""
    u, _ = V.abs().sort(dim=1, descending=True)
    cumulative = u.cumsum(dim=1)
    j = torch.arange(1, V.shape[1] + 1, device=V.device, dtype=V.dtype)
    # ρ = the largest j with u_j > (Σ_{k<=j} u_k - r) / j; the condition holds on a prefix.
    active = u * j > cumulative - radius
    rho = active.sum(dim=1, keepdim=True).clamp_min(1)
    theta = (cumulative.gather(1, rho - 1) - radius) / rho.to(V.dtype)
    return theta.clamp_min(0).squeeze(1)


def prox_block_sparse(W: Tensor, step: float, q: float = 2) -> Tensor:
    """The proximal operator of ``step * block_sparse_norm(·, q)``:
    ``argmin_P ½||P - W||_F² + step Σ_i ||P_i||_q``, row by row (the norm separates over rows).

    Closed forms (exact, no iteration):

    - ``q = 2`` (group soft-thresholding, the step of Liu, Ji & Ye 2009):
      ``P_i = max(0, 1 - step / ||W_i||_2) W_i``; row i is exactly zero iff
      ``||W_i||_2 <= step``.
    - ``q = inf``: by Moreau's decomposition ``P_i = W_i - Π(W_i)`` with Π the projection onto the
      l1 ball of radius ``step`` (the dual norm's ball), i.e. ``P_i = sign(W_i) min(|W_i|, θ_i)``
      with the projection's threshold θ_i (Duchi et al. 2008); row i is zero iff
      ``||W_i||_1 <= step``.
    - ``q = 1`` (l1/l1 = the entrywise l1 norm): entrywise soft-thresholding; sparse entries, not
      rows.

    Other q need an iterative projection onto the dual lp ball (Liu & Ye 2010) and raise a
    ``ValueError`` rather than being approximated.

    Use it for proximal gradient descent on the stacked heads: after an optimizer step with
    learning rate ``lr``, ``W = prox_block_sparse(W, lr * lam)`` and copy the columns back.

    Args:
        W: the d x T matrix (rows = features, columns = tasks).
        step: the threshold ``step >= 0`` (learning rate times regularisation strength).
        q: 2, ``math.inf`` or 1.

    Returns:
        A new d x T tensor (not differentiable: a prox is applied outside autograd).
    """
    owner = "prox_block_sparse"
    _check_matrix(W, owner)
    q = _check_q(q, owner)
    if q not in PROX_Q:
        raise ValueError(
            f"{owner}: q must be 1, 2 or math.inf (closed-form proximal operators), got {q!r}; "
            "the l1/lq prox for other q needs an iterative projection that is not implemented"
        )
    step = float(step)
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"{owner}: step must be a finite number >= 0, got {step!r}")
    with torch.no_grad():
        bad = (~torch.isfinite(W)).any(dim=1).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"{owner}: W has NaN or Inf in rows {bad[:10].tolist()} (features); the "
                "proximal operator needs finite weights"
            )
        if q == 2.0:
            norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
            keep = norms > step
            scale = torch.where(keep, 1 - step / torch.where(keep, norms, 1), 0)
            return torch.where(keep, W * scale, torch.zeros_like(W))
        if q == 1.0:
            return W.sign() * (W.abs() - step).clamp_min(0)
        theta = _project_l1_ball(W, step).unsqueeze(1)
        inside = W.abs().sum(dim=1, keepdim=True) <= step
        clipped = W.sign() * torch.minimum(W.abs(), theta)
        return torch.where(inside, torch.zeros_like(W), clipped)
