"""Joint many-task model: the stacked forward with shortcuts and label embeddings against a
float64 reference; the partition from what each output depends on; successive
regularisation; training, state."""

from __future__ import annotations

import pytest
import torch
from nn_checks import check_partition, check_step_matches_aggregation, regression_losses
from nn_model_checks import check_state_dict_round_trip, check_training_with_model
from torch import nn

from mtlgrad.aggregators import UPGrad
from mtlgrad.nn import JointManyTaskModel

TASKS = ["pos", "chunk", "dep"]
E, H, LABELS, LE = 4, 3, {"pos": 5, "chunk": 4, "dep": 2}, 2


def make_model(seed: int = 0, shortcuts: bool = True) -> JointManyTaskModel:
    torch.manual_seed(seed)
    embedding = nn.Sequential(nn.Linear(6, E), nn.Tanh())
    wide = H + (E if shortcuts else 0) + LE
    layers = {
        "pos": nn.Sequential(nn.Linear(E, H), nn.Tanh()),
        "chunk": nn.Sequential(nn.Linear(wide, H), nn.Tanh()),
        "dep": nn.Sequential(nn.Linear(wide, H), nn.Tanh()),
    }
    heads = {name: nn.Linear(H, LABELS[name]) for name in TASKS}
    label_embeddings = {n: nn.Linear(LABELS[n], LE, bias=False) for n in ("pos", "chunk")}
    return JointManyTaskModel(embedding, layers, heads, label_embeddings, shortcuts).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)  # (batch, words, features)
    targets = {n: torch.randn(2, 5, LABELS[n], generator=g, dtype=torch.float64) for n in TASKS}
    return x, regression_losses(targets)


def lin_tanh(seq: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(v @ seq[0].weight.T + seq[0].bias)


@pytest.mark.parametrize("shortcuts", [True, False])
def test_forward_matches_the_stacked_equations(shortcuts):
    model = make_model(shortcuts=shortcuts)
    x, _ = problem()
    got = model(x)
    e = lin_tanh(model.embedding, x)
    h, label = None, None
    for name in TASKS:
        if h is None:
            h = lin_tanh(model.layers[name], e)
        else:
            parts = [h, e, label] if shortcuts else [h, label]
            h = lin_tanh(model.layers[name], torch.cat(parts, dim=-1))
        out = h @ model.heads[name].weight.T + model.heads[name].bias
        assert got[name].shape == (2, 5, LABELS[name])
        torch.testing.assert_close(got[name], out)
        if name in model.label_embeddings:
            p = torch.exp(out) / torch.exp(out).sum(-1, keepdim=True)
            label = p @ model.label_embeddings[name].weight.T


def ids(*modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_partition_follows_the_dependencies():
    model = make_model()
    check_partition(model)
    m = model
    assert {id(p) for p in m.shared_parameters()} == ids(
        m.embedding, m.layers["pos"], m.layers["chunk"], m.heads["pos"], m.heads["chunk"],
        m.label_embeddings["pos"],
    )  # fmt: skip
    assert {id(p) for p in m.task_parameters("pos")} == set()
    assert {id(p) for p in m.task_parameters("chunk")} == set()
    # The label embedding just below the last task serves that task alone.
    dep = ids(m.layers["dep"], m.heads["dep"], m.label_embeddings["chunk"])
    assert {id(p) for p in m.task_parameters("dep")} == dep
    # What the graph says: each task's loss reaches exactly the modules it depends on.
    x, losses = problem()
    depends = {
        "pos": [m.embedding, m.layers["pos"], m.heads["pos"]],
        "chunk": [m.embedding, m.layers["pos"], m.heads["pos"], m.label_embeddings["pos"]]
        + [m.layers["chunk"], m.heads["chunk"]],
    }
    depends["dep"] = [
        *depends["chunk"],
        m.label_embeddings["chunk"],
        m.layers["dep"],
        m.heads["dep"],
    ]
    for task in TASKS:
        model.zero_grad(set_to_none=True)
        losses(model(x))[task].backward()
        reached = {
            id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert reached == ids(*depends[task]), task


def test_without_label_embeddings_the_heads_are_the_tasks():
    model = JointManyTaskModel(
        nn.Linear(6, E),
        {"a": nn.Linear(E, H), "b": nn.Linear(H + E, H)},
        {"a": nn.Linear(H, 1), "b": nn.Linear(H, 1)},
    )
    assert {id(p) for p in model.task_parameters("a")} == ids(model.heads["a"])
    assert model(torch.randn(3, 6))["b"].shape == (3, 1)


def test_successive_penalty():
    model = make_model()
    with pytest.raises(RuntimeError, match="call remember_parameters"):
        model.successive_penalty("chunk")
    model.remember_parameters()
    assert model.successive_penalty("dep").item() == 0.0
    with torch.no_grad():
        model.embedding[0].weight.add_(0.1)  # below every task: 0.1² per entry
        model.layers["chunk"][0].bias.add_(0.2)  # below dep only
        model.layers["dep"][0].bias.add_(1.0)  # dep's own layer: not below anything
    n = model.embedding[0].weight.numel()
    assert model.successive_penalty("pos", delta=2.0).item() == pytest.approx(2 * n * 0.01)
    assert model.successive_penalty("chunk", delta=2.0).item() == pytest.approx(2 * n * 0.01)
    expected = 2 * (n * 0.01 + H * 0.04)
    assert model.successive_penalty("dep", delta=2.0).item() == pytest.approx(expected)
    penalty = model.successive_penalty("dep")
    penalty.backward()
    assert (
        model.layers["dep"][0].bias.grad is None and model.layers["chunk"][0].bias.grad is not None
    )


def test_step_is_the_aggregation():
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model()
    x, losses = problem()
    model.remember_parameters()

    def with_successive(outputs):
        result = losses(outputs)
        return {n: v + model.successive_penalty(n, 1e-3) for n, v in result.items()}

    check_training_with_model(model, x, with_successive, UPGrad())


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)


def test_errors():
    layers = {"a": nn.Linear(6, 3), "b": nn.Linear(9, 3)}
    heads = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}
    with pytest.raises(ValueError, match="task 'b' is the last one"):
        JointManyTaskModel(nn.Identity(), layers, heads, {"b": nn.Linear(2, 2)})
    with pytest.raises(KeyError, match="unknown task 'z'"):
        JointManyTaskModel(nn.Identity(), layers, heads, {"z": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"heads must have one entry per task.*missing \['b'\]"):
        JointManyTaskModel(nn.Identity(), layers, {"a": nn.Linear(3, 2)})
    model = JointManyTaskModel(nn.Identity(), layers, heads)
    model.remember_parameters()
    with pytest.raises(ValueError, match="delta must be >= 0"):
        model.successive_penalty("b", delta=-1.0)
