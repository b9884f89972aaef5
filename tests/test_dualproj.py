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
from mtlgrad.aggregators import DualProj


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dominated(T: int, seed: int, P: int = 30) -> torch.Tensor:
    """Random gradients, the first 10 times larger and the second about -1/2 times the first:
    their mean conflicts with the second, and usually with others."""
    J = torch.randn(T, P, dtype=torch.float64, generator=_gen(seed))
    J[0] *= 10
    if T > 1:
        J[1] -= 0.5 * J[0]
    return J


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
def test_properties(J: torch.Tensor, reg_eps: float) -> None:
    agg = DualProj(reg_eps=reg_eps)
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: DualProj(reg_eps=reg_eps), J)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "conflicting"])
def test_properties_with_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg = DualProj()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)


# ---- references -------------------------------------------------------------------------------


def reference_weights(G: torch.Tensor, reg_eps: float = 0.0) -> torch.Tensor:
    """Proposition 1 of Quinton & Rey with u = 1/T: u + v, v solving
    min_{v >= 0} ½ vᵀ G v + (G u)ᵀ v. reg_eps as in TorchJD."""
    T = G.shape[0]
    Q = G / G.trace() + reg_eps * torch.eye(T, dtype=torch.float64)
    u = torch.full((T,), 1 / T, dtype=torch.float64)
    return u + nonneg_qp(Q, Q @ u)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_papers_projection(T: int, seed: int) -> None:
    J = dominated(T, seed)
    expected = project_onto_dual_cone(J, J.mean(0))
    assert not torch.allclose(expected, J.mean(0)), "the test needs a conflicting mean"
    torch.testing.assert_close(DualProj()(J), expected, rtol=1e-8, atol=1e-10)


def test_gradients_whose_norms_span_eight_decades() -> None:
    # The constraints are resolved relative to each gradient's own norm: a gradient 1e-8 of the
    # largest is kept from conflicting like any other.
    for J in spread_norm_matrices(150):
        w = DualProj().weights(J @ J.T)
        assert_update_close(J.T @ w, project_onto_dual_cone(J, J.mean(0)), w, J)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("reg_eps", [0.0, 1e-4, 0.1])
def test_weights_match_proposition_1(T: int, reg_eps: float) -> None:
    J = dominated(T, 7)
    assert_weights_match(DualProj(reg_eps), J, lambda G: reference_weights(G, reg_eps))


def test_weights_match_projected_gradient_with_many_tasks() -> None:
    # T = 64, plain projected-gradient iterations on Proposition 1's QP (G is well conditioned
    # for P = 1000, so they converge to rounding).
    T = 64
    J = 0.3 * torch.randn(T, 1000, dtype=torch.float64, generator=_gen(5))
    e = J[0] / J[0].norm()
    J[0] = 60 * e  # the mean points along e ...
    J[1:6] -= 6 * e  # ... and conflicts with these five
    G = J @ J.T
    Q = G / G.trace()
    step = 1 / torch.linalg.eigvalsh(Q).max()
    u = torch.full((T,), 1 / T, dtype=torch.float64)
    v = torch.zeros(T, dtype=torch.float64)
    for _ in range(5000):
        v = (v - step * (Q @ (u + v))).clamp_min(0)
    assert (v > 0).sum() >= 3, "the test needs active constraints"
    torch.testing.assert_close(DualProj().weights(G), u + v, rtol=1e-9, atol=1e-12)


def test_large_rank_deficient_input_is_finite() -> None:
    J = matrix_families(256)["rank_deficient"] + 1e-3 * torch.randn(256, 40, generator=_gen(1))
    agg = DualProj()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)


# ---- behaviour ----------------------------------------------------------------------------------


def test_mean_when_the_mean_conflicts_with_nothing() -> None:
    J = torch.rand(6, 40, dtype=torch.float64, generator=_gen(0)) - 0.2
    assert (J @ J.mean(0) > 0).all()
    torch.testing.assert_close(DualProj()(J), J.mean(0))


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(DualProj()(J), J[0])


def test_two_tasks_closed_form() -> None:
    # If the mean m conflicts with g_2 only, π_J(m) = m − (m·g_2 / |g_2|²) g_2.
    J = torch.randn(2, 20, dtype=torch.float64, generator=_gen(3))
    J[0] *= 10
    m = J.mean(0)
    assert m @ J[1] < 0 <= m @ J[0]
    torch.testing.assert_close(DualProj()(J), m - (m @ J[1]) / (J[1] @ J[1]) * J[1])


def test_opcheck() -> None:
    G = ops.gram(list(dominated(5, 0).unbind(0)), 5)
    torch.library.opcheck(torch.ops.mtlgrad.dualproj_weights.default, (G, 0.0))


# ---- TorchJD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5, 8, 16])
def test_matches_torchjd(T: int) -> None:
    pytest.importorskip("torchjd")
    pytest.importorskip("quadprog")
    from torchjd.aggregation import DualProj as TorchJDDualProj

    J = dominated(T, 10 + T, P=40)
    expected = TorchJDDualProj()(J)  # quadprog with reg_eps = 1e-4 on G / trace(G)
    torch.testing.assert_close(DualProj(reg_eps=1e-4)(J), expected, rtol=1e-9, atol=1e-12)
    # TorchJD's regulariser moves its answer by O(reg_eps T) from the exact projection.
    assert (DualProj()(J) - expected).norm() <= 1e-2 * expected.norm()


# ---- construction and state ---------------------------------------------------------------------


def test_constructor_checks_reg_eps() -> None:
    for bad in (-1, -1e-9, float("nan"), "0", True, None):
        with pytest.raises(ValueError, match="reg_eps must be a non-negative number"):
            DualProj(reg_eps=bad)


def test_repr() -> None:
    assert repr(DualProj()) == "DualProj(reg_eps=0.0)"
    assert repr(DualProj(reg_eps=0.5)) == "DualProj(reg_eps=0.5)"


def test_state_round_trip() -> None:
    agg = DualProj()
    state = agg.state_dict()
    assert state == {}
    agg.load_state_dict(state)
    agg.reset()
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"x": 1})
