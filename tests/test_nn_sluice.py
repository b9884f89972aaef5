"""Sluice networks against a float64 reference of the alpha/beta mixing and the orthogonality
penalty; partition, gradient flow, training."""

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
from mtlgrad.nn import Sluice

TASKS = ["pos", "chunk"]
WIDTH = 6


def make_model(seed: int = 0, subspaces: int = 2, randomise: bool = True) -> Sluice:
    torch.manual_seed(seed)
    layers = {
        name: [
            nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh()),
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()),
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()),
        ]
        for name in TASKS
    }
    heads = {name: nn.Linear(WIDTH, 1) for name in TASKS}
    model = Sluice(layers, heads, num_subspaces=subspaces).double()
    if randomise:  # away from the initialisation, so the reference checks every entry
        g = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for alpha in model.alphas:
                alpha.copy_(torch.rand(alpha.shape, generator=g, dtype=torch.float64))
            for beta in model.betas.values():
                beta.copy_(torch.rand(beta.shape, generator=g, dtype=torch.float64))
    return model


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(10, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def reference_forward(model: Sluice, x: torch.Tensor) -> dict[str, torch.Tensor]:
    S, T, K = model.num_subspaces, len(TASKS), len(model.alphas)
    size = WIDTH // S
    hidden = [x] * T
    per_layer = [[] for _ in range(T)]
    for k in range(K):
        outs = [model.layers[name][k](h) for name, h in zip(TASKS, hidden)]
        new = []
        for t in range(T):
            parts = []
            for s in range(S):
                mixed = torch.zeros(x.shape[0], size, dtype=torch.float64)
                for u in range(T):
                    for r in range(S):
                        alpha = model.alphas[k][t * S + s, u * S + r]
                        mixed = mixed + alpha * outs[u][:, r * size : (r + 1) * size]
                parts.append(mixed)
            new.append(torch.cat(parts, dim=1))
        hidden = new
        for t in range(T):
            per_layer[t].append(hidden[t])
    result = {}
    for t, name in enumerate(TASKS):
        final = sum(model.betas[name][k] * per_layer[t][k] for k in range(K))
        result[name] = model.heads[name](final)
    return result


@pytest.mark.parametrize("subspaces", [1, 2, 3])
def test_forward_matches_reference(subspaces):
    model = make_model(subspaces=subspaces)
    x, _ = problem()
    got, expected = model(x), reference_forward(model, x)
    for name in TASKS:
        torch.testing.assert_close(got[name], expected[name])


def test_orthogonality_penalty_matches_reference():
    model = make_model(subspaces=3)
    total = 0.0
    for name in TASKS:
        for layer in model.layers[name]:
            W = layer[0].weight.detach()  # (units, inputs); subspace s = units 2s, 2s + 1
            for s in range(3):
                for r in range(s + 1, 3):
                    for i in range(2 * s, 2 * s + 2):
                        for j in range(2 * r, 2 * r + 2):
                            total += float(W[i] @ W[j]) ** 2
    assert model.orthogonality_penalty().item() == pytest.approx(total, rel=1e-12)
    # Orthogonal subspaces give zero.
    layer = nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, -1.0]]))
    model = Sluice({"a": [layer]}, {"a": nn.Identity()})
    assert model.orthogonality_penalty().item() == 0.0


def test_initialisation():
    model = make_model(randomise=False)
    alpha = model.alphas[0]
    assert alpha.shape == (4, 4)
    torch.testing.assert_close(alpha.diagonal(), torch.full((4,), 0.9, dtype=torch.float64))
    torch.testing.assert_close(alpha.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(model.betas["pos"], torch.tensor([0.05, 0.05, 0.9]).double())


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    own = {id(p) for p in model.task_parameters("chunk")}
    assert id(model.betas["chunk"]) in own
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(1))]
)
def test_step_is_the_aggregation(aggregator):
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_with_the_penalty():
    model = make_model(randomise=False)
    x, losses = problem()
    check_training(
        model, x, losses, UPGrad(), extra_loss=lambda: 1e-3 * model.orthogonality_penalty()
    )


def test_errors():
    heads = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}
    with pytest.raises(ValueError, match="layer 0 of task 'a' has 5 output units"):
        Sluice({"a": [nn.Linear(3, 5)], "b": [nn.Linear(3, 5)]}, heads)
    with pytest.raises(ValueError, match="layer 0 of task 'a' has no weight"):
        Sluice({"a": [nn.Tanh()], "b": [nn.Tanh()]}, heads)
    with pytest.raises(ValueError, match="task 'b' has 2 layers"):
        Sluice({"a": [nn.Linear(4, 4)], "b": [nn.Linear(4, 4), nn.Linear(4, 4)]}, heads)
    model = Sluice(
        {"a": [nn.Linear(3, 4), nn.Linear(4, 2)], "b": [nn.Linear(3, 4), nn.Linear(4, 2)]}, heads
    )
    with pytest.raises(ValueError, match="every layer of every task must give one shape"):
        model(torch.randn(2, 3))


def test_conv_layers_split_channels():
    torch.manual_seed(0)
    layers = {
        name: [nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)] for name in TASKS
    }
    heads = {name: nn.Flatten() for name in TASKS}
    model = Sluice(layers, heads, feature_dim=1).double()
    with torch.no_grad():
        model.alphas[1].copy_(torch.eye(4))  # no mixing at the last layer
        model.betas["pos"].copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    h = model.layers["pos"][0](x)
    h_chunk = model.layers["chunk"][0](x)
    a = model.alphas[0]
    first = torch.cat(
        [
            a[0, 0] * h[:, :2]
            + a[0, 1] * h[:, 2:]
            + a[0, 2] * h_chunk[:, :2]
            + a[0, 3] * h_chunk[:, 2:],
            a[1, 0] * h[:, :2]
            + a[1, 1] * h[:, 2:]
            + a[1, 2] * h_chunk[:, :2]
            + a[1, 3] * h_chunk[:, 2:],
        ],
        dim=1,
    )
    expected = model.layers["pos"][1](first).flatten(1)
    torch.testing.assert_close(model(x)["pos"], expected)
    total = 0.0
    for name in TASKS:
        for layer in model.layers[name]:
            W = layer.weight.detach().reshape(4, -1)  # output channels x (inputs · kernel)
            total += float((W[:2] @ W[2:].T).pow(2).sum())
    assert model.orthogonality_penalty().item() == pytest.approx(total, rel=1e-12)
