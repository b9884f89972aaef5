"""FAMO (Liu et al. 2023) against a float64 reference of the paper's objective and logit update."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import FAMO

EPS = 1e-8


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def reference_run(pairs, lr, weight_decay, rule, bounds):
    """Objective, model-gradient coefficients and logits after each (L(t), L(t+1)) pair."""
    K = len(bounds)
    xi, m, v = [0.0] * K, [0.0] * K, [0.0] * K
    beta1, beta2 = 0.9, 0.999
    history = []
    for t, (before, after) in enumerate(pairs, start=1):
        z = softmax(xi)
        D = [before[i] - bounds[i] + EPS for i in range(K)]
        c = 1 / sum(z[i] / D[i] for i in range(K))
        objective = c * sum(z[i] * math.log(D[i]) for i in range(K))
        coefficients = [c * z[i] / D[i] for i in range(K)]
        decrease = [
            math.log(before[i] - bounds[i] + EPS) - math.log(after[i] - bounds[i] + EPS)
            for i in range(K)
        ]
        # δ_k = Σ_i ∂z_i/∂ξ_k · decrease_i with ∂z_i/∂ξ_k = z_i ([i = k] − z_k).
        delta = [sum(z[i] * ((i == k) - z[k]) * decrease[i] for i in range(K)) for k in range(K)]
        g = [delta[k] + weight_decay * xi[k] for k in range(K)]
        if rule == "sgd":
            xi = [xi[k] - lr * g[k] for k in range(K)]
        else:
            m = [beta1 * m[k] + (1 - beta1) * g[k] for k in range(K)]
            v = [beta2 * v[k] + (1 - beta2) * g[k] ** 2 for k in range(K)]
            m_hat = [m[k] / (1 - beta1**t) for k in range(K)]
            v_hat = [v[k] / (1 - beta2**t) for k in range(K)]
            xi = [xi[k] - lr * m_hat[k] / (math.sqrt(v_hat[k]) + EPS) for k in range(K)]
        history.append((objective, coefficients, xi))
    return history


def loss_pairs(K: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(before, after) losses: every task decreases by its own random factor each step."""
    before = loss_vectors(K, steps, seed)
    g = torch.Generator().manual_seed(seed + 100)
    factors = [0.5 + 0.6 * torch.rand(K, generator=g, dtype=torch.float64) for _ in range(steps)]
    return [(b, b * f) for b, f in zip(before, factors)]


@pytest.mark.parametrize("rule", ["adam", "sgd"])
@pytest.mark.parametrize("bounds", [None, [0.01, -1.0, 0.0]])
def test_matches_the_reference(rule: str, bounds) -> None:
    K, weight_decay = 3, 0.01
    lr = 0.3 if rule == "adam" else 3.0  # plain steps are the size of δ: about 0.1
    pairs = loss_pairs(K, 8)
    expected = reference_run(
        [(b.tolist(), a.tolist()) for b, a in pairs], lr, weight_decay, rule, bounds or [0.0] * K
    )
    weighting = FAMO(K, lr=lr, weight_decay=weight_decay, min_losses=bounds, rule=rule)
    for (before, after), (objective, coefficients, xi) in zip(pairs, expected):
        losses = before.clone().requires_grad_()
        out = weighting(losses)
        assert out.item() == pytest.approx(objective, rel=1e-12, abs=1e-12)
        out.backward()
        assert losses.grad.tolist() == pytest.approx(coefficients, rel=1e-12)
        assert weighting.weights.tolist() == pytest.approx(coefficients, rel=1e-12)
        assert abs(sum(coefficients) - 1) < 1e-12
        weighting.update(after)
        assert weighting.logits.tolist() == pytest.approx(xi, rel=1e-10, abs=1e-14)
    assert max(xi) - min(xi) > 0.1  # the logits did move


def test_adam_rule_is_torch_adam_on_the_softmax() -> None:
    # The official code's set-up: torch.optim.Adam(weight_decay=γ) on ξ, gradient J_zᵀ δ.
    K, lr, weight_decay = 4, 0.025, 1e-3
    xi = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([xi], lr=lr, weight_decay=weight_decay)
    weighting = FAMO(K)
    for before, after in loss_pairs(K, 20, seed=3):
        weighting(before)
        weighting.update(after)
        decrease = (before + EPS).log() - (after + EPS).log()  # ε as in the official code
        (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=decrease)
        optimizer.zero_grad()
        xi.grad = grad
        optimizer.step()
        torch.testing.assert_close(weighting.logits, xi.detach(), rtol=1e-12, atol=1e-15)


