"""SoftSharing: the coupling penalties against float64 references, an empty shared set through
mtlgrad.backward and MTLOptimizer."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from nn_checks import check_gradient_flow, check_partition, check_training, regression_losses
from torch import nn

import mtlgrad
from mtlgrad.aggregators import UPGrad
from mtlgrad.nn import SoftSharing

TASKS = ["a", "b", "c"]


def make_model(penalty: str = "l2", strength: float = 0.1, seed: int = 0) -> SoftSharing:
    torch.manual_seed(seed)
    nets = {name: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)) for name in TASKS}
    return SoftSharing(nets, penalty=penalty, strength=strength).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def reference_penalty(model: SoftSharing) -> float:
    """Float64 reference: Σ_params Σ_{s<t} ||θ_s - θ_t||² (l2) or Σ_params ||[vec θ_t]_t||_*."""
    total = 0.0
    names = [n for n, _ in model.networks[TASKS[0]].named_parameters()]
    for pname in names:
        thetas = [dict(model.networks[t].named_parameters())[pname].detach() for t in TASKS]
        if model.penalty == "l2":
            for u, v in itertools.combinations(thetas, 2):
                total += float(((u - v) ** 2).sum())
        else:
            M = torch.stack([t.reshape(-1) for t in thetas]).double()  # T x n
            eigenvalues = torch.linalg.eigvalsh(M @ M.T).clamp_min(0)
            total += float(eigenvalues.sqrt().sum())
    return model.strength * total


@pytest.mark.parametrize("penalty", ["l2", "trace"])
def test_penalty_matches_reference(penalty):
    model = make_model(penalty)
    assert model.coupling_penalty().item() == pytest.approx(reference_penalty(model), rel=1e-10)


def test_l2_penalty_is_zero_for_equal_networks_and_its_gradient_pulls_together():
    net = nn.Linear(3, 2).double()
    model = SoftSharing({"a": net, "b": copy.deepcopy(net)}, strength=0.5)
    assert model.coupling_penalty().item() == 0.0
    with torch.no_grad():
        model.networks["b"].weight.add_(1.0)
    model.coupling_penalty().backward()
    # d/dθ_a of 0.5 ||θ_a - θ_b||² = θ_a - θ_b = -1, and the opposite for θ_b.
    torch.testing.assert_close(
        model.networks["a"].weight.grad, -torch.ones(2, 3, dtype=torch.float64)
    )
    torch.testing.assert_close(
        model.networks["b"].weight.grad, torch.ones(2, 3, dtype=torch.float64)
    )


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    assert list(model.shared_parameters()) == []
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_backward_with_nothing_shared(engine):
    # Each task's network gets its own task's gradient plus the penalty's gradient.
    model = make_model("trace")
    x, losses = problem()
    values = losses(model(x))
    expected = {}
    for name in TASKS:
        own = list(model.task_parameters(name))
        task_grads = torch.autograd.grad(values[name], own, retain_graph=True)
        penalty_grads = torch.autograd.grad(model.coupling_penalty(), own)
        expected[name] = [g + h for g, h in zip(task_grads, penalty_grads)]
    model.zero_grad(set_to_none=True)
    model.coupling_penalty().backward()
    record = mtlgrad.backward(
        losses(model(x)),
        shared_params=model.shared_parameters(),
        aggregator=UPGrad(),
        engine=engine,
    )
    torch.testing.assert_close(record.weights, torch.ones(3, dtype=torch.float64))
    assert record.gram is None
    for name in TASKS:
        for p, e in zip(model.task_parameters(name), expected[name]):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("penalty", ["l2", "trace"])
def test_training_with_mtl_optimizer(penalty):
    model = make_model(penalty, strength=1e-3)
    x, losses = problem()
    check_training(model, x, losses, UPGrad(), extra_loss=model.coupling_penalty)


def test_per_task_inputs():
    model = make_model()
    xs = {name: torch.randn(3, 4, dtype=torch.float64) for name in TASKS}
    outputs = model(xs)
    for name in TASKS:
        torch.testing.assert_close(outputs[name], model.networks[name](xs[name]))
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        model({"a": xs["a"], "b": xs["b"]})


def test_errors():
    with pytest.raises(ValueError, match="penalty must be one of"):
        SoftSharing({"a": nn.Linear(2, 2)}, penalty="l1")
    with pytest.raises(ValueError, match="strength must be >= 0"):
        SoftSharing({"a": nn.Linear(2, 2)}, strength=-1)
    with pytest.raises(ValueError, match="the network of task 'b' has parameters"):
        SoftSharing({"a": nn.Linear(2, 2), "b": nn.Linear(3, 2)})
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="task 'a' and task 'b'"):
        SoftSharing({"a": net, "b": net})
    with pytest.raises(TypeError, match="networks must be a dict"):
        SoftSharing([net])
