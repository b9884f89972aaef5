from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_permutation_invariant,
    matrices,
    matrix_families,
    matrix_ids,
)

from mtlgrad.aggregators import CAGrad


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [0.5, 2.0])
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor, c: float) -> None:
    agg = CAGrad(c)
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: CAGrad(c), J)


def assert_optimal(J: torch.Tensor, c: float, rtol: float = 1e-10) -> None:
    """The update (rescale=0) solves max_d min_i g_iᵀ d s.t. ||d − g0|| ≤ c ||g0||.

    On the ball's boundary this is certified by a zero duality gap with the dual point
    w ∝ (weights − 1/T) of the paper's inner problem. Inside the ball, the optimum must be the
    degenerate one (0 in the convex hull, best worst-case decrease 0; see
    test_zero_in_the_convex_hull): then min_i g_iᵀ d = 0.
    """
    T = J.shape[0]
    w = CAGrad(c, rescale=0).weights(J @ J.T)
    g0, d = J.mean(0), J.T @ w
    radius = float(c * g0.norm())
    scale = float((g0.norm() + radius) * J.norm(dim=1).max())
    distance, primal = float((d - g0).norm()), float((J @ d).min())
    assert distance <= radius * (1 + 1e-10)
    if distance < radius * (1 - 1e-9):
        assert abs(primal) <= rtol * scale
        return
    multipliers = w - 1 / T
    assert float(multipliers.min()) >= -1e-10 * float(multipliers.abs().max())
    dual_w = multipliers / multipliers.sum()
    g_w = J.T @ dual_w
    dual = float(g_w @ g0 + radius * g_w.norm())  # the paper's inner objective
    assert abs(dual - primal) <= rtol * scale, f"duality gap {dual - primal}"


@pytest.mark.parametrize("c", [0.01, 0.2, 0.5, 0.9, 1.0, 1.5, 4.0])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 16])
def test_optimal_by_duality(T: int, c: float) -> None:
    for seed in range(3):
        J = randn(T, 40, seed=seed) + 0.5 * randn(1, 40, seed=100 + seed)  # 0 not in the hull
        J = J * (
            0.1
            + torch.rand(T, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        )
        assert_optimal(J, c)


def reference_dual_weights(G: torch.Tensor, c: float, iterations: int = 20000) -> torch.Tensor:
    """The paper's inner problem min_{w ∈ Δ} wᵀ G 1/T + c ||g0|| sqrt(wᵀ G w), by accelerated
    projected gradient with backtracking (plain torch, float64)."""
    T = G.shape[0]
    b = torch.full((T,), 1.0 / T, dtype=G.dtype)
    radius = c * (b @ G @ b).sqrt()

    def objective(w: torch.Tensor) -> torch.Tensor:
        return w @ G @ b + radius * (w @ G @ w).clamp_min(0).sqrt()

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return G @ b + radius * (G @ w) / (w @ G @ w).sqrt()

    w = b.clone()
    y, step, momentum = w.clone(), 1.0 / float(torch.linalg.eigvalsh(G).max()), 1.0
    for _ in range(iterations):
        g = gradient(y)
        while True:
            candidate = project_simplex(y - step * g)
            difference = candidate - y
            bound = objective(y) + g @ difference + difference @ difference / (2 * step)
            if objective(candidate) <= bound + 1e-15 * abs(float(bound)):
                break
            step /= 2
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        y = candidate + (momentum - 1) / next_momentum * (candidate - w)
        if objective(y) > objective(candidate):  # adaptive restart
            y, next_momentum = candidate.clone(), 1.0
        w, momentum = candidate, next_momentum
    return w


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    u, _ = torch.sort(v, descending=True)
    cumulative = u.cumsum(0) - 1
    index = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int((u - cumulative / index > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp_min(0)


@pytest.mark.parametrize("c", [0.3, 0.8, 2.0])
@pytest.mark.parametrize("T", [2, 3, 5])
def test_matches_the_paper_dual(T: int, c: float) -> None:
    # d = g0 + (√φ / ||g_w||) g_w with w from an independent solver of Algorithm 1's inner problem.
    J = randn(T, 30, seed=T) + randn(1, 30, seed=50)
    G = J @ J.T
    w = reference_dual_weights(G, c, iterations=3000)
    g0, g_w = J.mean(0), J.T @ w
    expected = g0 + c * g0.norm() / g_w.norm() * g_w
    d = CAGrad(c, rescale=0)(J)
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6 * float(expected.norm()))


def test_rescale_and_special_cases() -> None:
    J = randn(4, 30, seed=1)
    base = CAGrad(0.7, rescale=0).weights(J @ J.T)
    for rescale, factor in [(1, 1 / (1 + 0.7**2)), (2, 1 / 1.7)]:
        torch.testing.assert_close(CAGrad(0.7, rescale).weights(J @ J.T), factor * base)
    # c = 0: the mean gradient, whatever the rescaling.
    for rescale in (0, 1, 2):
        torch.testing.assert_close(CAGrad(0.0, rescale)(J), J.mean(0))
    # One task: (1 + c) g before rescaling.
    g = J[:1]
    torch.testing.assert_close(CAGrad(0.7, rescale=0)(g), 1.7 * g[0])
    torch.testing.assert_close(CAGrad(0.7)(g), 1.7 / (1 + 0.49) * g[0])
    # Two opposite gradients: g0 = 0, the ball is a point.
    opposite = torch.stack([J[0], -J[0]])
    torch.testing.assert_close(
        CAGrad(2.0).weights(opposite @ opposite.T), torch.full((2,), 0.1, dtype=torch.float64)
    )
    assert CAGrad(2.0)(opposite).norm() <= 1e-15 * J[0].norm()


def reference_projection_on_cone(J: torch.Tensor, iterations: int = 20000) -> torch.Tensor:
    """The point of {d : J d >= 0} closest to g0: min_{λ >= 0} ½ ||g0 + Jᵀ λ||², d = g0 + Jᵀ λ,
    by projected gradient (plain torch)."""
    G, g0 = J @ J.T, J.mean(0)
    lam = torch.zeros(J.shape[0], dtype=J.dtype)
    step = 1 / float(torch.linalg.eigvalsh(G).max())
    for _ in range(iterations):
        lam = (lam - step * (J @ (g0 + J.T @ lam))).clamp_min(0)
    return g0 + J.T @ lam


@pytest.mark.parametrize("c", [1.0, 3.0])
def test_zero_in_the_convex_hull(c: float) -> None:
    # With 0 in the convex hull of the gradients (here a zero and two opposite gradients) and
    # c >= 1, the best worst-case decrease is 0, reached by many updates: the paper's formula is
    # 0/0. We return the maximiser closest to g0, the projection of g0 on {d : J d >= 0}.
    for J in (
        torch.cat([randn(3, 20, seed=3), torch.zeros(1, 20, dtype=torch.float64)]),
        torch.cat([randn(1, 20, seed=4), -randn(1, 20, seed=4), randn(2, 20, seed=5)]),
    ):
        d = CAGrad(c, rescale=0)(J)
        g0 = J.mean(0)
        assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-12)
        assert float((J @ d).min()) >= -1e-12 * float(J.norm() * d.norm())
        expected = reference_projection_on_cone(J)
        torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6 * float(g0.norm()))


