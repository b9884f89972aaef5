"""Small multi-task models and aggregator factories for the training-integration tests."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mtlgrad import aggregators
from mtlgrad.aggregators import GramAggregator


class TwoHeadNet(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self, tasks: int = 3, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(
            nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def task_losses(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    """Differently scaled regression losses, so the task gradients differ and conflict."""
    return [((o - (t + 1) * y[:, t]) ** 2).mean() * (t + 1) for t, o in enumerate(outputs)]


def batch(seed: int, tasks: int = 3, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, tasks, generator=g)
    return x, y


def make_aggregator(cls: type, seed: int = 0, tasks: int = 3) -> GramAggregator:
    """An instance with defaults, main task 0 for auxiliary methods, alpha = 1 for FairGrad, no
    Byzantine task for Krum, UPGrad inside CRMOGM,
    distinct weights for the ``tasks`` tasks of Constant, a seeded generator for randomised
    ones."""
    params = inspect.signature(cls).parameters
    # The arguments some methods have no default for.
    required = {"main": 0, "alpha": 1.0, "weights": [1.0 + 0.5 * t for t in range(tasks)]}
    kwargs = {
        name: value
        for name, value in required.items()
        if name in params and params[name].default is inspect.Parameter.empty
    }
    if "n_byzantine" in params:  # Krum: no Byzantine task, so that 3 tasks suffice
        kwargs["n_byzantine"] = 0
    if "aggregator" in params:  # CRMOGM: smoothing UPGrad's weights
        kwargs["aggregator"] = aggregators.UPGrad()
    if "generator" in params:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return cls(**kwargs)


def gram_aggregator_classes() -> list[type]:
    classes = []
    for name in aggregators.__all__:
        obj = getattr(aggregators, name)
        if isinstance(obj, type) and issubclass(obj, GramAggregator) and obj is not GramAggregator:
            classes.append(obj)
    return classes


class NoVmap(torch.autograd.Function):
    """Doubles its input; its backward reads a value on the host, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum().item() != 0.5) * 2
