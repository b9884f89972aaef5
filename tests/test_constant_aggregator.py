"""Constant: fixed user weights, d = Jᵀ w."""

from __future__ import annotations

import math

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_update_close,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import Constant, Sum


def weights_for(T: int) -> list[float]:
    """Distinct weights of both signs and several magnitudes."""
    return [(-1.0) ** t * (0.5 + t) * 10.0 ** (t % 3 - 1) for t in range(T)]


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    w = weights_for(J.shape[0])
    agg = Constant(w)
    assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: Constant(w), J)
    w64 = torch.tensor(w, dtype=torch.float64)
    assert_update_close(agg(J), J.T @ w64, w64, J, rtol=1e-12)


@pytest.mark.parametrize("J", matrices((2, 3, 8)), ids=matrix_ids((2, 3, 8)))
def test_permuting_tasks_and_weights_together(J: torch.Tensor) -> None:
    T = J.shape[0]
    w = torch.tensor(weights_for(T), dtype=torch.float64)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
    scale = float(J.norm(dim=1).max()) or 1.0
    torch.testing.assert_close(
        Constant(w[perm])(J[perm]), Constant(w)(J), rtol=1e-12, atol=1e-12 * scale
    )


def test_not_permutation_invariant_with_unequal_weights() -> None:
    J = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    agg = Constant([1.0, 2.0, 3.0])
    assert not torch.allclose(agg(J[[2, 0, 1]]), agg(J))
    equal = Constant([0.5, 0.5, 0.5])
    torch.testing.assert_close(equal(J[[2, 0, 1]]), equal(J), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_weights(dtype: torch.dtype) -> None:
    J64 = torch.randn(4, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = J64.to(dtype)
    w = [0.25, -2.0, 0.0, 3.5]
    expected = (torch.tensor(w, dtype=torch.float64) @ J.double()).to(dtype)
    torch.testing.assert_close(Constant(w)(J), expected)
    weights = Constant(torch.tensor(w)).weights(J64 @ J64.T)
    assert weights.dtype == torch.float64 and weights.tolist() == w
    torch.testing.assert_close(Constant([1.0] * 4)(J), Sum()(J))


def test_weights_are_not_shared_with_the_caller() -> None:
    given = torch.tensor([1.0, 2.0])
    agg = Constant(given)
    given.mul_(10)
    agg.weights(torch.eye(2)).mul_(10)
    assert agg.weights(torch.eye(2)).tolist() == [1.0, 2.0]


def test_task_count_must_match() -> None:
    with pytest.raises(ValueError, match=r"Constant has 2 weights \(one per task\), but got 3"):
        Constant([1.0, 2.0])(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"Constant has 3 weights \(one per task\), but got 1"):
        Constant([1.0, 2.0, 3.0]).weights(torch.ones(1, 1))


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ([1.0, math.nan], ValueError, r"weights\[1\] must be finite, got nan"),
        ([-math.inf], ValueError, r"weights\[0\] must be finite, got -inf"),
        ([], ValueError, "weights must hold one weight per task, got none"),
        ([1.0, "2"], TypeError, r"weights\[1\] must be a number, got str"),
        ([True], TypeError, r"weights\[0\] must be a number, got bool"),
        (torch.ones(2, 2), ValueError, r"weights must be 1-D \(one per task\), got shape \(2, 2\)"),
        (torch.tensor(1.0), ValueError, r"weights must be 1-D \(one per task\), got shape \(\)"),
        (3.0, TypeError, "weights must be a sequence of numbers, got float"),
    ],
)
def test_errors(weights, error, message) -> None:
    with pytest.raises(error, match=message):
        Constant(weights)


def test_repr_and_state() -> None:
    assert repr(Constant([1, -0.5])) == "Constant(weights=[1.0, -0.5])"
    assert repr(Constant(torch.tensor([2.0]))) == "Constant(weights=[2.0])"
    assert Constant([1.0]).state_dict() == {}


@pytest.mark.parametrize("kind", ["random", "rank_deficient", "one_zero_row", "huge"])
@pytest.mark.parametrize("T", [2, 5])
def test_matches_torchjd(kind: str, T: int) -> None:
    jd = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(T)
    J = torch.randn(T, 30, generator=g, dtype=torch.float64)
    if kind == "rank_deficient":
        J = torch.randn(T, 1, generator=g, dtype=torch.float64) @ J[:1]
    elif kind == "one_zero_row":
        J[1] = 0
    elif kind == "huge":
        J = J * 1e15
    w = torch.randn(T, generator=g, dtype=torch.float64)
    theirs = jd.Constant(w)(J)
    atol = 1e-12 * float(J.abs().max())
    torch.testing.assert_close(Constant(w)(J), theirs, rtol=1e-12, atol=atol)