@pytest.mark.parametrize("c", [0.5, 2.0])
@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "conflicting"])
def test_many_tasks(name: str, c: float) -> None:
    J = matrix_families(64)[name]
    agg = CAGrad(c)
    assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_optimal(J, c, rtol=1e-9)


def test_more_tasks_than_dimensions() -> None:
    for seed in range(5):
        J = randn(24, 6, seed=seed)  # 0 is (very likely) in the convex hull
        for c in (0.3, 1.0, 2.5):
            assert_optimal(J, c, rtol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_ill_conditioned_inputs(seed: int) -> None:
    # Norms over 12 orders of magnitude, nearly opposite pairs (to 1e-9), and more tasks than
    # dimensions with c = 1 (d(0) on the ball's boundary): still optimal to 1e-8 of the scale.
    gen = torch.Generator().manual_seed(seed)
    T, P = 6 + 3 * seed, 4 + 2 * seed
    J = torch.randn(T, P, dtype=torch.float64, generator=gen)
    scaled = J * torch.logspace(-6, 6, T, dtype=torch.float64).unsqueeze(1)
    opposite = J.clone()
    noise = torch.randn(T // 2, P, dtype=torch.float64, generator=gen)
    opposite[: T // 2] = -0.7 * J[T - T // 2 :] + 1e-9 * noise
    for M in (scaled, opposite, torch.randn(2 * P, P, dtype=torch.float64, generator=gen)):
        for c in (0.3, 1.0, 5.0):
            assert_optimal(M, c, rtol=1e-8)


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_matches_torchjd(J: torch.Tensor) -> None:
    # TorchJD's CAGrad solves the same dual with cvxpy (not a dependency here: skipped unless
    # installed). It does not rescale (rescale=0), and returns 0 where ||g_w|| < 1e-4 (see the
    # class docstring for our convention there), so only the non-degenerate cases compare.
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("cvxpy")
    expected = torchjd.aggregation.CAGrad(c=0.5)(J)
    if expected.abs().max() == 0:
        pytest.skip("degenerate case: conventions differ")
    scale = float(J.norm(dim=1).max())
    torch.testing.assert_close(CAGrad(0.5, rescale=0)(J), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"c": -1}, "c must be a non-negative number, got -1"),
        ({"c": float("nan")}, "c must be a non-negative number"),
        ({"c": "1"}, "c must be a non-negative number"),
        ({"rescale": 3}, "rescale must be 0, 1 or 2, got 3"),
        ({"rescale": True}, "rescale must be 0, 1 or 2, got True"),
        ({"rescale": 1.5}, "rescale must be 0, 1 or 2, got 1.5"),
    ],
)
def test_constructor_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CAGrad(**kwargs)


def test_opcheck() -> None:
    J = randn(4, 20)
    torch.library.opcheck(torch.ops.mtlgrad.cagrad_weights.default, (J @ J.T, 0.5, 1))


def test_repr() -> None:
    assert repr(CAGrad()) == "CAGrad(c=0.5, rescale=1)"
    assert repr(CAGrad(2, rescale=0)) == "CAGrad(c=2.0, rescale=0)"


def test_256_tasks() -> None:
    assert_optimal(randn(256, 300, seed=256), 0.5, rtol=1e-9)
