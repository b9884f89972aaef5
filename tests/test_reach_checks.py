"""No silent failure: features that no loss reaches, shared parameters above the features, and
shared parameters a loss uses that get no gradient are errors or warnings, never a step that
leaves ``.grad`` empty without a word."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mtlgrad
from mtlgrad.aggregators import UPGrad
from mtlgrad.optim import MTLOptimizer


class PooledNet(nn.Module):
    """A trunk, a shared pooler above the trunk's output (as in BERT), and two heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.pooler = nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        pooled = torch.tanh(self.pooler(z))
        return z, [h(pooled).squeeze(-1) for h in self.heads]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)


def losses_of(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - (t + 1) * y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]


def no_grad_written(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def test_a_shared_parameter_above_the_features_is_an_error():
    model = PooledNet()
    x, y = data()
    z, outputs = model(x)
    shared = [*model.trunk.parameters(), *model.pooler.parameters()]
    with pytest.raises(
        ValueError,
        match=r"shared_params\[2\] \(shape \[8, 8\]\) is used by the "
        r"loss of 'task 0', 'task 1' above the features",
    ):
        mtlgrad.backward(
            losses_of(outputs, y), shared_params=shared, aggregator=UPGrad(), features=z
        )
    assert no_grad_written(model)


def test_the_optimizer_discovering_the_shared_set_raises_the_same():
    model = PooledNet()
    optimizer = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    x, y = data()
    z, outputs = model(x)
    with pytest.raises(ValueError, match="above the features"):
        optimizer.backward(losses_of(outputs, y), features=z)
    assert no_grad_written(model)


def test_a_pooler_left_out_of_the_shared_set_gets_each_task_gradient():
    """What the error suggests: the pooler then gets the sum of the tasks' own gradients."""
    model = PooledNet()
    x, y = data()
    z, outputs = model(x)
    losses = losses_of(outputs, y)
    pooler = list(model.pooler.parameters())
    expected = [torch.zeros_like(p) for p in pooler]
    for loss in losses:
        grads = torch.autograd.grad(loss, pooler, retain_graph=True)
        expected = [e + g for e, g in zip(expected, grads)]
    mtlgrad.backward(
        losses, shared_params=model.trunk.parameters(), aggregator=UPGrad(), features=z
    )
    for p, e in zip(pooler, expected):
        torch.testing.assert_close(p.grad, e)
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_features_no_loss_reaches_are_an_error():
    model = PooledNet()
    x, y = data()
    _, outputs = model(x)
    other = model.trunk(x)  # another forward: the losses do not go through it
    with pytest.raises(
        ValueError,
        match=r"no task's loss depends on features\[0\] .*trunk's "
        "output",
    ):
        mtlgrad.backward(
            losses_of(outputs, y),
            shared_params=model.trunk.parameters(),
            aggregator=UPGrad(),
            features=other,
        )
    assert no_grad_written(model)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def test_features_of_a_compiled_model_are_an_error_that_names_torch_compile():
    torch._dynamo.reset()
    model = TwoHeads()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = data()
    z, outputs = compiled(x)
    with pytest.raises(ValueError, match="torch.compile'd graph"):
        mtlgrad.backward(
            losses_of(outputs, y),
            shared_params=model.trunk.parameters(),
            aggregator=UPGrad(),
            features=z,
        )
    assert no_grad_written(model)


def test_the_trunk_and_heads_compiled_apart_take_features_as_in_eager():
    """The recipe of the error message: the features leave one compiled module."""
    torch._dynamo.reset()
    x, y = data()
    eager = TwoHeads()
    z, outputs = eager(x)
    mtlgrad.backward(
        losses_of(outputs, y),
        shared_params=eager.trunk.parameters(),
        aggregator=UPGrad(),
        features=z,
    )
    model = TwoHeads()
    trunk = torch.compile(model.trunk, backend="aot_eager")
    z = trunk(x)
    outputs = [h(z).squeeze(-1) for h in model.heads]
    mtlgrad.backward(
        losses_of(outputs, y),
        shared_params=model.trunk.parameters(),
        aggregator=UPGrad(),
        features=z,
    )
    for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


class DropsGradient(torch.autograd.Function):
    """Uses its weight in the forward and gives it no gradient in the backward."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x @ weight

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.T, None


def test_a_shared_parameter_used_without_a_gradient_is_warned_about():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 8))
    first = nn.Linear(6, 6)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    x, y = data()
    z = DropsGradient.apply(first(x), weight)
    losses = losses_of([h(z).squeeze(-1) for h in heads], y)
    with pytest.warns(
        UserWarning,
        match=r"shared_params\[2\] \(shape \[6, 8\]\) is used by the "
        r"loss of 'task 0', 'task 1', but autograd gives it no gradient",
    ):
        mtlgrad.backward(losses, shared_params=[*first.parameters(), weight], aggregator=UPGrad())
    assert weight.grad is None and first.weight.grad is not None


def test_a_correct_step_warns_nothing():
    model = PooledNet()
    x, y = data()
    _, outputs = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtlgrad.backward(
            losses_of(outputs, y),
            shared_params=[*model.trunk.parameters(), *model.pooler.parameters()],
            aggregator=UPGrad(),
        )
