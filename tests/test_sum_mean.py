from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_permutation_invariant,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import Mean, Sum


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
@pytest.mark.parametrize("agg", [Sum(), Mean()], ids=repr)
def test_properties(agg, J: torch.Tensor) -> None:
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values(dtype: torch.dtype) -> None:
    J = torch.randn(5, 1000, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(Sum()(J), J.sum(0))
    torch.testing.assert_close(Mean()(J), J.mean(0))


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(Sum()(J), J[0])
    torch.testing.assert_close(Mean()(J), J[0])


def test_repr_and_state() -> None:
    assert repr(Sum()) == "Sum()"
    assert Mean().state_dict() == {}
    with pytest.raises(ValueError, match="unexpected state"):
        Mean().load_state_dict({"x": 1})


def test_inputs_that_require_grad_are_detached() -> None:
    # Aggregators are not differentiable (the base classes' contract): no graph to backpropagate.
    J = torch.randn(3, 10, requires_grad=True)
    for agg in (Sum(), Mean()):
        assert agg(J).grad_fn is None and not agg(J).requires_grad
        w = agg.weights((J @ J.T).double())
        assert w.grad_fn is None and not w.requires_grad


def test_bad_matrix() -> None:
    with pytest.raises(ValueError, match=r"expects a matrix J of shape \(T, P\)"):
        Sum()(torch.ones(3))
    with pytest.raises(ValueError, match="square T x T Gram matrix"):
        Sum().weights(torch.ones(2, 3))
