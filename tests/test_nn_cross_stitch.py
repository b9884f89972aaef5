"""CrossStitch: the units against a float64 reference of Eq. 1, initialisation, partition,
gradient flow and training."""

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
from mtlgrad.nn import CrossStitch, CrossStitchUnit

TASKS = ["a", "b", "c"]


def conv_model(per_channel: bool = True, seed: int = 0) -> CrossStitch:
    torch.manual_seed(seed)
    columns = {
        name: [
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4), nn.Tanh()),
        ]
        for name in TASKS
    }
    heads = {name: nn.Linear(4, 1) for name in TASKS}
    return CrossStitch(
        columns, heads, stitch_after=[0, 1], channels=[4, 4] if per_channel else None
    ).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(6, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def test_unit_matches_equation_1():
    g = torch.Generator().manual_seed(0)
    unit = CrossStitchUnit(3, channels=4).double()
    with torch.no_grad():
        unit.alpha.copy_(torch.randn(4, 3, 3, generator=g, dtype=torch.float64))
    xs = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    out = unit(xs)
    for t in range(3):
        expected = torch.zeros_like(xs[0])
        for c in range(4):
            for s in range(3):
                expected[:, c] += unit.alpha[c, t, s].detach() * xs[s][:, c]
        torch.testing.assert_close(out[t], expected)
    layer_unit = CrossStitchUnit(2).double()
    ys = [torch.randn(5, 7, dtype=torch.float64) for _ in range(2)]
    out = layer_unit(ys)
    torch.testing.assert_close(out[0], 0.9 * ys[0] + 0.1 * ys[1])
    torch.testing.assert_close(out[1], 0.1 * ys[0] + 0.9 * ys[1])


def test_initialisation():
    assert torch.equal(CrossStitchUnit(2).alpha, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    alpha = CrossStitchUnit(3, channels=2, alpha_self=0.8).alpha
    assert alpha.shape == (2, 3, 3)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(alpha[1, 0, 2], torch.tensor(0.1))
    alpha = CrossStitchUnit(3, alpha_self=1.0, alpha_other=0.0).alpha
    assert torch.equal(alpha, torch.eye(3))


def test_identity_stitches_give_independent_columns():
    model = conv_model()
    for unit in model.stitches:
        with torch.no_grad():
            unit.alpha.copy_(torch.eye(3).expand_as(unit.alpha))
    x, _ = problem()
    outputs = model(x)
    for name in TASKS:
        h = x
        for stage in model.columns[name]:
            h = stage(h)
        torch.testing.assert_close(outputs[name], model.heads[name](h))


@pytest.mark.parametrize("per_channel", [True, False])
def test_partition_and_gradient_flow(per_channel):
    model = conv_model(per_channel)
    check_partition(model)
    # Stages 0 and 1 of every column (stitched) are shared; stage 2 and the head are the task's.
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.stitch_parameters()} <= shared
    assert {id(p) for p in model.columns["b"][1].parameters()} <= shared
    own = {id(p) for p in model.task_parameters("b")}
    assert {id(p) for p in model.columns["b"][2].parameters()} <= own
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(1))]
)
def test_step_is_the_aggregation(aggregator):
    model = conv_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_lowers_the_losses():
    model = conv_model()
    x, losses = problem()
    check_training(model, x, losses, UPGrad())


def test_errors():
    cols = {"a": [nn.Linear(2, 2)], "b": [nn.Linear(2, 2), nn.Linear(2, 2)]}
    heads = {"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)}
    with pytest.raises(ValueError, match="the column of task 'b' has 2 stages"):
        CrossStitch(cols, heads)
    cols = {"a": [nn.Linear(2, 2)], "b": [nn.Linear(2, 2)]}
    with pytest.raises(ValueError, match=r"heads must have one entry per task .*missing \['b'\]"):
        CrossStitch(cols, {"a": nn.Linear(2, 1)})
    with pytest.raises(ValueError, match="stitch_after has stage 3"):
        CrossStitch(cols, heads, stitch_after=[3])
    with pytest.raises(ValueError, match="channels has 2 entries for 1 stitched stages"):
        CrossStitch(cols, heads, channels=[2, 2])
    model = CrossStitch({"a": [nn.Linear(2, 2)], "b": [nn.Linear(2, 3)]}, heads)
    with pytest.raises(ValueError, match="stage 0 gives activations of different shapes"):
        model(torch.randn(4, 2))
    model = CrossStitch(cols, heads, channels=[5])
    with pytest.raises(ValueError, match=r"expected activations of shape \(N, 5, ...\)"):
        model(torch.randn(4, 2))
