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
    Byzantine task for Krum, UPGrad inside CRMOGM, the ``tasks`` losses read as 2 (or else 3)
    sub-batches for the double-sampling methods,
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
    if "num_tasks" in params:  # MoDo, SDMGrad: the losses are 2 or 3 sub-batches of T tasks
        if tasks % 2 and tasks % 3:
            raise ValueError(f"{cls.__name__} needs 2 T or 3 T losses, not {tasks}")
        kwargs["num_tasks"] = tasks // 2 if tasks % 2 == 0 else tasks // 3
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


def sub_batch_losses(
    trunk: nn.Module, heads: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, samples: int
) -> dict[str, torch.Tensor]:
    """The losses of a double-sampling step (MoDo, SDMGrad): the batch split into ``samples``
    sub-batches, and every task's loss on each, sample-major (``{"t0/1", "t1/1", ..., "t0/2",
    ...}``)."""
    losses = {}
    for s, (xs, ys) in enumerate(zip(x.chunk(samples), y.chunk(samples)), start=1):
        z = trunk(xs)
        for t, head in enumerate(heads):
            losses[f"t{t}/{s}"] = ((head(z).squeeze(-1) - ys[:, t]) ** 2).mean()
    return losses
