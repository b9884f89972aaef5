"""The whole training step under ``torch.compile(fullgraph=True)``, and ``check_finite``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtlgrad
from mtlgrad.aggregators import MGDA, Sum, UPGrad
from mtlgrad.ops import NonFiniteGradientError
from mtlgrad.optim import MTLOptimizer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def losses_of(model: Net, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - (t + 1) * y[:, t]) ** 2).mean() for t, o in enumerate(model(x))]


def batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(3)]


def optimizer_for(model: Net, aggregator) -> MTLOptimizer:
    return MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        aggregator,
        shared_params=model.trunk.parameters(),
        task_params=[h.parameters() for h in model.heads],
        check_finite=False,
    )


@pytest.mark.parametrize("make", [UPGrad, MGDA], ids=["upgrad", "mgda"])
def test_the_step_compiles_with_fullgraph_and_matches_eager(make):
    """The README's recipe: task_params (no graph walk), check_finite=False (no host-side
    branch) and dynamo's trace_autograd_ops."""
    torch._dynamo.reset()
    eager, compiled_model = Net(), Net()
    eager_opt, compiled_opt = optimizer_for(eager, make()), optimizer_for(compiled_model, make())

    def backward(model: Net, optimizer: MTLOptimizer, x: torch.Tensor, y: torch.Tensor):
        return optimizer.backward(losses_of(model, x, y))

    compiled_backward = torch.compile(backward, fullgraph=True, backend="aot_eager")
    records = []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for x, y in batches():
            for model, optimizer, fn in (
                (eager, eager_opt, backward),
                (compiled_model, compiled_opt, compiled_backward),
            ):
                optimizer.zero_grad()
                records.append(fn(model, optimizer, x, y))
                optimizer.step()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for eager_record, compiled_record in zip(records[::2], records[1::2]):
        torch.testing.assert_close(compiled_record.weights, eager_record.weights)
        torch.testing.assert_close(compiled_record.gram, eager_record.gram)


def nan_step(check_finite: bool, aggregator) -> Net:
    model = Net()
    x, y = batches()[0]
    losses = losses_of(model, x, y)
    losses[1] = losses[1] * torch.tensor(math.nan)
    mtlgrad.backward(
        losses,
        shared_params=model.trunk.parameters(),
        aggregator=aggregator,
        check_finite=check_finite,
    )
    return model


def test_check_finite_raises_by_default_and_is_left_to_the_solver_when_off():
    for aggregator in (MGDA(), Sum()):
        with pytest.raises(NonFiniteGradientError, match="task 1"):
            nan_step(True, aggregator)
    # Off: a solver still refuses a non-finite Gram matrix (without naming the task), and a
    # method without a solver lets NaN into .grad, as loss.backward() does.
    with pytest.raises(ValueError, match="mgda_weights: the Gram matrix holds NaN or Inf"):
        nan_step(False, MGDA())
    model = nan_step(False, Sum())
    assert not bool(torch.isfinite(model.trunk[0].weight.grad).all())


def test_check_finite_must_be_a_bool():
    model = Net()
    x, y = batches()[0]
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        mtlgrad.backward(
            losses_of(model, x, y),
            shared_params=model.trunk.parameters(),
            aggregator=UPGrad(),
            check_finite=1,
        )
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), check_finite="no")
