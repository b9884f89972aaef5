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

    The cut is relative, so it also drops gradients that are merely much smaller than the others:
    a gradient ``r`` times shorter than the rest has eigenvalues ~``λ_max / r²`` and falls below
    ``λ_max · T · ε₃₂`` past ``r ≈ (T ε₃₂)^{-1/2}``, i.e. 2048 for T = 2 and 1024 for T = 8 for
    orthogonal gradients. Measured on random unit directions in 64 dimensions with one gradient
    (or all but one) scaled down, 20 draws each: the cut falls at a norm ratio of 1945-2047
    (T = 2), 1400-1662 (T = 3), 1175-1381 (T = 4) and 657-841 (T = 8). Below it, with
    ``scale_mode="min"``, the update has the scale of the smallest gradient (``|d|`` about 1e-3
    of the largest at a ratio of 1000); past it the small gradients' directions are gone and, with
    one large gradient, the update is that gradient (to 1e-4 relative): a jump of three orders of
    magnitude between two nearby ratios.

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
