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
