"""Euclidean projection onto the probability simplex, for the methods whose task weights take
projected gradient steps (MoCo, MoDo, SDMGrad)."""

from __future__ import annotations

import torch
from torch import Tensor


def project_onto_simplex(v: Tensor) -> Tensor:
    """``argmin_{w >= 0, Σ w = 1} ||w − v||`` for a float64 vector (the sort-based algorithm of
    Held, Wolfe & Crowder, 1974; Duchi et al., ICML 2008, Fig. 1)."""
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"cannot project a non-finite vector onto the simplex: {v.tolist()}")
    # The projection commutes with adding a constant to every entry; shifting the largest entry
    # to 0 keeps the result on the simplex for entries far larger than 1 (no cancellation).
    v = v - v.max()
    u, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(u, 0) - 1
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    support = int((u - cumulative / k > 0).nonzero().max())  # >= 0: u[0] = 0 > -1
    theta = cumulative[support] / (support + 1)
    return (v - theta).clamp_min(0)
