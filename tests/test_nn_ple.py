"""PLE against a float64 reference of the extraction equations; the partition (inner task
experts are shared), gradient flow, training, state."""

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
from mtlgrad.nn import CGC, PLE

TASKS = ["ctr", "cvr", "share"]
SIZES = [5, 4, 4, 3]  # input, then each level's expert outputs
OWN_EXPERTS = {"ctr": [1, 2, 1], "cvr": [2, 0, 1], "share": [1, 1, 2]}
SHARED_EXPERTS = [2, 2, 1]


def expert(level: int) -> nn.Module:
    return nn.Sequential(nn.Linear(SIZES[level], SIZES[level + 1]), nn.Tanh())


def make_model(seed: int = 0, levels: int = 3) -> PLE:
    torch.manual_seed(seed)
    shared = [[expert(j) for _ in range(SHARED_EXPERTS[j])] for j in range(levels)]
    own = {n: [[expert(j) for _ in range(OWN_EXPERTS[n][j])] for j in range(levels)] for n in TASKS}
    towers = {name: nn.Linear(SIZES[levels], 1) for name in TASKS}
    return PLE(shared, own, towers, in_features=SIZES[:levels]).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(10, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def apply(module: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(module[0].weight @ v + module[0].bias)


def softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def reference(model: PLE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One sample at a time, the extraction equations written out."""
    result = {name: [] for name in TASKS}
    for i in range(x.shape[0]):
        h = {name: x[i] for name in TASKS}
        s = x[i]
        for j in range(model.num_levels):
            shared = [apply(e, s) for e in model.shared_experts[j]]
            own = {n: [apply(e, h[n]) for e in model.task_experts[n][j]] for n in TASKS}
            new = {}
            for n in TASKS:
                w = softmax(model.task_gates[n][j].weight @ h[n])
                new[n] = sum(wk * ek for wk, ek in zip(w, own[n] + shared, strict=True))
            if j < model.num_levels - 1:
                every = [e for n in TASKS for e in own[n]] + shared
                w = softmax(model.shared_gates[j].weight @ s)
                s = sum(wk * ek for wk, ek in zip(w, every, strict=True))
            h = new
        for n in TASKS:
            result[n].append(model.towers[n].weight @ h[n] + model.towers[n].bias)
    return {n: torch.stack(v) for n, v in result.items()}


def test_forward_matches_the_extraction_equations():
    model = make_model()
    x, _ = problem()
    got, expected = model(x), reference(model, x)
    for name in TASKS:
        assert got[name].shape == (10, 1)
        torch.testing.assert_close(got[name], expected[name])
    assert len(model.shared_gates) == 2  # none at the last level
    assert model.shared_gates[0].weight.shape == (1 + 2 + 1 + 2, 5)  # own, then shared


def test_one_level_is_cgc():
    torch.manual_seed(0)
    shared = [expert(0), expert(0)]
    own = {"a": [expert(0)], "b": []}
    towers = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}
    ple = PLE([shared], {n: [e] for n, e in own.items()}, towers, in_features=[5]).double()
    cgc = CGC(shared, own, towers, in_features=5).double()
    cgc.gates.load_state_dict({f"{n}.weight": ple.task_gates[n][0].weight for n in "ab"})
    x = torch.randn(6, 5, dtype=torch.float64)
    for name in "ab":
        torch.testing.assert_close(ple(x)[name], cgc(x)[name])
    assert {id(p) for p in ple.shared_parameters()} == {id(p) for p in cgc.shared_parameters()}


def test_sequence_inputs():
    model = make_model()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    got = model(x)["share"]
    assert got.shape == (2, 3, 1)
    torch.testing.assert_close(got, model(x.reshape(6, 5))["share"].reshape(2, 3, 1))


def test_partition_inner_task_experts_are_shared():
    model = make_model()
    check_partition(model)
    # Experts of its own at every level: the last two gates are the task's.
    own = {id(p) for p in model.task_parameters("ctr")}
    mine = [
        model.task_experts["ctr"][2],
        model.task_gates["ctr"][1],
        model.task_gates["ctr"][2],
        model.towers["ctr"],
    ]
    assert own == {id(p) for m in mine for p in m.parameters()}
    shared = {id(p) for p in model.shared_parameters()}
    for module in [model.task_experts["ctr"][0], model.task_gates["ctr"][0], model.shared_gates]:
        assert {id(p) for p in module.parameters()} <= shared
    # No experts of its own at level 1: every gate of "cvr" is its own.
    own = {id(p) for p in model.task_parameters("cvr")}
    mine = [model.task_experts["cvr"][2], model.task_gates["cvr"], model.towers["cvr"]]
    assert own == {id(p) for m in mine for p in m.parameters()}
    assert {id(p) for p in model.task_experts["cvr"][0].parameters()} <= shared
    # What the graph says: task "cvr"'s loss reaches "ctr"'s first-level experts and gate.
    x, losses = problem()
    inner = [*model.task_experts["ctr"][0].parameters(), *model.task_gates["ctr"][0].parameters()]
    grads = torch.autograd.grad(losses(model(x))["cvr"], inner)
    assert all(g.abs().sum() > 0 for g in grads)
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize("levels", [1, 2])
def test_partition_and_gradient_flow_fewer_levels(levels):
    model = make_model(levels=levels)
    check_partition(model)
    x, losses = problem()
    check_gradient_flow(model, x, losses)


def test_step_is_the_aggregation():
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model()
    x, losses = problem()
    check_training_with_model(model, x, losses, UPGrad())


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)


def test_errors():
    towers = {"a": nn.Linear(4, 1)}
    with pytest.raises(ValueError, match="shared_experts must list at least one level"):
        PLE([], {"a": []}, towers, in_features=[5])
    two = [[expert(0), expert(0)], [expert(1), expert(1)]]
    with pytest.raises(ValueError, match=r"shared_experts\[1\] must hold at least 1 module"):
        PLE([two[0], []], {"a": [[], []]}, towers, in_features=[5, 4])
    with pytest.raises(ValueError, match=r"task_experts\['a'\] has 1 levels, but shared_experts"):
        PLE(two, {"a": [[]]}, towers, in_features=[5, 4])
    with pytest.raises(ValueError, match=r"in_features must list one int per level \(2\)"):
        PLE(two, {"a": [[], []]}, towers, in_features=5)
    with pytest.raises(ValueError, match=r"in_features\[1\] must be a positive int"):
        PLE(two, {"a": [[], []]}, towers, in_features=[5, 0])
    with pytest.raises(ValueError, match="task 'a'.s gate at level 1 has a single expert"):
        PLE([[expert(0), expert(0)], [expert(1)]], {"a": [[], []]}, towers, in_features=[5, 4])
    shared = [[expert(0), expert(0)], [nn.Linear(3, 4), nn.Linear(3, 4)]]
    model = PLE(shared, {"a": [[], []]}, towers, in_features=[5, 3])
    with pytest.raises(ValueError, match="level 1's gates take in_features=3"):
        model(torch.randn(2, 5))
