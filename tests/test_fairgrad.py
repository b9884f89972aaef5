from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_matrix_call_is_weighted_sum,
    assert_non_conflicting,
    assert_permutation_invariant,
    assert_weights_match,
    matrices,
    matrix_families,
    matrix_ids,
    scale_of,
)

from mtlgrad import ops
from mtlgrad.aggregators import FairGrad

ALPHAS = [0.5, 1.0, 2.0]


def assert_scaling_law(agg: FairGrad, J: torch.Tensor) -> None:
    """d(cJ) = c^((1-α)/(1+α)) d(J): the scaling the equation G w = w^(-1/α) implies. Tolerance
    relative to Σ_i |w_i| ||g_i||, the size of the terms combined (which cancel where the system
    is degenerate)."""
    exponent = (1 - agg.alpha) / (1 + agg.alpha)
    d = agg(J)
    terms = float((agg.weights(J @ J.T).abs() * J.norm(dim=1)).sum())
    for c in (1e-3, 7.0):
        atol = 1e-7 * c**exponent * max(terms, 1e-300)
        torch.testing.assert_close(agg(c * J), c**exponent * d, rtol=1e-7, atol=atol)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor, alpha: float) -> None:
    agg = FairGrad(alpha)
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_scaling_law(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: FairGrad(alpha), J)


# Also where some non-negative combination of the gradients vanishes (zero, opposite, and
# rank-deficient gradients): the tasks in it get no decrease, and no conflict.
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_non_conflicting(J: torch.Tensor, alpha: float) -> None:
    assert_non_conflicting(FairGrad(alpha), J)


