"""DSelect-k against a float64 reference of the selector equations (per-example and static
gates); the smooth step, the penalties, partition, gradient flow, training, state."""

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
from mtlgrad.nn import DSelectK, smooth_step

TASKS = ["a", "b", "c"]


def make_model(seed: int = 0, *, n: int = 5, k: int = 2, static: bool = False) -> DSelectK:
    torch.manual_seed(seed)
    experts = [nn.Sequential(nn.Linear(4, 3), nn.Tanh()) for _ in range(n)]
    towers = {name: nn.Linear(3, 1) for name in TASKS}
    in_features = None if static else 4
    model = DSelectK(experts, towers, num_nonzeros=k, in_features=in_features, gamma=2.0)
    model = model.double()
    with torch.no_grad():  # spread the logits over the smooth step's transition (and beyond)
        for p in model.z_logits.parameters():
            p.uniform_(-0.8, 0.8)
        for p in model.w_logits.parameters():
            p.uniform_(-1.0, 1.0)
    return model


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(10, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def step(t: float, gamma: float) -> float:
    if t <= -gamma / 2:
        return 0.0
    if t >= gamma / 2:
        return 1.0
    return -2 * t**3 / gamma**3 + 3 * t / (2 * gamma) + 0.5


def reference_weights(z: list[list[float]], alpha: list[float] | None, n: int, gamma: float):
    """q(α, Z) in plain floats; bit l of expert j read most significant first."""
    m = math.ceil(math.log2(n))
    selectors = []
    for zi in z:
        r = []
        for j in range(n):
            bits = format(j, f"0{m}b")
            r.append(
                math.prod(
                    step(zi[b], gamma) if bits[b] == "1" else 1 - step(zi[b], gamma)
                    for b in range(m)
                )
            )
        selectors.append(r)
    if alpha is None:
        return selectors[0], selectors
    e = [math.exp(a) for a in alpha]
    sigma = [v / sum(e) for v in e]
    q = [sum(sigma[i] * selectors[i][j] for i in range(len(z))) for j in range(n)]
    return q, selectors


def test_smooth_step():
    t = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], dtype=torch.float64)
    expected = [step(v, 2.0) for v in t.tolist()]
    torch.testing.assert_close(smooth_step(t, 2.0), torch.tensor(expected, dtype=torch.float64))
    assert expected[1] == 0.0 and expected[3] == 0.5 and expected[5] == 1.0
    # Continuously differentiable: zero slope at the ends of the transition.
    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(ends, 2.0).sum(), ends)
    torch.testing.assert_close(grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("n, k", [(5, 2), (4, 3), (3, 1)])
def test_forward_matches_the_gate_per_example(n, k):
    model = make_model(n=n, k=k)
    x, _ = problem()
    got = model(x)
    for name in TASKS:
        Wz, bz = model.z_logits[name].weight, model.z_logits[name].bias
        tower = model.towers[name]
        for i in range(x.shape[0]):
            z = (Wz @ x[i] + bz).reshape(k, -1).tolist()
            alpha = None
            if k > 1:
                alpha = (model.w_logits[name].weight @ x[i] + model.w_logits[name].bias).tolist()
            q, _ = reference_weights(z, alpha, n, 2.0)
            experts = [torch.tanh(e[0].weight @ x[i] + e[0].bias) for e in model.experts]
            mixture = sum(q[j] * experts[j] for j in range(n))
            torch.testing.assert_close(got[name][i], tower.weight @ mixture + tower.bias)


def test_forward_matches_the_gate_static():
    model = make_model(n=4, k=2, static=True)
    x, _ = problem()
    got = model(x)
    gates = model.gate_weights(x)
    for name in TASKS:
        q, _ = reference_weights(
            model.z_logits[name].tolist(), model.w_logits[name].tolist(), 4, 2.0
        )
        torch.testing.assert_close(gates[name], torch.tensor(q, dtype=torch.float64))
        experts = [torch.tanh(x @ e[0].weight.T + e[0].bias) for e in model.experts]
        mixture = sum(q[j] * experts[j] for j in range(4))
        tower = model.towers[name]
        torch.testing.assert_close(got[name], mixture @ tower.weight.T + tower.bias)
        torch.testing.assert_close(gates[name].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_saturated_codes_select_one_expert_each():
    model = make_model(n=8, k=2, static=True)
    with torch.no_grad():
        model.z_logits["a"].copy_(torch.tensor([[1.5, -1.5, 1.5], [-1.5, 1.5, 1.5]]))  # 5 and 3
    selectors = model.selector_outputs(torch.zeros(0))["a"]
    expected = torch.zeros(2, 8, dtype=torch.float64)
    expected[0, 5] = expected[1, 3] = 1.0
    torch.testing.assert_close(selectors, expected)
    q = model.gate_weights(torch.zeros(0))["a"]
    assert set(torch.nonzero(q).flatten().tolist()) == {3, 5}  # k = 2 nonzeros exactly
    with torch.no_grad():
        for name in TASKS:
            model.z_logits[name].copy_(torch.tensor([[1.5, -1.5, 1.5], [-1.5, 1.5, 1.5]]))
    assert model.entropy_penalty().item() == pytest.approx(0.0, abs=1e-5)


def test_penalties_at_the_middle_of_the_step():
    model = make_model(n=5, k=2, static=True)
    with torch.no_grad():
        for p in model.z_logits.parameters():
            p.zero_()  # every code weighs 1/8
    # 5 of the 8 codes name an expert: each selector keeps 5/8 of its mass.
    assert model.reachability_penalty().item() == pytest.approx(3 * 8 / 5)
    expected_entropy = 3 * -5 * (1 / 8) * math.log(1 / 8 + 1e-6)
    assert model.entropy_penalty().item() == pytest.approx(expected_entropy)
    power_of_two = make_model(n=4, k=2, static=True)
    assert power_of_two.reachability_penalty().item() == 0.0
    per_example = make_model(n=5, k=2)
    x, _ = problem()
    assert per_example.entropy_penalty(x).item() > 0
    with pytest.raises(ValueError, match="per-example gates need the input x"):
        per_example.entropy_penalty()


def test_entropy_penalty_depends_only_on_each_task_s_gate():
    model = make_model()
    x, _ = problem()
    model.entropy_penalty(x).backward()
    assert all(p.grad is None for p in model.shared_parameters())
    assert all(p.grad is None for name in TASKS for p in model.towers[name].parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.z_logits.parameters())


def test_shapes_and_sequence_inputs():
    model = make_model()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    got = model(x)["b"]
    assert got.shape == (2, 3, 1)
    assert model.gate_weights(x)["b"].shape == (2, 3, 5)
    assert model.selector_outputs(x)["b"].shape == (2, 3, 2, 5)
    torch.testing.assert_close(got, model(x.reshape(6, 4))["b"].reshape(2, 3, 1))


@pytest.mark.parametrize("static", [False, True])
def test_partition_and_gradient_flow(static):
    model = make_model(static=static)
    check_partition(model)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.experts.parameters()}
    own = {id(p) for p in model.task_parameters("b")}
    gate = [model.z_logits["b"], model.w_logits["b"]]
    gate_ids = {id(g) for g in gate} if static else {id(p) for g in gate for p in g.parameters()}
    assert own == gate_ids | {id(p) for p in model.towers["b"].parameters()}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


def test_step_is_the_aggregation():
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model()
    x, losses = problem()
    penalty = lambda: 1e-3 * model.entropy_penalty(x) + 1e-3 * model.reachability_penalty(x)  # noqa: E731
    check_training_with_model(model, x, losses, UPGrad(), extra_loss=penalty)


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)
    check_state_dict_round_trip(lambda seed: make_model(seed, static=True), x)


def test_errors():
    towers = {"a": nn.Linear(3, 1)}
    experts = [nn.Linear(4, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="experts must hold at least 2 module"):
        DSelectK(experts[:1], towers, num_nonzeros=1)
    with pytest.raises(
        ValueError, match=r"num_nonzeros \(k\) must be between 1 and the number of experts 3, got 4"
    ):
        DSelectK(experts, towers, num_nonzeros=4)
    with pytest.raises(ValueError, match="got 0"):
        DSelectK(experts, towers, num_nonzeros=0)
    with pytest.raises(TypeError, match="num_nonzeros must be an int"):
        DSelectK(experts, towers, num_nonzeros=2.0)
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        DSelectK(experts, towers, num_nonzeros=2, gamma=0.0)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        DSelectK(experts, towers, num_nonzeros=2, in_features=-1)
    model = DSelectK(experts, towers, num_nonzeros=2, in_features=4)
    with pytest.raises(ValueError, match="the gates take in_features=4"):
        model(torch.randn(2, 5))
