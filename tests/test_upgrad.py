from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_permutation_invariant,
    assert_update_close,
    assert_weights_match,
    matrices,
    matrix_families,
    matrix_ids,
    spread_norm_matrices,
)
from dual_cone import assert_non_conflicting, nonneg_qp, project_onto_dual_cone

from mtlgrad import ops
from mtlgrad.aggregators import UPGrad


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
def test_properties(J: torch.Tensor, reg_eps: float) -> None:
    agg = UPGrad(reg_eps=reg_eps)
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: UPGrad(reg_eps=reg_eps), J)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "conflicting"])
def test_properties_with_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg = UPGrad()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)


# ---- references -------------------------------------------------------------------------------


def reference_upgrad(J: torch.Tensor) -> torch.Tensor:
    """The paper's UPGrad: the mean of the projections of the rows of J."""
    return torch.stack([project_onto_dual_cone(J, g) for g in J]).mean(0)


def reference_weights(G: torch.Tensor, reg_eps: float = 0.0) -> torch.Tensor:
    """Proposition 1 of Quinton & Rey: the weights of π_J(g_i) are e_i + v_i, v_i solving
    min_{v >= 0} ½ vᵀ G v + (G e_i)ᵀ v; UPGrad averages them. reg_eps as in TorchJD."""
    T = G.shape[0]
    Q = G / G.trace() + reg_eps * torch.eye(T, dtype=torch.float64)
    eye = torch.eye(T, dtype=torch.float64)
    return torch.stack([eye[i] + nonneg_qp(Q, Q[:, i]) for i in range(T)]).mean(0)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_papers_projections(T: int, seed: int) -> None:
    J = torch.randn(T, 30, dtype=torch.float64, generator=_gen(seed))
    J[0] -= 2 * J[1]  # at least one conflict
    torch.testing.assert_close(UPGrad()(J), reference_upgrad(J), rtol=1e-8, atol=1e-10)


def test_gradients_whose_norms_span_eight_decades() -> None:
    # Every projection's constraints are resolved relative to each gradient's own norm: a
    # gradient 1e-8 of the largest is kept from conflicting like any other.
    for J in spread_norm_matrices(150):
        w = UPGrad().weights(J @ J.T)
        assert_update_close(J.T @ w, reference_upgrad(J), w, J)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("reg_eps", [0.0, 1e-4, 0.1])
def test_weights_match_proposition_1(T: int, reg_eps: float) -> None:
    J = torch.randn(T, 30, dtype=torch.float64, generator=_gen(T))
    J[-1] -= 1.5 * J[0]
    assert_weights_match(UPGrad(reg_eps), J, lambda G: reference_weights(G, reg_eps))


def test_weights_match_projected_gradient_with_many_tasks() -> None:
    # T = 64: plain projected-gradient iterations on the 64 QPs of Proposition 1 at once (G is
    # well conditioned for P = 1000, so they converge to rounding).
    T = 64
    J = torch.randn(T, 1000, dtype=torch.float64, generator=_gen(5))
    G = J @ J.T
    Q = G / G.trace()
    step = 1 / torch.linalg.eigvalsh(Q).max()
    V = torch.zeros(T, T, dtype=torch.float64)  # column i: v_i
    for _ in range(600):
        V = (V - step * (Q @ V + Q)).clamp_min(0)
    expected = (torch.eye(T, dtype=torch.float64) + V).mean(1)
    torch.testing.assert_close(UPGrad().weights(G), expected, rtol=1e-9, atol=1e-12)


def test_large_rank_deficient_input_is_finite() -> None:
    # T = 256 tasks in a 40-dimensional space: the QPs' free sets must stay independent.
    J = matrix_families(256)["rank_deficient"] + 1e-3 * torch.randn(256, 40, generator=_gen(1))
    agg = UPGrad()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)


def test_result_does_not_depend_on_the_thread_count() -> None:
    # The per-task QPs are split over threads for large T; their sum runs in a fixed order.
    J = torch.randn(192, 300, dtype=torch.float64, generator=_gen(2))
    G = J @ J.T
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = UPGrad().weights(G)
        torch.set_num_threads(4)
        threaded = UPGrad().weights(G)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(serial, threaded)


# ---- behaviour ----------------------------------------------------------------------------------


def test_mean_when_nothing_conflicts() -> None:
    J = torch.rand(6, 40, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(
        UPGrad().weights(J @ J.T), torch.full((6,), 1 / 6, dtype=torch.float64)
    )


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(UPGrad()(J), J[0])


def test_two_opposite_gradients_cancel() -> None:
    g = torch.randn(50, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(UPGrad()(torch.stack([g, -g])), torch.zeros(50, dtype=torch.float64))


def test_two_tasks_closed_form() -> None:
    # For two conflicting gradients, π_J(g_1) = g_1 − (g_1·g_2 / |g_2|²) g_2 (only g_2's
    # constraint is active) and symmetrically.
    J = torch.randn(2, 20, dtype=torch.float64, generator=_gen(3))
    J[1] -= 2 * J[0]
    g1, g2 = J
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
    torch.testing.assert_close(UPGrad()(J), (p1 + p2) / 2)


def test_reg_eps_shrinks_towards_the_mean() -> None:
    J = torch.randn(8, 40, dtype=torch.float64, generator=_gen(4))
    J[:4] -= 1.5 * J[4:]
    mean = J.mean(0)
    distances = [float((UPGrad(r)(J) - mean).norm()) for r in (0.0, 1e-2, 1.0, 100.0)]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < 0.05 * distances[0]


def test_opcheck() -> None:
    G = ops.gram(list(matrix_families(5)["conflicting"].unbind(0)), 5)
    torch.library.opcheck(torch.ops.mtlgrad.upgrad_weights.default, (G, 0.0))


# ---- TorchJD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5, 8, 16])
def test_matches_torchjd(T: int) -> None:
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("quadprog")
    from torchjd.aggregation import UPGrad as TorchJDUPGrad

    J = torch.randn(T, 40, dtype=torch.float64, generator=_gen(10 + T))
    J[0] -= 2 * J[-1]
    expected = TorchJDUPGrad()(J)  # quadprog with reg_eps = 1e-4 on G / trace(G)
    torch.testing.assert_close(UPGrad(reg_eps=1e-4)(J), expected, rtol=1e-9, atol=1e-12)
    # TorchJD's regulariser moves its answer by O(reg_eps T) from the exact projection.
    assert (UPGrad()(J) - expected).norm() <= 1e-2 * expected.norm()
    assert torchjd is not None


# ---- construction and state ---------------------------------------------------------------------


def test_constructor_checks_reg_eps() -> None:
    for bad in (-1, -1e-9, float("nan"), "0", True, None):
        with pytest.raises(ValueError, match="reg_eps must be a non-negative number"):
            UPGrad(reg_eps=bad)


def test_repr() -> None:
    assert repr(UPGrad()) == "UPGrad(reg_eps=0.0)"
    assert repr(UPGrad(1e-4)) == "UPGrad(reg_eps=0.0001)"


def test_state_round_trip() -> None:
    agg = UPGrad()
    state = agg.state_dict()
    assert state == {}
    agg.load_state_dict(state)
    agg.reset()
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"x": 1})