def reference_weights(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """The positive root of G w = w^(-1/α), by damped Newton on log w (float64, plain torch)."""
    x = torch.zeros(G.shape[0], dtype=G.dtype)

    def residual(x: torch.Tensor) -> torch.Tensor:
        return G @ x.exp() - (-x / alpha).exp()

    for _ in range(500):
        r = residual(x)
        if r.abs().max() <= 1e-15 * (G.abs() @ x.exp()).max():
            break
        jacobian = G * x.exp() + torch.diag((-x / alpha).exp() / alpha)
        step = torch.linalg.solve(jacobian, -r)
        t = 1.0
        while residual(x + t * step).norm() > (1 - 1e-4 * t) * r.norm() and t > 1e-10:
            t /= 2
        x = x + t * step
    return x.exp()


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_weights_match_the_equation(T: int, alpha: float) -> None:
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        J = torch.randn(T, 30, dtype=torch.float64, generator=gen)
        J = J * (0.1 + 3 * torch.rand(T, 1, dtype=torch.float64, generator=gen))
        assert_weights_match(FairGrad(alpha), J, lambda G: reference_weights(G, alpha), rtol=1e-9)
        # Every task's first-order decrease is w_i^(-1/α) > 0.
        w = FairGrad(alpha).weights(J @ J.T)
        torch.testing.assert_close(J @ (J.T @ w), w ** (-1 / alpha), rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name", ["random", "duplicated_rows", "one_zero_row", "huge"])
def test_many_tasks(name: str, alpha: float) -> None:
    J = matrix_families(64)[name]
    agg = FairGrad(alpha)
    assert_finite_and_shaped(agg, J)
    assert_scaling_law(agg, J)
    assert_non_conflicting(agg, J)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_torchjd(alpha: float, seed: int) -> None:
    # TorchJD solves the same system with scipy's least_squares (tolerance ~1e-8), on the raw G.
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(2 + seed, 30, dtype=torch.float64, generator=gen) * 0.3
    expected = torchjd.aggregation.FairGrad(alpha)(J)
    torch.testing.assert_close(FairGrad(alpha)(J), expected, rtol=1e-6, atol=1e-6 * scale_of(J))


def test_single_task() -> None:
    g = 3.0 * torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for alpha in ALPHAS:
        expected = float(g @ g) ** (-alpha / (1 + alpha)) * g
        torch.testing.assert_close(FairGrad(alpha)(g.unsqueeze(0)), expected)


def test_zero_gradient_does_not_change_the_others() -> None:
    # G w = w^(-1/α) cannot hold for a zero gradient; it gets weight 0, and the other tasks'
    # weights are those of the system without it.
    J = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with_zero = torch.cat([J[:1], torch.zeros(1, 30, dtype=torch.float64), J[1:]])
    for alpha in ALPHAS:
        w = FairGrad(alpha).weights(with_zero @ with_zero.T)
        assert w[1] == 0
        torch.testing.assert_close(
            w[[0, 2, 3]], FairGrad(alpha).weights(J @ J.T), rtol=1e-9, atol=0
        )


def strongly_stationary(seed: int, T: int = 20, P: int = 200) -> torch.Tensor:
    """T float32 gradients in a (T − 1)-dimensional subspace with a strictly positive combination
    (coefficients in [0.5, 1.5]) that vanishes: no update decreases every loss."""
    g = torch.Generator().manual_seed(seed)
    c = 0.5 + torch.rand(T, generator=g, dtype=torch.float64)
    coefficients = torch.randn(T, T - 1, generator=g, dtype=torch.float64)
    coefficients[-1] = -(c[:-1, None] * coefficients[:-1]).sum(0) / c[-1]
    basis = torch.randn(T - 1, P, generator=g, dtype=torch.float64)
    return (coefficients @ basis).float()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("seed", range(3))
def test_strongly_stationary_float32_gradients(seed: int, alpha: float) -> None:
    # The combination vanishes only to float32 rounding, below which G's entries are noise (the
    # float32 Gram matrix is even indefinite here): a regulariser below that rounding let the
    # weights grow to a sum of ~1e3-1e5 / ||g|| and the update conflict with half the tasks at
    # cosines down to -0.25. Non-conflicting to float32 rounding, with bounded weights.
    J = strongly_stationary(seed)
    agg = FairGrad(alpha)
    d = agg(J).double()
    w = agg.weights(ops.gram(list(J.unbind(0)), J.shape[0]))
    norms = J.double().norm(dim=1)
    assert (J.double() @ d >= -1e-4 * norms * float(d.norm())).all()
    # w scales like ||g||^(-2α/(1+α)): bounded in that unit by a few times T.
    unit = float(norms.mean()) ** (-2 * alpha / (1 + alpha))
    assert float(w.abs().sum()) <= 10 * J.shape[0] * unit


def test_degenerate_subset_is_the_limit_of_a_vanishing_ridge() -> None:
    # Three gradients with a vanishing positive combination (unbalanced: c = 1, 2, 0.5) and two
    # others. FairGrad with a ridge ρ (tiny private components) has an update that conflicts with
    # the three at cosines of order 1 whatever ρ; as ρ -> 0 it tends to the update returned:
    # orthogonal to the three, FairGrad's equation for the other two.
    g = torch.Generator().manual_seed(3)
    B = torch.randn(2, 12, generator=g, dtype=torch.float64)
    A = torch.randn(3, 2, generator=g, dtype=torch.float64)
    A[2] = -(A[0] + 2 * A[1]) / 0.5
    S = A @ B
    J = torch.cat([S, torch.randn(2, 12, generator=g, dtype=torch.float64) + 0.5 * S[:2]])
    G = J @ J.T
    sigma = float(G.trace()) / 5
    for alpha in ALPHAS:
        w = FairGrad(alpha).weights(G)
        d = J.T @ w
        products = J @ d
        assert (products[:3].abs() <= 1e-12 * float(G.diagonal().max())).all()
        torch.testing.assert_close(products[3:], w[3:] ** (-1 / alpha), rtol=1e-9, atol=0)
        errors = []
        for rho in (1e-6, 1e-8, 1e-10):
            ridge = torch.eye(5, dtype=torch.float64) * rho
            w_rho = reference_weights(G / sigma + ridge, alpha) * sigma ** (-alpha / (1 + alpha))
            errors.append(float((J.T @ w_rho - d).norm() / d.norm()))
        # The ridge's error falls like ρ^(1/(1+α)): by 100^(1/3) or more per step here.
        assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3 and errors[2] < 1e-3


def test_degenerate_inputs_are_finite() -> None:
    g = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for alpha in (0.1, 1.0, 10.0):
        for J in (torch.stack([g, -g]), torch.zeros(4, 30, dtype=torch.float64), g.repeat(5, 1)):
            assert_finite_and_shaped(FairGrad(alpha), J)
        # Two opposite gradients: equal weights, so the update cancels.
        assert FairGrad(alpha)(torch.stack([g, -g])).norm() < 1e-6 * g.norm()


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "1", True, None])
def test_constructor_errors(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        FairGrad(alpha)  # type: ignore[arg-type]


def test_opcheck() -> None:
    J = torch.randn(4, 20, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mtlgrad.fairgrad_weights.default, (J @ J.T, 2.0))


def test_repr() -> None:
    assert repr(FairGrad(2)) == "FairGrad(alpha=2.0)"


def test_256_tasks() -> None:
    J = torch.randn(256, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(256))
    w = FairGrad(1.0).weights(J @ J.T)
    assert w.shape == (256,) and torch.isfinite(w).all()
    torch.testing.assert_close(J @ (J.T @ w), 1 / w, rtol=1e-9, atol=0)
