"""Typed Python face of the native float64 solvers on the Gram matrix (``csrc/solvers/``).

Each takes the T x T float64 CPU Gram matrix (plus the method's parameters) and returns float64
task weights. They are torch ops (``torch.ops.mtlgrad.*``) with fake implementations, so they also
trace under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad._extension import load as _load_extension

_load_extension()


def pcgrad_weights(G: Tensor, seed: int) -> Tensor:
    """PCGrad's summed projection coefficients (Yu et al. 2020, Algorithm 1)."""
    return torch.ops.mtlgrad.pcgrad_weights(G, seed)


def upgrad_weights(G: Tensor, reg_eps: float) -> Tensor:
    """UPGrad's mean of the dual-cone projection weights of every task (Quinton & Rey 2024)."""
    return torch.ops.mtlgrad.upgrad_weights(G, reg_eps)


def dualproj_weights(G: Tensor, reg_eps: float) -> Tensor:
    """DualProj's dual-cone projection weights of the mean gradient (Quinton & Rey 2024)."""
    return torch.ops.mtlgrad.dualproj_weights(G, reg_eps)


def mgda_weights(G: Tensor, normalization: str, losses: Tensor | None) -> Tensor:
    """MGDA's min-norm convex weights of the normalised gradients (Sener & Koltun 2018)."""
    return torch.ops.mtlgrad.mgda_weights(G, normalization, losses)


def gradient_matching_weights(G: Tensor, main: int) -> Tensor:
    """1 for the main task, the non-negative least-squares matching weights for the others."""
    return torch.ops.mtlgrad.gradient_matching_weights(G, main)


def nash_mtl_weights(
    G: Tensor, start: Tensor | None, optim_niter: int, max_norm: float
) -> tuple[Tensor, Tensor]:
    """Nash-MTL's ``(alpha, weights)`` (Navon et al. 2022): ``alpha`` solves ``G alpha = 1/alpha``
    by ``optim_niter`` concave-convex iterations started at ``start`` (``optim_niter = 0`` reuses
    ``start``); ``weights`` is ``alpha`` scaled so that ``||Jᵀ w|| <= max_norm`` (when > 0)."""
    if start is None:
        start = G.new_empty((0,), dtype=torch.float64)
    return torch.ops.mtlgrad.nash_mtl_weights(G, start, optim_niter, max_norm)


def rlw_weights(G: Tensor, seed: int) -> Tensor:
    """Random loss weighting (Lin et al. 2022): softmax of T standard normal samples."""
    return torch.ops.mtlgrad.rlw_weights(G, seed)


def imtlg_weights(G: Tensor) -> Tensor:
    """IMTL-G's weights (Liu et al. 2021): equal projections of the update on the unit gradients,
    summing to 1; zero gradients get weight 0."""
    return torch.ops.mtlgrad.imtlg_weights(G)


def cosine_gating_weights(G: Tensor, main: int, weighted: bool) -> Tensor:
    """Du et al. (2018): main weight 1; auxiliary task k weight 1 (or its cosine with the main
    gradient, when ``weighted``) while that cosine is positive, else 0."""
    return torch.ops.mtlgrad.cosine_gating_weights(G, main, weighted)


def hydalearn_weights(G: Tensor, main: int) -> Tensor:
    """HydaLearn (Verboven et al. 2020): weights proportional to the first-order main-task gains
    ``max(G[main, k], 0)``, summing to 1."""
    return torch.ops.mtlgrad.hydalearn_weights(G, main)


def gradvac_weights(G: Tensor, targets: Tensor, beta: float, seed: int) -> tuple[Tensor, Tensor]:
    """GradVac's summed adjustment coefficients and updated EMA targets (Wang et al. 2021,
    Algorithm 1)."""
    return torch.ops.mtlgrad.gradvac_weights(G, targets, beta, seed)


def config_weights(G: Tensor) -> Tensor:
    """ConFIG's weights: the rescaled pseudo-inverse direction of the unit gradients (Liu et al.
    2024, Eq. 2)."""
    return torch.ops.mtlgrad.config_weights(G)


def aligned_mtl_weights(G: Tensor, scale_mode: str) -> Tensor:
    """Aligned-MTL's weights: the balance transformation applied to the vector of ones
    (Senushkin et al. 2023, Algorithm 1)."""
    return torch.ops.mtlgrad.aligned_mtl_weights(G, scale_mode)


def fairgrad_weights(G: Tensor, alpha: float) -> Tensor:
    """FairGrad's weights: the positive solution of G w = w^(-1/alpha) (Ban & Ji 2024,
    Algorithm 1)."""
    return torch.ops.mtlgrad.fairgrad_weights(G, alpha)


def cagrad_weights(G: Tensor, c: float, rescale: int) -> Tensor:
    """CAGrad's weights ``1/T + √φ w / ||g_w||`` (Liu et al. 2021, Algorithm 1), rescaled as the
    official code's ``rescale`` 0, 1 or 2."""
    return torch.ops.mtlgrad.cagrad_weights(G, c, rescale)


# ---- fake implementations ---------------------------------------------------------------------


def _weights_like(G: Tensor) -> Tensor:
    return G.new_empty((G.shape[0],), dtype=torch.float64)


@torch.library.register_fake("mtlgrad::pcgrad_weights")
def _pcgrad_fake(gram: Tensor, seed: int) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::upgrad_weights")
def _upgrad_fake(gram: Tensor, reg_eps: float) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::dualproj_weights")
def _dualproj_fake(gram: Tensor, reg_eps: float) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::mgda_weights")
def _mgda_fake(gram: Tensor, normalization: str, losses: Tensor | None) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::gradient_matching_weights")
def _gradient_matching_fake(gram: Tensor, main: int) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::nash_mtl_weights")
def _nash_mtl_fake(
    gram: Tensor, start: Tensor, optim_niter: int, max_norm: float
) -> tuple[Tensor, Tensor]:
    return _weights_like(gram), _weights_like(gram)


@torch.library.register_fake("mtlgrad::rlw_weights")
def _rlw_fake(gram: Tensor, seed: int) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::imtlg_weights")
def _imtlg_fake(gram: Tensor) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::cosine_gating_weights")
def _cosine_gating_fake(gram: Tensor, main: int, weighted: bool) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::hydalearn_weights")
def _hydalearn_fake(gram: Tensor, main: int) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::gradvac_weights")
def _gradvac_fake(gram: Tensor, targets: Tensor, beta: float, seed: int) -> tuple[Tensor, Tensor]:
    return _weights_like(gram), torch.empty_like(targets)


@torch.library.register_fake("mtlgrad::config_weights")
def _config_fake(gram: Tensor) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::aligned_mtl_weights")
def _aligned_mtl_fake(gram: Tensor, scale_mode: str) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::fairgrad_weights")
def _fairgrad_fake(gram: Tensor, alpha: float) -> Tensor:
    return _weights_like(gram)


@torch.library.register_fake("mtlgrad::cagrad_weights")
def _cagrad_fake(gram: Tensor, c: float, rescale: int) -> Tensor:
    return _weights_like(gram)
