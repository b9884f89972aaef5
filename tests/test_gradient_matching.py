from __future__ import annotations

import itertools

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_update_close,
    assert_weights_match,
    least_squares,
    matrices,
    matrix_families,
    matrix_ids,
    scale_of,
    spread_norm_matrices,
)

from mtlgrad import ops
from mtlgrad.aggregators import GradientMatching


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_permutation_invariant(main: int, J: torch.Tensor, rtol: float = 1e-7) -> None:
    """Reordering the tasks (the main task's index following it) does not change the update."""
    perm = torch.randperm(J.shape[0], generator=_gen(1))
    new_main = int((perm == main).nonzero())
    d, d_perm = GradientMatching(main)(J), GradientMatching(new_main)(J[perm])
    torch.testing.assert_close(d_perm, d, rtol=rtol, atol=rtol * scale_of(J))


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    for main in sorted({0, J.shape[0] - 1}):
        agg = GradientMatching(main)
        assert_finite_and_shaped(agg, J)
        assert_permutation_invariant(main, J)
        assert_linear_under_scaling(agg, J)
        assert_matrix_call_is_weighted_sum(lambda main=main: GradientMatching(main), J)
        w = agg.weights(J @ J.T)
        assert w[main] == 1 and (w >= 0).all()


@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "conflicting"])
def test_properties_with_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg = GradientMatching(5)
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(5, J)
    assert_linear_under_scaling(agg, J)


# ---- references -------------------------------------------------------------------------------


def matching_weights(G: torch.Tensor, main: int) -> torch.Tensor:
    """argmin_{a >= 0} ||g_main − Σ_k a_k g_k||² on the Gram matrix, by enumerating supports S:
    G_SS a_S = G_S,main, a_S >= 0 and G_AA a − G_A,main >= 0 (KKT); 1 for the main task."""
    T = G.shape[0]
    aux = [k for k in range(T) if k != main]
    Q, b = G[aux][:, aux], G[aux, main]
    for size in range(len(aux) + 1):
        for S in itertools.combinations(range(len(aux)), size):
            S = list(S)
            a = torch.zeros(len(aux), dtype=torch.float64)
            if S:
                a[S] = torch.linalg.solve(Q[S][:, S], b[S])
            if (a >= 0).all() and (Q @ a - b >= -1e-10 * G.diagonal().max()).all():
                w = torch.zeros(T, dtype=torch.float64)
                w[main] = 1
                w[aux] = a
                return w
    raise AssertionError("no support satisfies the KKT conditions")


def matching_fit(J: torch.Tensor, main: int) -> torch.Tensor:
    """The projection Σ_k a_k g_k of g_main onto the cone of the auxiliary gradients, in the primal,
    by enumerating supports S: a_S by least squares, a_S >= 0, and g_kᵀ r <= 0 for every auxiliary
    (r = g_main − Σ a_k g_k, KKT), each to a tolerance relative to g_k's own norm."""
    aux = [k for k in range(J.shape[0]) if k != main]
    target = J[main]
    for size in range(len(aux) + 1):
        for S in itertools.combinations(aux, size):
            S = list(S)
            a = least_squares(J[S].T, target) if S else target[:0]
            if (a < 0).any():
                continue
            fit = J[S].T @ a if S else torch.zeros_like(target)
            products = J[aux] @ (target - fit)
            if (products <= 1e-9 * J[aux].norm(dim=1) * target.norm()).all():
                return fit
    raise AssertionError("no support satisfies the KKT conditions")


def test_a_small_helpful_gradient_is_used() -> None:
    # g_main = (1, 1, 0) = 3000 g_1 + 10000 g_3 exactly (KKT: the residual is 0, and g_2 · 0 = 0),
    # with g_1 and g_3 1e-3 and 2e-4 of g_main's norm and g_2 1e6 times larger. A dual test scaled
    # by the largest gradient stops at a = (1000, 0, 0), which leaves 71% of g_main unmatched.
    J = torch.tensor(
        [[1.0, 1.0, 0.0], [1e-3, 0.0, 0.0], [0.0, 0.0, -1e3], [-2e-4, 1e-4, 0.0]],
        dtype=torch.float64,
    )
    w = GradientMatching(0).weights(J @ J.T)
    torch.testing.assert_close(w, torch.tensor([1.0, 3000.0, 0.0, 10000.0], dtype=torch.float64))
    assert float((J[0] - J[1:].T @ w[1:]).norm()) < 1e-9 * float(J[0].norm())


def test_gradients_whose_norms_span_eight_decades() -> None:
    for J in spread_norm_matrices(400):
        w = GradientMatching(0).weights(J @ J.T)
        assert_update_close(J[1:].T @ w[1:], matching_fit(J, 0), w, J)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("main", [0, 1])
