"""DWA (Liu, Johns & Davison 2019) against a float64 reference of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import DWA


def reference_weights(epochs: list[list[list[float]]], temperature: float) -> list[list[float]]:
    """The weights of every epoch (1-based t in the paper): 1 for t = 1, 2, then
    w_k(t) = K exp(r_k / T) / Σ_i exp(r_i / T) with r_k = L_k(t-1) / L_k(t-2), L the epoch means."""
    K = len(epochs[0][0])
    means = [[sum(step[k] for step in epoch) / len(epoch) for k in range(K)] for epoch in epochs]
    out = []
    for t in range(len(epochs)):
        if t < 2:
            out.append([1.0] * K)
            continue
        r = [means[t - 1][k] / means[t - 2][k] for k in range(K)]
        e = [math.exp(v / temperature) for v in r]
        out.append([K * v / sum(e) for v in e])
    return out


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_matches_the_reference(temperature: float) -> None:
    K, num_epochs, steps = 3, 5, 4
    losses = loss_vectors(K, num_epochs * steps, seed=1)
    # Make the rates differ a lot between tasks and epochs.
    losses = [
        v * torch.tensor([0.5**i, 0.9**i, 1.0], dtype=torch.float64) for i, v in enumerate(losses)
    ]
    epochs = [[losses[e * steps + s].tolist() for s in range(steps)] for e in range(num_epochs)]
    expected = reference_weights(epochs, temperature)
    weighting = DWA(K, temperature=temperature)
    for e in range(num_epochs):
        for s in range(steps):
            values = losses[e * steps + s]
            out = weighting(values)
            assert weighting.weights.tolist() == pytest.approx(expected[e], rel=1e-13)
            reference = sum(w * v for w, v in zip(expected[e], values.tolist()))
            assert out.item() == pytest.approx(reference, rel=1e-13)
        new = weighting.end_epoch()
        if e + 1 < num_epochs:
            assert new.tolist() == pytest.approx(expected[e + 1], rel=1e-13)
    assert abs(sum(expected[-1]) - K) < 1e-12 and expected[-1] != pytest.approx([1.0] * K, rel=0.01)


def test_gradient_is_the_weights() -> None:
    weighting = DWA(2)
    for values in ([2.0, 1.0], [1.0, 1.0], [0.5, 0.9]):
        weighting(torch.tensor(values, dtype=torch.float64))
        weighting.end_epoch()
    losses = torch.tensor([0.4, 0.8], dtype=torch.float64, requires_grad=True)
    weighting(losses).backward()
    torch.testing.assert_close(losses.grad, weighting.weights)
    r = [0.5 / 1.0, 0.9 / 1.0]
    e = [math.exp(v / 2) for v in r]
    assert losses.grad.tolist() == pytest.approx([2 * v / sum(e) for v in e], rel=1e-14)


def test_eval_mode_does_not_record() -> None:
    weighting = DWA(2)
    weighting(torch.tensor([1.0, 2.0]))
    weighting.eval()
    weighting(torch.tensor([100.0, 100.0]))
    weighting.train()
    weighting.end_epoch()
    torch.testing.assert_close(
        weighting.last_average, torch.tensor([1.0, 2.0], dtype=torch.float64)
    )


def test_state_round_trip_mid_epoch() -> None:
    losses = loss_vectors(3, 24, seed=2)
    losses = [
        v * (0.8 ** torch.arange(3.0, dtype=torch.float64)) ** i for i, v in enumerate(losses)
    ]

    def step(weighting: DWA, i: int) -> torch.Tensor:
        out = weighting(losses[i])
        if i % 4 == 3:
            weighting.end_epoch()
        return out

    # 13 steps: three epochs ended (the weights have moved) and one step into the fourth.
    assert_resumes_identically(lambda: DWA(3), step, before=13, after=11)
    state = DWA(3).state_dict()
    assert sorted(state) == ["epoch_weights", "last_average", "loss_sum", "num_epochs", "num_steps"]


def test_repr_and_errors() -> None:
    assert repr(DWA(3)) == "DWA(num_tasks=3, temperature=2.0)"
    with pytest.raises(ValueError, match="temperature must be a positive number, got -1"):
        DWA(2, temperature=-1)
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        DWA(2, temperature=0)
    with pytest.raises(ValueError, match="no losses were recorded in this epoch"):
        DWA(2).end_epoch()
    weighting = DWA(2)
    weighting({"seg": torch.tensor(1.0), "depth": torch.tensor(-0.5)})
    with pytest.raises(
        ValueError, match="epoch-average loss of 'depth' must be positive and finite, got -0.5"
    ):
        weighting.end_epoch()
    with pytest.raises(ValueError, match="DWA: expected 2 task losses, got 1"):
        DWA(2)([torch.tensor(1.0)])
