"""Constant: fixed user weights."""

from __future__ import annotations

import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import Constant


def test_matches_the_weighted_sum() -> None:
    weights, values = [0.5, 0.0, 2.0], [3.0, 100.0, 0.125]
    losses = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = Constant(weights)(losses)
    assert out.item() == pytest.approx(sum(w * v for w, v in zip(weights, values)), rel=1e-15)
    out.backward()
    assert [loss.grad.item() for loss in losses] == weights


def test_tensor_weights_and_dtypes() -> None:
    weighting = Constant(torch.tensor([1.0, 3.0]))
    assert weighting.num_tasks == 2
    out = weighting(torch.tensor([2.0, 1.0], dtype=torch.float32))
    assert out.dtype == torch.float32 and out.item() == 5.0
    torch.testing.assert_close(weighting.weights, torch.tensor([1.0, 3.0]))


def test_state_and_repr() -> None:
    losses = loss_vectors(3, 4)
    assert_resumes_identically(
        lambda: Constant([1, 2, 3]), lambda w, i: w(losses[i]), before=2, after=2
    )
    assert repr(Constant([1, 0.5])) == "Constant(weights=[1.0, 0.5])"


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ([1.0, -1.0], ValueError, r"weights\[1\] must be finite and non-negative, got -1.0"),
        ([math.nan], ValueError, r"weights\[0\] must be finite and non-negative, got nan"),
        ([1.0, math.inf], ValueError, r"weights\[1\] must be finite and non-negative, got inf"),
        ([], ValueError, "weights must hold one weight per task, got none"),
        ([1.0, "2"], TypeError, r"weights\[1\] must be a number, got str"),
        (torch.ones(2, 2), ValueError, r"weights must be 1-D \(one per task\), got shape \(2, 2\)"),
        (3.0, TypeError, "weights must be a sequence of numbers, got float"),
    ],
)
def test_errors(weights, error, message) -> None:
    with pytest.raises(error, match=message):
        Constant(weights)


def test_loss_count_error() -> None:
    with pytest.raises(ValueError, match="Constant: expected 2 task losses, got 3"):
        Constant([1.0, 1.0])(torch.ones(3))
