"""TaskBatchNorm: separate statistics per task, conversion that preserves the model, the
parameter partition and training of a TaskBatchNormModel."""

from __future__ import annotations

import copy

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
from mtlgrad.nn import (
    TaskBatchNorm,
    TaskBatchNormModel,
    convert_task_batchnorm,
    task_batchnorm_parameters,
    use_task,
)

TASKS = ["day", "night"]


def network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.BatchNorm1d(3),
        nn.Linear(3, 1),
    ).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(6, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def trained_original() -> nn.Module:
    """A network whose batch norms have non-trivial affine parameters and running statistics."""
    original = network()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
        for _ in range(3):
            original(3 + 2 * torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64))
    return original


def test_conversion_preserves_the_model_in_eval_mode():
    original = trained_original().eval()
    converted = convert_task_batchnorm(copy.deepcopy(original), TASKS).eval()
    assert not any(
        isinstance(m, nn.BatchNorm2d) and not _inside_task_bn(converted, m)
        for m in converted.modules()
    )
    assert sum(isinstance(m, TaskBatchNorm) for m in converted.modules()) == 3
    x, _ = problem()
    expected = original(x)
    for name in TASKS:
        with use_task(converted, name):
            torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def _inside_task_bn(model: nn.Module, module: nn.Module) -> bool:
    return any(
        module is bn
        for m in model.modules()
        if isinstance(m, TaskBatchNorm)
        for bn in m.norms.values()
    )


def test_statistics_are_separate_per_task():
    model = TaskBatchNormModel(network(), TASKS)
    first = next(m for m in model.modules() if isinstance(m, TaskBatchNorm))
    g = torch.Generator().manual_seed(0)
    day = 5 + torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
    night = -5 + torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
    with use_task(model.model, "day"):
        model.model(day)
    assert first.norms["day"].num_batches_tracked == 1
    assert first.norms["night"].num_batches_tracked == 0
    torch.testing.assert_close(
        first.norms["night"].running_mean, torch.zeros(4, dtype=torch.float64)
    )
    assert first.norms["day"].running_mean.abs().sum() > 0
    # One forward per task on its own batch: each batch norm sees only its task's data. Night's
    # first update from zero is momentum (0.1) times the batch mean of its input.
    model({"day": day, "night": night})
    expected = 0.1 * model.model[0](night).mean(dim=(0, 2, 3))
    torch.testing.assert_close(first.norms["night"].running_mean, expected.detach())
    assert first.norms["day"].num_batches_tracked == 2
    assert first.norms["night"].num_batches_tracked == 1


def test_partition_and_gradient_flow():
    heads = {name: nn.Linear(1, 1).double() for name in TASKS}
    model = TaskBatchNormModel(network(), TASKS, heads=heads)
    check_partition(model)
    bn_day = {id(p) for p in task_batchnorm_parameters(model.model, "day")}
    assert len(bn_day) == 6  # weight and bias of three batch norms
    assert bn_day <= {id(p) for p in model.task_parameters("day")}
    assert id(model.model[0].weight) in {id(p) for p in model.shared_parameters()}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(1))]
)
def test_step_is_the_aggregation(aggregator):
    model = TaskBatchNormModel(network(), TASKS)
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_lowers_the_losses():
    model = TaskBatchNormModel(network(), TASKS)
    x, losses = problem()
    check_training(model, x, losses, UPGrad())


def test_active_task_handling():
    bn = TaskBatchNorm(TASKS, 3, dims=1)
    with pytest.raises(RuntimeError, match="no active task"):
        bn(torch.randn(4, 3))
    bn.set_task("night")
    model = nn.Sequential(bn)
    with use_task(model, "day"):
        assert bn.task == "day"
    assert bn.task == "night"  # restored
    with pytest.raises(KeyError, match=r"unknown task 'dusk'; the tasks are \['day', 'night'\]"):
        bn.set_task("dusk")
    with pytest.raises(KeyError, match="unknown task 'dusk'"):
        task_batchnorm_parameters(model, "dusk")


def test_from_batchnorm_copies_weights_and_statistics():
    bn = nn.BatchNorm3d(2)
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.running_var.fill_(4.0)
    converted = convert_task_batchnorm(bn, TASKS)
    assert isinstance(converted, TaskBatchNorm)
    for name in TASKS:
        copy_ = converted.norms[name]
        assert isinstance(copy_, nn.BatchNorm3d)
        assert copy_.weight is not bn.weight
        torch.testing.assert_close(copy_.weight, bn.weight)
        torch.testing.assert_close(copy_.running_var, bn.running_var)
    with pytest.raises(TypeError, match="expected an nn.BatchNorm1d/2d/3d, got Linear"):
        TaskBatchNorm.from_batchnorm(nn.Linear(2, 2), TASKS)


def test_errors():
    with pytest.raises(ValueError, match="the model has no nn.BatchNorm1d/2d/3d"):
        TaskBatchNormModel(nn.Linear(2, 2), TASKS)
    converted = convert_task_batchnorm(network(), ["a", "b"])
    with pytest.raises(ValueError, match=r"has tasks \['a', 'b'\], expected \['day', 'night'\]"):
        TaskBatchNormModel(converted, TASKS)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        TaskBatchNorm(TASKS, 3, dims=4)
