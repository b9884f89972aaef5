"""LTB against a float64 reference of the Gumbel-softmax branching; hard (straight-through) and
eval (argmax tree) modes, the temperature, partition, gradient flow, training, state."""

from __future__ import annotations

import math

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
from mtlgrad.nn import LTB

TASKS = ["seg", "depth", "normal"]


def block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.Tanh())


def make_model(seed: int = 0, **options) -> LTB:
    torch.manual_seed(seed)
    blocks = [[block(4, 6)], [block(6, 6), block(6, 6)], [block(6, 5) for _ in range(3)]]
    heads = {name: nn.Linear(5, 1) for name in TASKS}
    model = LTB(blocks, heads, **options).double()
    with torch.no_grad():
        for p in [*model.branch_logits.parameters(), *model.head_logits.parameters()]:
            p.normal_()
    return model


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(8, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def apply(module: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(v @ module[0].weight.T + module[0].bias)


def softmax(v: list[float]) -> list[float]:
    e = [math.exp(a - max(v)) for a in v]
    return [a / sum(e) for a in e]


def reference(model: LTB, x: torch.Tensor, weights) -> dict[str, torch.Tensor]:
    """The tree written out; ``weights(logits row, name)`` gives one child's parent weights."""
    root = apply(model.blocks[0][0], x)
    layer1 = [apply(b, root) for b in model.blocks[1]]  # one parent: no choice
    alpha = model.branch_logits["2"].tolist()
    layer2 = []
    for c, b in enumerate(model.blocks[2]):
        w = weights(alpha[c], f"layer 2 block {c}")
        layer2.append(apply(b, w[0] * layer1[0] + w[1] * layer1[1]))
    result = {}
    for name in TASKS:
        w = weights(model.head_logits[name].tolist(), name)
        h = sum(w[p] * layer2[p] for p in range(3))
        result[name] = h @ model.heads[name].weight.T + model.heads[name].bias
    return result


def test_forward_without_noise_is_the_tempered_softmax():
    model = make_model(noise=False, temperature=0.7)
    x, _ = problem()
    expected = reference(model, x, lambda row, _: softmax([a / 0.7 for a in row]))
    got = model(x)
    for name in TASKS:
        assert got[name].shape == (8, 1)
        torch.testing.assert_close(got[name], expected[name])
    assert "1" not in model.branch_logits  # layer 1's blocks have a single parent
    assert model.branch_logits["2"].shape == (3, 2)


def test_forward_with_gumbel_noise():
    model = make_model(temperature=0.5, generator=torch.Generator().manual_seed(7))
    x, _ = problem()
    got = model(x)
    # The same draws in the model's order: layer 2's (3, 2) logits, then each head's (3,).
    g = torch.Generator().manual_seed(7)
    draws = [torch.rand(3, 2, generator=g, dtype=torch.float64)]
    draws += [torch.rand(3, generator=g, dtype=torch.float64) for _ in TASKS]
    gumbel = [(-torch.log(-torch.log(u))).tolist() for u in draws]
    rows = {f"layer 2 block {c}": gumbel[0][c] for c in range(3)}
    rows.update({name: gumbel[1 + t] for t, name in enumerate(TASKS)})

    def weights(row, where):
        return softmax([(a + n) / 0.5 for a, n in zip(row, rows[where], strict=True)])

    expected = reference(model, x, weights)
    for name in TASKS:
        torch.testing.assert_close(got[name], expected[name])


def test_hard_is_one_hot_forward_and_soft_backward():
    model = make_model(noise=False, hard=True, temperature=0.7)
    x, _ = problem()

    def one_hot(row, _):
        best = max(range(len(row)), key=lambda p: row[p])
        return [1.0 if p == best else 0.0 for p in range(len(row))]

    expected = reference(model, x, one_hot)
    got = model(x)
    for name in TASKS:
        torch.testing.assert_close(got[name], expected[name])
    # Straight-through: the gradient of the logits is the soft choice's,
    # d/dα Σ out = (diag(s) - s sᵀ) c / τ with c_p = Σ_samples head(layer-2 block p's output).
    logits = model.head_logits["seg"]
    (got_grad,) = torch.autograd.grad(got["seg"].sum(), logits)
    root = apply(model.blocks[0][0], x)
    layer1 = [apply(b, root) for b in model.blocks[1]]
    parents = model.branch_logits["2"].argmax(-1).tolist()
    layer2 = [apply(b, layer1[p]) for b, p in zip(model.blocks[2], parents, strict=True)]
    c = torch.stack([(h @ model.heads["seg"].weight.T).sum() for h in layer2]).detach()
    soft = torch.softmax(logits.detach() / 0.7, dim=-1)
    expected_grad = (torch.diag(soft) - torch.outer(soft, soft)) @ c / 0.7
    torch.testing.assert_close(got_grad, expected_grad)


def test_eval_follows_the_argmax_tree():
    model = make_model(generator=torch.Generator().manual_seed(0))
    x, _ = problem()
    tree = model.branching()
    assert tree["layer 1"] == [0, 0]
    assert tree["layer 2"] == model.branch_logits["2"].argmax(-1).tolist()
    assert tree["seg"] == [int(model.head_logits["seg"].argmax())]
    model.eval()
    root = apply(model.blocks[0][0], x)
    layer1 = [apply(b, root) for b in model.blocks[1]]
    layer2 = [apply(b, layer1[p]) for b, p in zip(model.blocks[2], tree["layer 2"], strict=True)]
    got = model(x)
    for name in TASKS:
        h = layer2[tree[name][0]]
        torch.testing.assert_close(
            got[name], h @ model.heads[name].weight.T + model.heads[name].bias
        )
    torch.testing.assert_close(model(x)["depth"], got["depth"], rtol=0, atol=0)  # no noise


def test_temperature():
    model = make_model()
    assert model.temperature == 1.0
    model.temperature = 0.25
    assert model.temperature == 0.25
    for bad in [0.0, -1.0, float("inf"), True]:
        with pytest.raises(ValueError, match="temperature must be"):
            model.temperature = bad
    assert LTB.temperature_schedule(0, 100) == 5.0
    assert LTB.temperature_schedule(3, 100) == 2.5
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        LTB.temperature_schedule(-1, 100)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        LTB.temperature_schedule(0, 0)


def test_single_block_last_layer_has_no_head_logits():
    model = LTB([[block(4, 3)], [block(3, 3), block(3, 3)], [block(3, 3)]], {"a": nn.Identity()})
    assert len(model.head_logits) == 0 and list(model.task_parameters("a")) == []
    assert model.branching() == {"layer 1": [0, 0], "layer 2": [0], "a": [0]}
    assert model(torch.randn(2, 4))["a"].shape == (2, 3)


def test_partition_and_gradient_flow():
    model = make_model(noise=False)
    check_partition(model)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in [*model.blocks.parameters(), model.branch_logits["2"]]}
    own = {id(p) for p in model.task_parameters("depth")}
    assert own == {id(model.head_logits["depth"])} | {
        id(p) for p in model.heads["depth"].parameters()
    }
    x, losses = problem()
    check_gradient_flow(model, x, losses)
    noisy = make_model(generator=torch.Generator().manual_seed(3))
    check_gradient_flow(noisy, x, losses)


def test_step_is_the_aggregation():
    model = make_model(noise=False)
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model(temperature=0.5, generator=torch.Generator().manual_seed(0))
    x, losses = problem()
    check_training_with_model(model, x, losses, UPGrad(), steps=25)


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)


def test_errors():
    heads = {"a": nn.Identity()}
    with pytest.raises(ValueError, match="blocks must list at least one layer"):
        LTB([], heads)
    with pytest.raises(ValueError, match=r"blocks\[1\] must hold at least 1 module"):
        LTB([[block(4, 3)], []], heads)
    with pytest.raises(TypeError, match="heads must be a dict"):
        LTB([[block(4, 3)]], [nn.Identity()])
    with pytest.raises(TypeError, match="hard must be a bool"):
        LTB([[block(4, 3)]], heads, hard=1)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        LTB([[block(4, 3)]], heads, temperature=0)
    model = LTB([[block(4, 3), block(4, 2)], [block(3, 3)]], heads)
    with pytest.raises(ValueError, match="the blocks that layer 1 chooses among give shapes"):
        model(torch.randn(2, 4))
