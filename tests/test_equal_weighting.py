"""Equal: the plain sum of the losses."""

from __future__ import annotations

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import Equal


def test_is_the_sum() -> None:
    values = [0.25, 3.0, 40.0]
    losses = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = Equal(3)(losses)
    assert out.item() == sum(values)
    out.backward()
    assert [loss.grad.item() for loss in losses] == [1.0, 1.0, 1.0]


def test_inputs_and_weights() -> None:
    weighting = Equal(2)
    a = weighting({"seg": torch.tensor(1.5), "depth": torch.tensor(2.0)})
    b = weighting(torch.tensor([1.5, 2.0]))
    assert a.item() == b.item() == 3.5
    torch.testing.assert_close(weighting.weights, torch.ones(2))


def test_state_and_repr() -> None:
    losses = loss_vectors(4, 6)
    assert_resumes_identically(lambda: Equal(4), lambda w, i: w(losses[i]), before=3, after=3)
    assert list(Equal(4).state_dict()) == []
    assert repr(Equal(4)) == "Equal(num_tasks=4)"


def test_errors() -> None:
    with pytest.raises(ValueError, match="expected 2 task losses, got 1"):
        Equal(2)([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        Equal(0)
