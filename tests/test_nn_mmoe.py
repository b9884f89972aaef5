"""MMoE against a float64 reference of Eq. 5-6; partition, gradient flow, training."""

from __future__ import annotations

import pytest
import torch
from nn_checks import (
    check_gradient_flow,
    check_partition,
    check_step_matches_aggregation,
    check_training,
    regression_losses,
)
from torch import nn

from mtlgrad.aggregators import PCGrad, UPGrad
from mtlgrad.nn import MMoE

TASKS = ["click", "like", "share"]


def make_model(seed: int = 0) -> MMoE:
    torch.manual_seed(seed)
    experts = [nn.Sequential(nn.Linear(5, 4), nn.ReLU()) for _ in range(3)]
    towers = {name: nn.Linear(4, 1) for name in TASKS}
    return MMoE(experts, towers, in_features=5).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def test_forward_matches_equations_5_and_6():
    model = make_model()
    x, _ = problem()
    got = model(x)
    for name in TASKS:
        W = model.gates[name].weight  # n x d, no bias
        for i in range(x.shape[0]):
            logits = W @ x[i]
            g = torch.exp(logits) / torch.exp(logits).sum()
            mixture = sum(g[e] * model.experts[e](x[i : i + 1])[0] for e in range(3))
            torch.testing.assert_close(got[name][i], model.towers[name](mixture))
    gates = model.gate_weights(x)
    torch.testing.assert_close(gates["like"].sum(-1), torch.ones(12, dtype=torch.float64))


def test_sequence_inputs():
    model = make_model()
    x = torch.randn(2, 7, 5, dtype=torch.float64)  # (batch, positions, features)
    got = model(x)["share"]
    expected = model(x.reshape(14, 5))["share"].reshape(2, 7, 1)
    torch.testing.assert_close(got, expected)


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.experts.parameters()}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(1))]
)
def test_step_is_the_aggregation(aggregator):
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_lowers_the_losses():
    model = make_model()
    x, losses = problem()
    check_training(model, x, losses, PCGrad(generator=torch.Generator().manual_seed(0)))


def test_errors():
    towers = {"a": nn.Linear(4, 1)}
    with pytest.raises(ValueError, match="no experts"):
        MMoE([], towers, in_features=5)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        MMoE([nn.Linear(5, 4)], towers, in_features=0)
    model = MMoE([nn.Linear(5, 4), nn.Linear(5, 3)], {"a": nn.Identity()}, in_features=5)
    with pytest.raises(ValueError, match="the experts give outputs of different shapes"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="the gates take in_features=5"):
        model(torch.randn(2, 4))