def test_slower_task_gains_weight() -> None:
    # Task 0's loss falls by 10% per step, task 1's by 50%: FAMO shifts weight to task 0.
    weighting = FAMO(2, lr=0.1)
    losses = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(30):
        weighting(losses)
        after = losses * torch.tensor([0.9, 0.5], dtype=torch.float64)
        weighting.update(after)
    z = torch.softmax(weighting.logits, 0)
    assert z[0] > 0.9


def test_state_round_trip() -> None:
    pairs = loss_pairs(3, 12, seed=4)

    def step(weighting: FAMO, i: int) -> torch.Tensor:
        out = weighting(pairs[i][0])
        weighting.update(pairs[i][1])
        return out

    assert_resumes_identically(lambda: FAMO(3, lr=0.1), step, before=6, after=6)
    # Between the call and update: the recorded losses travel with the state.
    weighting = FAMO(3)
    weighting(pairs[0][0])
    resumed = FAMO(3)
    resumed.load_state_dict(copy.deepcopy(weighting.state_dict()))
    weighting.update(pairs[0][1])
    resumed.update(pairs[0][1])
    assert torch.equal(weighting.logits, resumed.logits)
    assert not torch.equal(weighting.logits, FAMO(3).logits)


def test_eval_mode_and_parameters() -> None:
    weighting = FAMO(2)
    assert list(weighting.parameters()) == []
    weighting.eval()
    weighting(torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="no losses were recorded since the last update"):
        weighting.update(torch.tensor([1.0, 2.0]))


def test_repr_and_errors() -> None:
    assert repr(FAMO(2)) == "FAMO(num_tasks=2, lr=0.025, weight_decay=0.001, rule='adam')"
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        FAMO(2, lr=0)
    with pytest.raises(ValueError, match="weight_decay must be a non-negative number, got -1"):
        FAMO(2, weight_decay=-1)
    with pytest.raises(ValueError, match="rule must be one of 'adam', 'sgd'; got 'rmsprop'"):
        FAMO(2, rule="rmsprop")
    with pytest.raises(ValueError, match=r"min_losses must hold 2 values \(one per task\)"):
        FAMO(2, min_losses=[0.0])
    with pytest.raises(ValueError, match="min_losses must be finite"):
        FAMO(2, min_losses=[0.0, math.inf])
    with pytest.raises(RuntimeError, match="FAMO.update: no losses were recorded"):
        FAMO(2).update(torch.ones(2))
    weighting = FAMO(2)
    weighting(torch.ones(2))
    with pytest.raises(ValueError, match="FAMO.update: expected 2 task losses, got 3"):
        weighting.update(torch.ones(3))


def test_loss_below_its_bound_raises_and_changes_nothing() -> None:
    # log(L - b + ε) of a loss below its bound is NaN (or -inf), which the logits would keep.
    weighting = FAMO(3, min_losses=[0.0, 0.5, 0.0])
    pairs = loss_pairs(3, 3, seed=7)
    for before, after in pairs[:2]:
        weighting(before + 1)
        weighting.update(after + 1)
    state = copy.deepcopy(weighting.state_dict())

    def assert_unchanged(pending: bool) -> None:
        for key, value in weighting.state_dict().items():
            assert key == "_extra_state" or torch.equal(value, state[key]), key
        assert weighting.get_extra_state() == {"pending": pending}

    below = {"seg": torch.tensor(1.0), "depth": torch.tensor(0.25), "normals": torch.tensor(2.0)}
    with pytest.raises(
        ValueError,
        match=r"FAMO: the loss of 'depth' is 0.25, below its lower bound min_losses\[1\] = 0.5",
    ):
        weighting(below)
    assert_unchanged(pending=False)
    with pytest.raises(ValueError, match="FAMO: the loss of 'task 2' is -0.125, below its lower"):
        weighting(torch.tensor([1.0, 1.0, -0.125]))
    with pytest.raises(ValueError, match="FAMO: the loss of 'task 0' must be finite, got nan"):
        weighting([torch.tensor(math.nan), torch.tensor(1.0), torch.tensor(1.0)])
    assert_unchanged(pending=False)

    weighting(pairs[2][0] + 1)
    state = copy.deepcopy(weighting.state_dict())
    with pytest.raises(ValueError, match="FAMO.update: the loss of 'depth' is 0.25, below its"):
        weighting.update(below)
    assert_unchanged(pending=True)
    weighting.update(pairs[2][1] + 1)  # the step can still be completed
    assert torch.isfinite(weighting.logits).all()
