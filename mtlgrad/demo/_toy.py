"""The two-objective toy problem of CAGrad, as used by Nash-MTL and FAMO.

Liu, Liu, Jin, Stone & Liu, NeurIPS 2021, `Conflict-Averse Gradient Descent for Multi-task
Learning <https://arxiv.org/abs/2110.14048>`_, Sec. 5.1 (the functions of its ``toy.py``); the
five starting points, the scaled first objective and the budget are those of the toy experiment of
Navon et al., ICML 2022, `Multi-Task Learning as a Bargaining Game
<https://arxiv.org/abs/2202.01017>`_, also used by FAMO (Liu et al., NeurIPS 2023).

With ``x = (x1, x2)``, ``t = tanh(x2)`` and ``h = tanh(x2 / 2)``::

    l1 = log max(|t − (x1 + 7)/2|, 5e-6) + 6        q1 = ((x1 − 7)² + (x2 + 8)²/10)/10 − 20
    l2 = log max(|(7 − x1)/2 − t|, 5e-6) + 6        q2 = ((x1 + 7)² + (x2 + 8)²/10)/10 − 20
    L1 = scale · (max(h, 0) · l1 + max(−h, 0) · q1)
    L2 =          max(h, 0) · l2 + max(−h, 0) · q2

For ``x2 > 0`` the objectives are logarithmic valleys; for ``x2 < 0`` quadratic bowls with
minima at ``x1 = 7`` and ``x1 = −7``, so the Pareto set is close to the segment
``x1 ∈ [−7, 7]`` at ``x2 ≈ −8.36``. CAGrad uses ``scale = 1``; Nash-MTL and FAMO use
``scale = 0.1`` (the default here), which makes the objectives unbalanced.

Every starting point of a method is optimised independently; they are stacked so that one
vectorised evaluation and one Adam step serve them all, while the aggregator is called on each
point's own 2 x 2 Jacobian.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mtlgrad.demo._methods import Method

__all__ = [
    "LOWER",
    "PARETO_X2",
    "STARTS",
    "ToyResult",
    "run_toy",
    "toy_jacobian",
    "toy_losses",
]

LOWER = 5e-6
# The five starting points of the Nash-MTL / FAMO toy experiment (the first and third are also
# CAGrad's).
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
# The papers draw the Pareto set as the segment x1 ∈ [-7, 7] at this x2, where both objectives
# are stationary in x2 for x1 = 0 (the exact set bends slightly, to x2 = -8.43 at its ends, the
# minima of L1 and L2 at x1 = 7 and -7).
PARETO_X2 = -8.3552
LEARNING_RATE = 1e-3
DEFAULT_SCALE = 0.1


def _parts(x: np.ndarray):
    x1, x2 = x[..., 0], x[..., 1]
    t = np.tanh(x2)
    h = np.tanh(0.5 * x2)
    a1 = t - 0.5 * (x1 + 7.0)
    a2 = 0.5 * (7.0 - x1) - t
    with np.errstate(divide="ignore"):
        l1 = np.log(np.maximum(np.abs(a1), LOWER)) + 6.0
        l2 = np.log(np.maximum(np.abs(a2), LOWER)) + 6.0
    s = (x2 + 8.0) ** 2 / 10.0
    q1 = ((x1 - 7.0) ** 2 + s) / 10.0 - 20.0
    q2 = ((x1 + 7.0) ** 2 + s) / 10.0 - 20.0
    return x1, x2, t, h, a1, a2, l1, l2, q1, q2


def toy_losses(x: np.ndarray, scale: float = DEFAULT_SCALE) -> np.ndarray:
    """``(L1, L2)`` at points ``x`` of shape ``(..., 2)``; the result has shape ``(..., 2)``."""
    x = np.asarray(x, dtype=np.float64)
    _, _, _, h, _, _, l1, l2, q1, q2 = _parts(x)
    c1, c2 = np.maximum(h, 0.0), np.maximum(-h, 0.0)
    return np.stack([scale * (c1 * l1 + c2 * q1), c1 * l2 + c2 * q2], axis=-1)


def toy_jacobian(x: np.ndarray, scale: float = DEFAULT_SCALE) -> np.ndarray:
    """The Jacobians ``J[..., i, j] = ∂L_i/∂x_j`` at points ``x`` of shape ``(..., 2)``.

    Closed form of the gradients autograd gives for the official code (a clamp passes the
    gradient where its input is at the bound, so at ``x2 = 0`` both gates have slope ½ in
    magnitude; ``|·|`` has slope 0 at 0).
    """
    x = np.asarray(x, dtype=np.float64)
    x1, x2, t, h, a1, a2, l1, l2, q1, q2 = _parts(x)
    c1, c2 = np.maximum(h, 0.0), np.maximum(-h, 0.0)
    dh = 0.5 * (1.0 - h * h)
    dc1 = np.where(h >= 0.0, dh, 0.0)
    dc2 = np.where(-h >= 0.0, -dh, 0.0)
    dt = 1.0 - t * t
    # d log max(|a|, LOWER) / da = sign(a) / |a| = 1 / a where |a| >= LOWER, 0 below.
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = np.where(np.abs(a1) >= LOWER, 1.0 / np.where(a1 == 0, 1.0, a1), 0.0)
        r2 = np.where(np.abs(a2) >= LOWER, 1.0 / np.where(a2 == 0, 1.0, a2), 0.0)
    dq_dx2 = (x2 + 8.0) / 50.0
    J = np.empty(x.shape[:-1] + (2, 2))
    J[..., 0, 0] = scale * (c1 * (-0.5 * r1) + c2 * (x1 - 7.0) / 5.0)
    J[..., 0, 1] = scale * (dc1 * l1 + c1 * dt * r1 + dc2 * q1 + c2 * dq_dx2)
    J[..., 1, 0] = c1 * (-0.5 * r2) + c2 * (x1 + 7.0) / 5.0
    J[..., 1, 1] = dc1 * l2 - c1 * dt * r2 + dc2 * q2 + c2 * dq_dx2
    return J


@dataclass
class ToyResult:
    """One method's trajectories from every starting point.

    Attributes:
        trajectories: ``(S, K, 2)`` points every ``record_every`` steps (the start included).
        final: ``(S, 2)`` final points; ``final_losses``: ``(S, 2)`` objectives there.
        ms_per_step: wall time of one step over all starting points.
    """

    method: Method
    trajectories: np.ndarray
    final: np.ndarray
    final_losses: np.ndarray
    ms_per_step: float


def run_toy(
    methods: Sequence[Method],
    steps: int,
    scale: float = DEFAULT_SCALE,
    starts: Sequence[tuple[float, float]] = STARTS,
    seed: int = 0,
    lr: float = LEARNING_RATE,
    record_every: int = 50,
    on_step: Callable[[], None] | None = None,
) -> list[ToyResult]:
    """Runs Adam (``lr``) from each starting point with each method's update direction.

    Every step, the aggregator of each starting point (its own instance: stateful methods keep
    their state per trajectory) is called on that point's 2 x 2 Jacobian, and its result is the
    gradient Adam sees.
    """
    results = []
    start_points = np.asarray(starts, dtype=np.float64)
    S = start_points.shape[0]
    for method in methods:
        if method.loss_based:
            raise ValueError(
                f"{method.label} is a loss weighting; the toy compares gradient aggregators"
            )
        aggregators = [method.make(seed) for _ in range(S)]
        x = torch.nn.Parameter(torch.from_numpy(start_points.copy()))
        x.grad = torch.zeros_like(x)
        optimizer = torch.optim.Adam([x], lr=lr)
        points = x.detach().numpy()  # shares memory with x
        trajectory = [points.copy()]
        elapsed = 0.0
        for step in range(1, steps + 1):
            begin = time.perf_counter()
            J = torch.from_numpy(toy_jacobian(points, scale))
            for s in range(S):
                x.grad[s] = aggregators[s](J[s])
            optimizer.step()
            elapsed += time.perf_counter() - begin
            if step % record_every == 0 or step == steps:
                trajectory.append(points.copy())
            if on_step is not None:
                on_step()
        final = points.copy()
        results.append(
            ToyResult(
                method=method,
                trajectories=np.stack(trajectory, axis=1),
                final=final,
                final_losses=toy_losses(final, scale),
                ms_per_step=1e3 * elapsed / max(1, steps),
            )
        )
    return results
