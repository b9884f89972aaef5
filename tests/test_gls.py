"""GLS (Chennupati et al. 2019) against a float64 reference of the geometric mean."""

from __future__ import annotations

import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import GLS


def reference(values: list[float]) -> tuple[float, list[float]]:
    """(Π_t L_t)^(1/T) from the plain product, and the hand-computed gradient weights
    ∂G/∂L_t = G / (T L_t)."""
    T = len(values)
    G = math.prod(values) ** (1 / T)
    return G, [G / (T * v) for v in values]


@pytest.mark.parametrize("T", [1, 2, 3, 7])
def test_matches_the_reference(T: int) -> None:
    for values in loss_vectors(T, 4, seed=T):
        losses = values.clone().requires_grad_()
        weighting = GLS(T)
        out = weighting(losses)
        expected, weights = reference(values.tolist())
        assert out.item() == pytest.approx(expected, rel=1e-14)
        out.backward()
        assert losses.grad.tolist() == pytest.approx(weights, rel=1e-13)
        assert weighting.weights.tolist() == pytest.approx(weights, rel=1e-13)


def test_single_task_is_the_loss() -> None:
    loss = torch.tensor(3.25, dtype=torch.float64, requires_grad=True)
    out = GLS(1)([loss])
    assert out.item() == pytest.approx(3.25, rel=1e-15)
    out.backward()
    assert loss.grad.item() == pytest.approx(1.0, rel=1e-15)


def test_scaling_one_loss() -> None:
    # c L_t gives c^(1/T) G: the units of one loss only scale the objective.
    values = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)
    base = GLS(3)(values).item()
    for t, c in [(0, 1e3), (2, 1e-4), (1, 7.0)]:
        scaled = values.clone()
        scaled[t] *= c
        assert GLS(3)(scaled).item() == pytest.approx(c ** (1 / 3) * base, rel=1e-13)
    # The larger loss gets the smaller weight, in proportion.
    weighting = GLS(3)
    weighting(values)
    ratios = (weighting.weights * values).tolist()
    assert ratios == pytest.approx([base / 3] * 3, rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1e-30, 1e30])
def test_extreme_losses_do_not_overflow(dtype: torch.dtype, value: float) -> None:
    # The product of four such losses is 1e±120: out of float32's range, not the geometric mean.
    losses = torch.tensor([value, value, 2 * value, 0.5 * value], dtype=dtype, requires_grad=True)
    weighting = GLS(4)
    out = weighting(losses)
    assert out.dtype == dtype
    assert out.item() == pytest.approx(value, rel=1e-5)
    out.backward()
    expected = [1 / 4, 1 / 4, 1 / 8, 1 / 2]
    assert losses.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert weighting.weights.tolist() == pytest.approx(expected, rel=1e-5)


def test_mixed_extremes() -> None:
    losses = torch.tensor([1e-30, 1e30], dtype=torch.float32)
    assert GLS(2)(losses).item() == pytest.approx(1.0, rel=1e-5)


def test_dict_losses_and_state() -> None:
    out = GLS(2)({"seg": torch.tensor(4.0), "depth": torch.tensor(9.0)})
    assert out.item() == pytest.approx(6.0, rel=1e-6)
    assert GLS(3).state_dict() == {} and list(GLS(3).parameters()) == []
    losses = loss_vectors(3, 6)
    assert_resumes_identically(lambda: GLS(3), lambda w, i: w(losses[i]), before=3, after=3)


@pytest.mark.parametrize(
    ("value", "shown"), [(0.0, "0.0"), (-0.5, "-0.5"), (math.nan, "nan"), (math.inf, "inf")]
)
def test_bad_loss_raises_naming_the_task(value: float, shown: str) -> None:
    weighting = GLS(3)
    weighting(torch.tensor([1.0, 2.0, 3.0]))
    before = weighting.weights.clone()
    losses = {"seg": torch.tensor(1.0), "depth": torch.tensor(value), "normals": torch.tensor(2.0)}
    with pytest.raises(
        ValueError, match=f"GLS: the loss of 'depth' must be positive and finite, got {shown}"
    ):
        weighting(losses)
    assert torch.equal(weighting.weights, before)


def test_repr_and_errors() -> None:
    assert repr(GLS(3)) == "GLS(num_tasks=3)"
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        GLS(0)
    with pytest.raises(ValueError, match="GLS: expected 2 task losses, got 3"):
        GLS(2)(torch.ones(3))
