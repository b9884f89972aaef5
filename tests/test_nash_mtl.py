from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_matrix_call_is_weighted_sum,
    assert_non_conflicting,
    assert_permutation_invariant,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import NashMTL


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_fixed_point(G: torch.Tensor) -> torch.Tensor:
    """The paper's α: α_i (Gα)_i = 1 with α > 0 (GᵀG α = 1/α in the paper's notation), by
    Newton's method on x = log α with a backtracking line search on the residual."""
    x = -0.5 * G.diagonal().log()

    def residual(x: torch.Tensor) -> torch.Tensor:
        a = x.exp()
        return a * (G @ a) - 1

    for _ in range(200):
        F = residual(x)
        if F.abs().max() < 1e-14:
            break
        a = x.exp()
        jacobian = torch.diag((G @ a) * a) + a[:, None] * G * a[None, :]
        step = torch.linalg.solve(jacobian, F)
        t = 1.0
        while residual(x - t * step).norm() > (1 - 0.5 * t) * F.norm() and t > 1e-12:
            t /= 2
        x = x - t * step
    return x.exp()


def reference_ccp_step(G: torch.Tensor, at: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """One concave-convex iteration of the paper / official code, linearised at `at`:
    min_α Σ_i β_i(α) + ∇φ(at)ᵀα  s.t.  log α_i + log β_i(α) >= 0, β = Gα, solved by a plain
    log-barrier method (Newton with backtracking) from the strictly feasible `start`."""
    c = G.sum(0) + 1 / at + G @ (1 / (G @ at))

    def barrier(a: torch.Tensor, t: float) -> float:
        b = G @ a
        if (a <= 0).any() or (b <= 0).any():
            return float("inf")
        s = a.log() + b.log()
        if (s <= 0).any():
            return float("inf")
        return t * float(c @ a) - float(s.log().sum())

    a, t = start.clone(), 1.0
    while G.shape[0] / t > 1e-12:
        for _ in range(100):
            b = G @ a
            s = a.log() + b.log()
            rows = torch.diag(1 / a) + G / b[:, None]  # row i: ∇ s_i
            grad = t * c - (rows / s[:, None]).sum(0)
            hessian = (
                (rows.T / s**2) @ rows + torch.diag(1 / (a**2 * s)) + (G.T * (1 / (b**2 * s))) @ G
            )
            step = torch.linalg.solve(hessian, grad)
            decrement2 = float(grad @ step)
            if decrement2 < 1e-20:
                break
            u, f0 = 1.0, barrier(a, t)
            while barrier(a - u * step, t) > f0 - 0.25 * u * decrement2 and u > 1e-12:
                u /= 2
            a = a - u * step
        t *= 10
    return a


# ---- properties on the shared matrix families ---------------------------------------------------


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    agg = NashMTL()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_matrix_call_is_weighted_sum(NashMTL, J)


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_invariant_under_scaling(J: torch.Tensor) -> None:
    # The bargaining solution does not depend on the gradients' scale: agg(c J) = agg(J).
    agg = NashMTL(max_norm=0.0)
    d = agg(J)
    for c in (1e-3, 7.0):
        torch.testing.assert_close(agg(c * J), d, rtol=1e-7, atol=1e-9)


def test_invariant_under_per_task_scaling() -> None:
    # Nash's axiom of invariance to affine transformations of each player's utility.
    J = torch.randn(5, 60, generator=gen(1), dtype=torch.float64)
    scales = torch.tensor([1e-4, 0.3, 1.0, 20.0, 1e5], dtype=torch.float64)
    torch.testing.assert_close(NashMTL(max_norm=0.0)(scales[:, None] * J), NashMTL(max_norm=0.0)(J))


# ---- the paper's equations --------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(4))
def test_weights_solve_the_fixed_point_equation(T: int, seed: int) -> None:
    J = torch.randn(T, 30, generator=gen(seed), dtype=torch.float64)
    J[T - 1] -= 1.3 * J[0]  # a conflicting pair
    J *= torch.rand(T, 1, generator=gen(seed + 50), dtype=torch.float64) * 10
    G = J @ J.T
    alpha = NashMTL(max_norm=0.0).weights(G)
    assert (alpha > 0).all()
    torch.testing.assert_close(G @ alpha, 1 / alpha, rtol=1e-10, atol=0)
    torch.testing.assert_close(alpha, reference_fixed_point(G), rtol=1e-10, atol=0)


def test_large_number_of_tasks() -> None:
    J = torch.randn(64, 200, generator=gen(3), dtype=torch.float64)
    G = J @ J.T
    alpha = NashMTL(max_norm=0.0).weights(G)
    torch.testing.assert_close(alpha * (G @ alpha), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(alpha, reference_fixed_point(G), rtol=1e-9, atol=0)
    d = NashMTL()(J.float())
    assert torch.isfinite(d).all() and abs(float(d.norm()) - 1) < 1e-4


def test_256_tasks() -> None:
    J = torch.randn(256, 600, generator=gen(13), dtype=torch.float64)
    J[:80] -= 0.7 * J[80:160]  # many conflicting pairs
    G = J @ J.T
    alpha = NashMTL(max_norm=0.0).weights(G)
    torch.testing.assert_close(alpha * (G @ alpha), torch.ones(256, dtype=torch.float64))


def conflicting_start_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A trace-normalised G and a start α_0 = 1 whose first convex problem has inactive
    constraints (its solution is not the fixed point)."""
    g = gen(55)
    f64 = torch.float64
    J = torch.randn(3, 3 + int(torch.randint(0, 9, (1,), generator=g)), generator=g, dtype=f64)
    k = int(torch.randint(0, 3, (1,), generator=g))
    J[k] -= float(torch.rand(1, generator=g, dtype=f64) * 3) * J[(k + 1) % 3]
    J = J * torch.rand(3, 1, generator=g, dtype=f64) * 10
    G = J @ J.T
    return G / G.diagonal().mean(), torch.ones(3, dtype=torch.float64)


def test_one_iteration_solves_the_convex_problem() -> None:
    G, start = conflicting_start_case()
    star = reference_fixed_point(G)
    expected = reference_ccp_step(G, start, 1.01 * star)
    slack = expected * (G @ expected) - 1
    assert slack.max() > 0.1, "the case must exercise a problem whose solution is not α*"
    alpha, _ = torch.ops.mtlgrad.nash_mtl_weights(G, start, 1, 0.0)
    torch.testing.assert_close(alpha, expected, rtol=1e-8, atol=0)
    # The iterations go on to the fixed point.
    alpha, _ = torch.ops.mtlgrad.nash_mtl_weights(G, start, 20, 0.0)
    torch.testing.assert_close(alpha, star, rtol=1e-10, atol=0)


def test_starting_at_the_fixed_point_stays_there() -> None:
    J = torch.randn(6, 40, generator=gen(8), dtype=torch.float64)
    G = J @ J.T
    star = reference_fixed_point(G)
    alpha, _ = torch.ops.mtlgrad.nash_mtl_weights(G, star, 1, 0.0)
    torch.testing.assert_close(alpha, star, rtol=1e-12, atol=0)


def test_single_task_returns_the_unit_gradient() -> None:
    J = torch.randn(1, 100, dtype=torch.float64)
    torch.testing.assert_close(NashMTL()(J), J[0] / J[0].norm())


def test_zero_gradient_gets_weight_zero() -> None:
    J = torch.randn(4, 30, generator=gen(4), dtype=torch.float64)
    J[2] = 0
    w = NashMTL(max_norm=0.0).weights(J @ J.T)
    assert w[2] == 0
    keep = [0, 1, 3]
    torch.testing.assert_close(w[keep], NashMTL(max_norm=0.0).weights(J[keep] @ J[keep].T))


def test_pareto_stationary_gives_zero_update() -> None:
    # 0 is in the convex hull of the gradients: no direction improves every task.
    g = torch.randn(20, generator=gen(5), dtype=torch.float64)
    h = torch.randn(20, generator=gen(6), dtype=torch.float64)
    J = torch.stack([g, h, -(g + h)])
    assert torch.equal(NashMTL().weights(J @ J.T), torch.zeros(3, dtype=torch.float64))


# ---- max_norm, update_weights_every, state ----------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1.0, 100.0])
def test_max_norm_clips_the_update(max_norm: float) -> None:
    J = torch.randn(4, 50, generator=gen(7), dtype=torch.float64)
    d = NashMTL(max_norm=max_norm)(J)
    expected = 2.0 if max_norm == 0 else min(max_norm, 2.0)  # ||Jᵀα|| = √T at the fixed point
    assert abs(float(d.norm()) - expected) < 1e-9


def test_weights_are_reused_between_updates() -> None:
    J1 = torch.randn(3, 40, generator=gen(9), dtype=torch.float64)
    J2 = torch.randn(3, 40, generator=gen(10), dtype=torch.float64) * 5
    G1, G2 = J1 @ J1.T, J2 @ J2.T
    agg = NashMTL(max_norm=0.5, update_weights_every=2)
    agg.weights(G1)
    alpha1 = agg.state_dict()["alpha"]
    w2 = agg.weights(G2)  # reuses alpha1, clipped with G2's norm
    assert torch.equal(agg.state_dict()["alpha"], alpha1)
    torch.testing.assert_close(w2, alpha1 * 0.5 / (alpha1 @ G2 @ alpha1).sqrt())
    agg.weights(G2)  # third call: recomputed
    torch.testing.assert_close(agg.state_dict()["alpha"], reference_fixed_point(G2))
    assert agg.state_dict()["step"] == 3


def test_state_round_trip() -> None:
    Gs = []
    for seed in range(4):
        J = torch.randn(3, 30, generator=gen(20 + seed), dtype=torch.float64)
        Gs.append(J @ J.T)
    a = NashMTL(update_weights_every=3)
    a.weights(Gs[0])
    a.weights(Gs[1])
    b = NashMTL(update_weights_every=3)
    b.load_state_dict(a.state_dict())
    for G in Gs[2:]:
        assert torch.equal(a.weights(G), b.weights(G))
    a.reset()
    assert a.state_dict() == {"step": 0, "alpha": None}
    with pytest.raises(ValueError, match="keys 'step' and 'alpha'"):
        b.load_state_dict({"step": 0})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        b.load_state_dict({"step": -1, "alpha": None})


def test_changing_the_number_of_tasks_needs_a_reset() -> None:
    agg = NashMTL()
    agg(torch.randn(3, 10))
    with pytest.raises(ValueError, match="call reset"):
        agg(torch.randn(4, 10))
    agg.reset()
    agg(torch.randn(4, 10))


def test_constructor_checks_and_repr() -> None:
    assert repr(NashMTL()) == "NashMTL(max_norm=1.0, update_weights_every=1, optim_niter=20)"
    with pytest.raises(ValueError, match="max_norm must be a non-negative number, got -1"):
        NashMTL(max_norm=-1)
    with pytest.raises(ValueError, match="update_weights_every must be a positive int, got 0"):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError, match="optim_niter must be a positive int, got 1.5"):
        NashMTL(optim_niter=1.5)


def test_matches_torchjd() -> None:
    pytest.importorskip("cvxpy")  # TorchJD's NashMTL solves its problems with cvxpy
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(4, 30, generator=gen(11), dtype=torch.float64)
    expected = torchjd_aggregation.NashMTL(n_tasks=4, max_norm=0.0)(J)
    # TorchJD stops on its solver's tolerances (ECOS, and a change below 1e-6).
    torch.testing.assert_close(NashMTL(max_norm=0.0)(J), expected, rtol=1e-4, atol=1e-4)


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    torch.library.opcheck(
        torch.ops.mtlgrad.nash_mtl_weights.default,
        (G, torch.empty(0, dtype=torch.float64), 20, 1.0),
    )