def test_weights_match_the_least_squares_problem(T: int, main: int) -> None:
    if main >= T:
        pytest.skip("no such task")
    J = torch.randn(T, 30, dtype=torch.float64, generator=_gen(T + 10 * main))
    J[main] += J[(main + 1) % T] - 0.5 * J[(main + 2) % T]  # some auxiliary help, some hurts
    assert_weights_match(GradientMatching(main), J, lambda G: matching_weights(G, main))


def test_residual_is_orthogonal_to_the_used_auxiliaries() -> None:
    # KKT in the primal: r = g_main − Σ a_k g_k has r · g_k <= 0 for every auxiliary, and = 0
    # where a_k > 0.
    J = torch.randn(8, 30, dtype=torch.float64, generator=_gen(3))
    J[0] += J[1] + 2 * J[2] - J[3]
    w = GradientMatching(0).weights(J @ J.T)
    residual = J[0] - J[1:].T @ w[1:]
    products = J[1:] @ residual
    tolerance = 1e-9 * float(J.norm()) ** 2
    assert (products <= tolerance).all()
    assert (products[w[1:] > 0].abs() <= tolerance).all()
    assert (w[1:] > 0).sum() >= 2


def test_weights_match_projected_gradient_with_many_tasks() -> None:
    T, main = 64, 3
    J = torch.randn(T, 1000, dtype=torch.float64, generator=_gen(6))
    J[main] += J[10:20].sum(0) - J[20:25].sum(0)
    G = J @ J.T
    aux = [k for k in range(T) if k != main]
    Q, b = G[aux][:, aux], G[aux, main]
    step = 1 / torch.linalg.eigvalsh(Q).max()
    a = torch.zeros(T - 1, dtype=torch.float64)
    for _ in range(600):
        a = (a - step * (Q @ a - b)).clamp_min(0)
    expected = torch.ones(T, dtype=torch.float64)
    expected[aux] = a
    assert (a > 0).sum() >= 10
    torch.testing.assert_close(GradientMatching(main).weights(G), expected, rtol=1e-9, atol=1e-12)


def test_large_inputs_are_finite() -> None:
    # T = 256, in 40 dimensions (nearly rank-deficient) and in 2000.
    near = matrix_families(256)["rank_deficient"] + 1e-3 * torch.randn(256, 40, generator=_gen(1))
    for J in (near, torch.randn(256, 2000, dtype=torch.float64, generator=_gen(2))):
        assert_finite_and_shaped(GradientMatching(0), J)


# ---- behaviour ----------------------------------------------------------------------------------


def test_exact_combination_is_recovered() -> None:
    J = torch.randn(4, 30, dtype=torch.float64, generator=_gen(0))
    J[2] = 0.5 * J[0] + 2.0 * J[3]
    torch.testing.assert_close(
        GradientMatching(2).weights(J @ J.T),
        torch.tensor([0.5, 0.0, 1.0, 2.0], dtype=torch.float64),
    )


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(GradientMatching(0)(J), J[0])


def test_zero_main_gradient_gets_no_help() -> None:
    J = torch.randn(4, 30, dtype=torch.float64, generator=_gen(1))
    J[1] = 0
    torch.testing.assert_close(
        GradientMatching(1).weights(J @ J.T),
        torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
    )


def test_main_task_out_of_range() -> None:
    J = torch.randn(3, 10)
    expected = "GradientMatching: main task 3 is out of range for 3 tasks"
    with pytest.raises(ValueError, match=expected):
        GradientMatching(3)(J)
    with pytest.raises(ValueError, match="main task 5 is out of range for 3 tasks"):
        torch.ops.mtlgrad.gradient_matching_weights(J.double() @ J.double().T, 5)


def test_opcheck() -> None:
    G = ops.gram(list(matrix_families(5)["random"].unbind(0)), 5)
    torch.library.opcheck(torch.ops.mtlgrad.gradient_matching_weights.default, (G, 2))


# ---- construction and state ---------------------------------------------------------------------


def test_constructor_checks_main() -> None:
    for bad in (-1, 1.0, "0", True, None):
        with pytest.raises(ValueError, match="main must be a non-negative int"):
            GradientMatching(bad)


def test_repr() -> None:
    assert repr(GradientMatching(2)) == "GradientMatching(main=2)"


def test_state_round_trip() -> None:
    agg = GradientMatching(0)
    state = agg.state_dict()
    assert state == {}
    agg.load_state_dict(state)
    agg.reset()
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"x": 1})
