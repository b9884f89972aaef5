"""References shared by the UPGrad and DualProj tests: the projection onto the dual cone of the
gradients (Quinton & Rey 2024, Eq. 3) by enumeration of active sets, the non-negative QP of its
weights, and the non-conflicting check that allows for TorchJD's regulariser."""

from __future__ import annotations

import itertools

import torch
from aggregator_checks import least_squares, scale_of

from mtlgrad import ops


def assert_non_conflicting(agg, J: torch.Tensor, rtol: float = 1e-6) -> None:
    """J d >= 0, to rounding. The shared check's tolerance is relative to |d|; when the exact
    answer is d = 0 (e.g. gradients that positively span their plane) the computed d is rounding
    noise, so the tolerance here adds the floor of rounding and of the solver's KKT tolerance,
    relative to |J|² |w|₁. With reg_eps > 0 the projection is TorchJD's regularised one, whose
    KKT conditions (G / trace(G) + reg_eps I) w >= 0 give J d >= -reg_eps trace(G) w."""
    G = ops.gram(list(J.unbind(0)), J.shape[0])
    w = agg.weights(G)
    d = agg(J)
    scale = scale_of(J)
    floor = rtol * scale * float(d.norm()) + 1e-11 * scale**2 * float(w.abs().sum())
    bound = -agg.reg_eps * float(G.trace()) * w - floor
    products = J @ d
    assert (products >= bound).all(), f"{agg}: J d = {products.tolist()}, bound {bound.tolist()}"


def project_onto_dual_cone(J: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """π_J(x) = argmin_{y : J y >= 0} ||y − x||² (Quinton & Rey 2024, Eq. 3), in the primal, by
    enumerating active sets S: y = x + J_Sᵀ μ_S with J_S y = 0 (a least-squares problem in μ_S),
    μ_S >= 0 and J y >= 0. Each constraint's tolerance is relative to its own row's norm, so rows
    whose norms span many orders of magnitude are resolved alike."""
    T = J.shape[0]
    norms = J.norm(dim=1)
    scale = float(x.norm())
    for size in range(T + 1):
        for S in itertools.combinations(range(T), size):
            S = list(S)
            y = x.clone()
            if S:
                mu = least_squares(J[S].T, -x)
                if (mu * norms[S] < -1e-12 * scale).any():
                    continue
                y = x + J[S].T @ mu
            if (J @ y >= -1e-9 * norms * scale).all():
                return y
    raise AssertionError("no active set satisfies the KKT conditions")


def nonneg_qp(Q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin_{v >= 0} ½ vᵀ Q v + cᵀ v for a positive definite Q, by enumerating supports."""
    n = Q.shape[0]
    for size in range(n + 1):
        for S in itertools.combinations(range(n), size):
            S = list(S)
            v = torch.zeros(n, dtype=torch.float64)
            if S:
                v[S] = torch.linalg.solve(Q[S][:, S], -c[S])
            if (v >= 0).all() and (Q @ v + c >= -1e-10 * (1 + c.abs().max())).all():
                return v
    raise AssertionError("no support satisfies the KKT conditions")
