"""Fully-adaptive feature sharing: widening keeps the function and moves the partition; task
affinity against counting; grouping; partition, gradient flow, training, state."""

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

from mtlgrad.aggregators import UPGrad
from mtlgrad.nn import FullyAdaptiveNetwork

TASKS = ["a", "b", "c"]


def make_model(seed: int = 0, widened: bool = False) -> FullyAdaptiveNetwork:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(5, 4), nn.Tanh()) for _ in range(1)]
    layers += [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)]
    heads = {name: nn.Linear(4, 1) for name in TASKS}
    model = FullyAdaptiveNetwork(layers, heads).double()
    if widened:
        model.widen(2, [["a", "b"], ["c"]])
        model.widen(1, [["a", "b"], ["c"]])
    return model


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def ids(modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_thin_network_is_hard_sharing():
    model = make_model()
    x, _ = problem()
    z = x
    for layer in model.branches:
        z = layer[0](z)
    for name in TASKS:
        torch.testing.assert_close(model(x)[name], model.heads[name](z))
    assert {id(p) for p in model.shared_parameters()} == ids(model.branches)


def test_widening_keeps_the_function_then_the_copies_train_apart():
    model = make_model()
    x, _ = problem()
    before = {k: v.detach() for k, v in model(x).items()}
    model.widen(2, [["a", "b"], ["c"]])
    assert [len(layer) for layer in model.branches] == [1, 1, 2]
    assert model.tasks_of(2, 0) == ["a", "b"] and model.tasks_of(2, 1) == ["c"]
    assert model.head_branch == {"a": 0, "b": 0, "c": 1}
    for name in TASKS:
        torch.testing.assert_close(model(x)[name], before[name], rtol=0, atol=0)
    with torch.no_grad():  # the copy is a separate module
        model.branches[2][1][0].weight.add_(0.5)
    torch.testing.assert_close(model(x)["a"], before["a"], rtol=0, atol=0)
    # By hand: c reads the copy, a and b the original.
    z = model.branches[1][0](model.branches[0][0](x))
    c = model.heads["c"](
        torch.tanh(z @ model.branches[2][1][0].weight.T + model.branches[2][1][0].bias)
    )
    torch.testing.assert_close(model(x)["c"], c)
    # The partition moves: the copy is c's own, the original is shared by a and b.
    check_partition(model)
    assert ids([model.branches[2][1], model.heads["c"]]) == {
        id(p) for p in model.task_parameters("c")
    }
    assert ids([model.branches[0], model.branches[1], model.branches[2][0]]) == {
        id(p) for p in model.shared_parameters()
    }


def test_top_down_widening():
    model = make_model()
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c'\] share a branch of layer 2.*first"):
        model.widen(1, [["a", "b"], ["c"]])  # layer 2 not widened yet
    model.widen(2, [["a"], ["b"], ["c"]])
    model.widen(1, [["a", "b"], ["c"]])
    assert model.parents[2] == [0, 0, 1]
    model.widen(1, [["a"], ["b"]])
    assert model.tasks_of(1, 0) == ["a"] and model.tasks_of(1, 2) == ["b"]
    assert model.tasks_of(0, 0) == TASKS
    check_partition(model)
    x, losses = problem()
    check_reach(model, x, losses)
    with pytest.raises(ValueError, match="lie below 2 branches of layer 1"):
        model.widen(1, [["a"], ["c"]])


def test_task_affinity_counts_agreements():
    easy = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 1], [0, 1, 0]])
    A = FullyAdaptiveNetwork.task_affinity(easy)
    for i in range(3):
        for j in range(3):
            agree = sum(int(easy[n, i] == easy[n, j]) for n in range(4)) / 4
            assert A[i, j].item() == pytest.approx(agree)
    assert torch.equal(A.diag(), torch.ones(3, dtype=torch.float64))


def test_propose_groups_merges_the_most_alike():
    model = make_model()
    affinity = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.3], [0.2, 0.3, 1.0]])
    assert model.propose_groups(2, 0, affinity, 2) == [["a", "b"], ["c"]]
    assert model.propose_groups(2, 0, affinity, 3) == [["a"], ["b"], ["c"]]
    model.widen(2, model.propose_groups(2, 0, affinity, 2))
    assert model.propose_groups(1, 0, affinity, 1) == [["a", "b", "c"]]
    with pytest.raises(ValueError, match="num_groups must be between 1 and the 2 readers"):
        model.propose_groups(1, 0, affinity, 3)


def check_reach(model: FullyAdaptiveNetwork, x, losses) -> None:
    """Each task's loss gives a nonzero gradient to exactly the branches above which it lies
    (and its head): after widening, a shared branch may serve some of the tasks only."""
    for task in TASKS:
        model.zero_grad(set_to_none=True)
        losses(model(x))[task].backward()
        for layer in range(model.num_layers):
            for b, branch in enumerate(model.branches[layer]):
                reached = [
                    p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters()
                ]
                assert all(reached) if task in model.tasks_of(layer, b) else not any(reached)


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    x, losses = problem()
    check_gradient_flow(model, x, losses)
    model = make_model(widened=True)
    check_partition(model)
    check_reach(model, x, losses)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == ids([model.branches[0], model.branches[1][0], model.branches[2][0]])


def test_step_is_the_aggregation():
    model = make_model(widened=True)
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model()
    x, losses = problem()
    check_training_with_model(model, x, losses, UPGrad())
    model.widen(2, [["a", "b"], ["c"]])  # new parameters: a new optimizer
    check_training_with_model(model, x, losses, UPGrad())


def test_state_dict_round_trip_checks_the_tree():
    x, _ = problem()
    check_state_dict_round_trip(lambda seed: make_model(seed, widened=True), x)
    # Same parameters, another tree: the heads of b and c read other branches.
    source, target = make_model(0), make_model(1)
    source.widen(2, [["a", "b"], ["c"]])
    target.widen(2, [["a", "c"], ["b"]])
    with pytest.raises(ValueError, match="replay the same widen"):
        target.load_state_dict(source.state_dict())


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match="groups must be two or more"):
        model.widen(2, [["a", "b", "c"]])
    with pytest.raises(ValueError, match="a task appears in two groups"):
        model.widen(2, [["a", "b"], ["b", "c"]])
    with pytest.raises(ValueError, match="the groups hold \\['a', 'b'\\]"):
        model.widen(2, [["a"], ["b"]])
    with pytest.raises(KeyError, match="unknown task 'z'"):
        model.widen(2, [["a", "b"], ["z"]])
    with pytest.raises(IndexError, match="layer must be in \\[0, 3\\)"):
        model.widen(3, [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="easy must hold 0s and 1s"):
        FullyAdaptiveNetwork.task_affinity(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="layers must list at least one layer"):
        FullyAdaptiveNetwork([], {"a": nn.Identity()})
