"""MultiTaskModel (hard parameter sharing): partition, gradient flow, training, features engine."""

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

import mtlgrad
from mtlgrad.aggregators import MGDA, PCGrad, Sum, UPGrad
from mtlgrad.nn import MultiTaskModel

TASKS = ["a", "b", "c"]


def make_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    return MultiTaskModel(trunk, {name: nn.Linear(8, 1) for name in TASKS}).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(16, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def test_forward_returns_one_output_per_task():
    model = make_model()
    x, _ = problem()
    outputs, z = model(x, return_features=True)
    assert list(outputs) == TASKS
    torch.testing.assert_close(z, model.trunk(x))
    for name in TASKS:
        torch.testing.assert_close(outputs[name], model.heads[name](z))
    assert list(model(x)) == TASKS


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.trunk.parameters()}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(3))]
)
def test_step_is_the_aggregation(aggregator):
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_lowers_the_losses():
    model = make_model()
    x, losses = problem()
    check_training(model, x, losses, UPGrad())


def test_features_engine_equals_full_gradient_for_sum():
    model = make_model()
    x, losses = problem()
    mtlgrad.backward(losses(model(x)), shared_params=model.shared_parameters(), aggregator=Sum())
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    outputs, z = model(x, return_features=True)
    mtlgrad.backward(
        losses(outputs), features=z, shared_params=model.shared_parameters(), aggregator=Sum()
    )
    for p, expected in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aggregator", [UPGrad(), MGDA()])
def test_features_engine_runs_for_other_aggregators(aggregator):
    # The trunk's gradient is the backward through the trunk of the aggregation of the task
    # gradients with respect to z.
    model = make_model()
    x, losses = problem()
    outputs, z = model(x, return_features=True)
    values = list(losses(outputs).values())
    dz = [torch.autograd.grad(v, z, retain_graph=True)[0] for v in values]
    combined = aggregator(torch.stack([d.reshape(-1) for d in dz])).reshape(z.shape)
    expected = torch.autograd.grad(z, list(model.trunk.parameters()), combined)

    outputs, z = model(x, return_features=True)
    record = mtlgrad.backward(
        losses(outputs), features=z, shared_params=model.shared_parameters(), aggregator=aggregator
    )
    assert record.weights.shape == (3,)
    for p, e in zip(model.trunk.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-10)
    for name in TASKS:
        for p in model.heads[name].parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_errors():
    trunk = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="heads must be a dict"):
        MultiTaskModel(trunk, [nn.Linear(2, 1)])
    with pytest.raises(TypeError, match="the head of task 'a' must be an nn.Module"):
        MultiTaskModel(trunk, {"a": "linear"})
    with pytest.raises(ValueError, match="no tasks"):
        MultiTaskModel(trunk, {})
    with pytest.raises(ValueError, match="belongs to both the shared parameters and task 'a'"):
        MultiTaskModel(trunk, {"a": trunk})
    shared_head = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="task 'a' and task 'b'"):
        MultiTaskModel(trunk, {"a": shared_head, "b": shared_head})
    model = MultiTaskModel(trunk, {"a": nn.Linear(2, 1)})
    with pytest.raises(KeyError, match=r"unknown task 'b'; the tasks are \['a'\]"):
        list(model.task_parameters("b"))


def test_task_name_errors():
    trunk = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"task name 'a\.b' contains '\.'"):
        MultiTaskModel(trunk, {"a.b": nn.Linear(2, 1)})
    with pytest.raises(TypeError, match="task names must be non-empty strings"):
        MultiTaskModel(trunk, {0: nn.Linear(2, 1)})
