"""UncertaintyWeighting (Kendall et al. 2018) against a float64 reference of Eq. 7 and 10."""

from __future__ import annotations

import math

import pytest
import torch

from mtlgrad.weighting import UncertaintyWeighting


def reference(losses: list[float], log_vars: list[float], kinds: list[str]) -> float:
    total = 0.0
    for loss, s, kind in zip(losses, log_vars, kinds):
        sigma2 = math.exp(s)
        # Eq. 7 (regression): L / (2 σ²) + log σ; Eq. 10 (classification): L / σ² + log σ.
        factor = 0.5 if kind == "regression" else 1.0
        total += factor * loss / sigma2 + math.log(math.sqrt(sigma2))
    return total


KINDS = ["regression", "classification", ["regression", "classification"]]


@pytest.mark.parametrize("kinds", KINDS)
def test_matches_paper(kinds):
    weighting = UncertaintyWeighting(2, kinds=kinds).double()
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -1.2], dtype=torch.float64))
    losses = [torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)]
    out = weighting(losses)
    kinds_list = [kinds] * 2 if isinstance(kinds, str) else kinds
    assert out.item() == pytest.approx(reference([2.5, 0.7], [0.3, -1.2], kinds_list), rel=1e-12)
    factors = torch.tensor([0.5 if k == "regression" else 1.0 for k in kinds_list])
    expected_weights = factors.double() * torch.exp(-torch.tensor([0.3, -1.2], dtype=torch.float64))
    torch.testing.assert_close(weighting.weights, expected_weights)


def test_optimal_variance_is_the_loss():
    # For a regression task, d/ds (½ e^{-s} L + ½ s) = 0 at e^s = L.
    weighting = UncertaintyWeighting(3)
    losses = torch.tensor([0.1, 1.0, 10.0])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()
    torch.testing.assert_close(weighting.log_vars.exp(), losses, rtol=1e-3, atol=1e-4)


def test_state_round_trip():
    a = UncertaintyWeighting(2, init=0.5)
    b = UncertaintyWeighting(2)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.log_vars, a.log_vars)


def test_errors_name_the_task():
    weighting = UncertaintyWeighting(2)
    with pytest.raises(ValueError, match="expected 2 task losses, got 3"):
        weighting([torch.tensor(1.0)] * 3)
    with pytest.raises(ValueError, match="'depth'"):
        weighting({"seg": torch.tensor(1.0), "depth": torch.ones(2)})
    with pytest.raises(ValueError, match=r"kinds\[1\]"):
        UncertaintyWeighting(2, kinds=["regression", "ranking"])
    with pytest.raises(ValueError, match="num_tasks"):
        UncertaintyWeighting(0)


def test_noisier_tasks_learn_larger_variances():
    # Shared linear trunk, three linear regression tasks with noise standard deviations 0.1, 0.5
    # and 1.5: at the optimum σ_t² is the task's loss, i.e. its noise variance.
    torch.manual_seed(0)
    noise = torch.tensor([0.1, 0.5, 1.5])
    x = torch.randn(512, 4)
    coefficients = torch.randn(4, 3)
    y = x @ coefficients + noise * torch.randn(512, 3)
    trunk = torch.nn.Linear(4, 8)
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3))
    weighting = UncertaintyWeighting(3)
    params = [*trunk.parameters(), *heads.parameters(), *weighting.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.03)
    for _ in range(300):
        optimizer.zero_grad()
        z = trunk(x)
        losses = [((head(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in enumerate(heads)]
        weighting(losses).backward()
        optimizer.step()
    variances = weighting.log_vars.detach().exp()
    assert variances[0] < variances[1] < variances[2]
    torch.testing.assert_close(variances, noise**2, rtol=0.3, atol=0)
    # The weights order the other way: the noisiest task counts least.
    assert weighting.weights[0] > weighting.weights[1] > weighting.weights[2]
