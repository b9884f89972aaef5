"""CGC against a float64 reference of the gate equations; partition, gradient flow, training,
state."""

from __future__ import annotations

import pytest
import torch
from nn_checks import (
    check_gradient_flow,
    check_partition,
    check_step_matches_aggregation,
    regression_losses,
)
from nn_model_checks import check_state_dict_round_trip, check_training_with_model
from torch import nn

from mtlgrad.aggregators import PCGrad, UPGrad
from mtlgrad.nn import CGC

TASKS = ["ctr", "cvr", "share"]
OWN_EXPERTS = {"ctr": 2, "cvr": 1, "share": 0}


def expert() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU())


def make_model(seed: int = 0) -> CGC:
    torch.manual_seed(seed)
    shared = [expert() for _ in range(2)]
    own = {name: [expert() for _ in range(OWN_EXPERTS[name])] for name in TASKS}
    towers = {name: nn.Linear(4, 1) for name in TASKS}
    return CGC(shared, own, towers, in_features=5).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def linear_relu(module: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(module[0].weight @ v + module[0].bias, min=0)


def test_forward_matches_the_gate_equations():
    model = make_model()
    x, _ = problem()
    got = model(x)
    for name in TASKS:
        W = model.gates[name].weight  # (m_k + m_s) x d, no bias
        assert W.shape == (OWN_EXPERTS[name] + 2, 5)
        experts = list(model.task_experts[name]) + list(model.shared_experts)  # own first
        tower = model.towers[name]
        for i in range(x.shape[0]):
            logits = W @ x[i]
            w = torch.exp(logits - logits.max())
            w = w / w.sum()
            mixture = sum(w[e] * linear_relu(experts[e], x[i]) for e in range(len(experts)))
            torch.testing.assert_close(got[name][i], tower.weight @ mixture + tower.bias)
    gates = model.gate_weights(x)
    assert gates["ctr"].shape == (12, 4) and gates["share"].shape == (12, 2)
    torch.testing.assert_close(gates["cvr"].sum(-1), torch.ones(12, dtype=torch.float64))


def test_shapes_and_sequence_inputs():
    model = make_model()
    x = torch.randn(2, 7, 5, dtype=torch.float64)  # (batch, positions, features)
    out = model(x)
    assert all(out[name].shape == (2, 7, 1) for name in TASKS)
    torch.testing.assert_close(out["cvr"], model(x.reshape(14, 5))["cvr"].reshape(2, 7, 1))


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    ids = {id(p) for p in model.shared_parameters()}
    assert ids == {id(p) for p in model.shared_experts.parameters()}
    own = {id(p) for p in model.task_parameters("ctr")}
    expected = [model.task_experts["ctr"], model.gates["ctr"], model.towers["ctr"]]
    assert own == {id(p) for m in expected for p in m.parameters()}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


def test_step_is_the_aggregation():
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model()
    x, losses = problem()
    check_training_with_model(model, x, losses, PCGrad(generator=torch.Generator().manual_seed(0)))


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)


def test_errors():
    towers = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}
    own = {"a": [nn.Linear(5, 4)], "b": []}
    with pytest.raises(ValueError, match="shared_experts must hold at least 1 module"):
        CGC([], own, towers, in_features=5)
    with pytest.raises(
        ValueError, match=r"task_experts must have one entry per task.*missing \['b'\]"
    ):
        CGC([nn.Linear(5, 4)], {"a": []}, towers, in_features=5)
    with pytest.raises(TypeError, match=r"task_experts\['a'\]\[0\] must be an nn.Module"):
        CGC([nn.Linear(5, 4)], {"a": ["x"], "b": []}, towers, in_features=5)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        CGC([nn.Linear(5, 4), nn.Linear(5, 4)], own, towers, in_features=0)
    with pytest.raises(ValueError, match="task 'b'.s gate has a single expert to mix"):
        CGC([nn.Linear(5, 4)], own, towers, in_features=5)
    shared = nn.Linear(5, 4)
    with pytest.raises(ValueError, match="belongs to both the shared parameters and task 'a'"):
        CGC([shared, nn.Linear(5, 4)], {"a": [shared], "b": []}, towers, in_features=5)
    model = CGC([nn.Linear(5, 3), nn.Linear(5, 3)], own, towers, in_features=5)
    with pytest.raises(ValueError, match="task 'a'.s and the shared experts give outputs of"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="the gates take in_features=5"):
        model(torch.randn(2, 4))
