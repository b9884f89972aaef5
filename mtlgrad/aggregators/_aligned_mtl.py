from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_choice

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(GramAggregator):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, CVPR 2023, `Independent Component
    Alignment for Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_).

    Algorithm 1 of the paper: with the eigen-decomposition ``G = V Λ Vᵀ`` of the Gram matrix, the
    balance transformation ``B = √σ V Λ^{-1/2} Vᵀ`` makes the aligned gradients (the columns of
    ``Jᵀ B``) orthogonal and of equal norm ``√σ``, i.e. the linear system of the gradients
    perfectly conditioned; the update is their sum, ``d = Jᵀ B 1``.

    ``scale_mode`` chooses σ as in the official code: ``"min"`` the smallest (non-zero) eigenvalue
    (the paper's choice), ``"median"`` the median eigenvalue (torch.median's convention: the lower
    of the two middle values), ``"rmse"`` the mean eigenvalue.

    Conventions (those of the official code): the aligned gradients are summed (task weights of
    one; TorchJD averages them, so its update is ours divided by T); a rank-deficient G is handled
    by keeping only the eigenvalues above ``λ_max · T · ε₃₂`` (ε₃₂ the float32 machine epsilon,
    what the official code's ``torch.finfo()`` gives): the aligned gradients then span the
    gradients' subspace. That threshold also matters here because a Gram matrix of float32 or
    16-bit gradients is accumulated in float32 within chunks, and smaller eigenvalues are noise.
    For G = 0 the update is zero.

    The eigen-decomposition is native (Jacobi, float64, on the trace-normalised G). Linear under
    scaling, permutation invariant; not non-conflicting in general. With T = 1 the update is the
    one gradient.

    Args:
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
    """

    def __init__(self, scale_mode: str = "min") -> None:
        self.scale_mode = check_choice("scale_mode", scale_mode, SCALE_MODES)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"scale_mode": self.scale_mode}

    def _weights(self, G: Tensor) -> Tensor:
        return torch.ops.mtlgrad.aligned_mtl_weights(G, self.scale_mode)
