"""GradNorm (Chen et al. 2018) against a double-backward float64 reference of the paper's L_grad,
and on the synthetic problem of the paper's Sec. 4 (shrunk)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mtlgrad import NonFiniteGradientError
from mtlgrad.weighting import Equal, GradNorm


class Net(nn.Module):
    """A tanh trunk (its last Linear is the layer W) and one linear head per task."""

    def __init__(self, tasks: int, d_in: int, width: int, d_out: int, depth: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(tasks))

    @property
    def last_shared(self) -> list[nn.Parameter]:
        return list(self.trunk[-2].parameters())

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z) - y) ** 2).mean() for head, y in zip(self.heads, ys)]


def small_problem(tasks: int = 3, seed: int = 0):
    model = Net(tasks, d_in=5, width=8, d_out=2, depth=2, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    ys = [(t + 1) * torch.randn(16, 2, generator=g, dtype=torch.float64) for t in range(tasks)]
    return model, x, ys


def reference_weight_grad(model: Net, x, ys, w: list[float], initial: list[float], alpha: float):
    """∂L_grad/∂w by double backward through G_i = ‖∇_W (w_i L_i)‖ (paper Sec. 3)."""
    weights = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    losses = model.losses(x, ys)
    norms = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(weights[i] * loss, model.last_shared, create_graph=True)
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)))
    G = torch.stack(norms)
    relative = [loss.item() / l0 for loss, l0 in zip(losses, initial)]
    mean_relative = sum(relative) / len(relative)
    target = G.mean().detach() * torch.tensor(
        [(r / mean_relative) ** alpha for r in relative], dtype=torch.float64
    )
    loss_grad = (G - target).abs().sum()
    (dw,) = torch.autograd.grad(loss_grad, weights)
    return dw.tolist(), [float(v) for v in G.detach()], [loss.item() for loss in losses]


@pytest.mark.parametrize("alpha", [1.5, 0.0, 0.12])
def test_matches_the_double_backward_reference(alpha: float) -> None:
    # Five SGD steps of the model and the weights, against a hand-written loop.
    T, lr, lr_w = 3, 0.05, 0.1
    model, x, ys = small_problem(T)
    reference_model = copy.deepcopy(model)
    weighting = GradNorm(T, model.last_shared, alpha=alpha).double()
    optimizer = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": weighting.parameters(), "lr": lr_w}], lr=lr
    )
    w, initial = [1.0] * T, None
    moved = False
    for _ in range(5):
        # Reference: renormalise (clip at 0, sum to T), then the paper's gradient.
        w = [max(v, 0.0) for v in w]
        w = [T * v / sum(w) for v in w]
        if initial is None:
            initial = [loss.item() for loss in reference_model.losses(x, ys)]
        dw, norms, values = reference_weight_grad(reference_model, x, ys, w, initial, alpha)
        total = sum(wi * li for wi, li in zip(w, reference_model.losses(x, ys)))
        grads = torch.autograd.grad(total, list(reference_model.parameters()))
        with torch.no_grad():
            for p, g in zip(reference_model.parameters(), grads):
                p -= lr * g

        optimizer.zero_grad()
        out = weighting(model.losses(x, ys))
        assert weighting.weights.tolist() == pytest.approx(w, rel=1e-12)
        assert weighting.task_weights.grad.tolist() == pytest.approx(dw, rel=1e-10, abs=1e-12)
        assert weighting.grad_norms.tolist() == pytest.approx(norms, rel=1e-10)
        assert out.item() == pytest.approx(sum(a * b for a, b in zip(w, values)), rel=1e-12)
        out.backward()
        optimizer.step()
        w = [wi - lr_w * d for wi, d in zip(w, dw)]
        moved |= max(w) - min(w) > 1e-3
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert moved
    weighting.renormalize()
    w = [max(v, 0.0) for v in w]
    assert weighting.task_weights.tolist() == pytest.approx([T * v / sum(w) for v in w], rel=1e-12)


def test_renormalize_clips_and_rescales() -> None:
    model, _, _ = small_problem()
    weighting = GradNorm(3, model.last_shared)
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([2.0, -1.0, 4.0]))
    weighting.renormalize()
    torch.testing.assert_close(weighting.task_weights.data, torch.tensor([1.0, 0.0, 2.0]))
    with torch.no_grad():
        weighting.task_weights.fill_(-1.0)
    weighting.renormalize()
    torch.testing.assert_close(weighting.task_weights.data, torch.ones(3))


def test_weights_are_the_ones_used_not_the_stepped_parameters() -> None:
    model, x, ys = small_problem()
    weighting = GradNorm(3, model.last_shared).double()
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.5)
    weighting(model.losses(x, ys)).backward()
    used = weighting.weights.clone()
    optimizer.step()  # moves task_weights; the record of the call must not move with them
    assert not torch.equal(weighting.task_weights.detach(), used)
    assert torch.equal(weighting.weights, used)


def test_gradient_accumulates_and_eval_mode_only_weights() -> None:
    model, x, ys = small_problem()
    weighting = GradNorm(3, model.last_shared).double()
    weighting.eval()
    weighting(model.losses(x, ys))
    assert weighting.task_weights.grad is None
    assert torch.isnan(weighting.initial_losses).all()
    weighting.train()
    weighting(model.losses(x, ys))
    first = weighting.task_weights.grad.clone()
    weighting(model.losses(x, ys))
    torch.testing.assert_close(weighting.task_weights.grad, 2 * first)
    with torch.no_grad():
        weighting(model.losses(x, ys))
    torch.testing.assert_close(weighting.task_weights.grad, 2 * first)


def test_state_round_trip() -> None:
    # The weights and L(0) (with the model's and the optimizer's states) resume a run identically.
    model, x, ys = small_problem(seed=1)

    def make(source: GradNorm | None = None, run: dict | None = None) -> dict:
        net = copy.deepcopy(model)
        weighting = GradNorm(3, net.last_shared).double()
        optimizer = torch.optim.Adam([*net.parameters(), *weighting.parameters()], lr=0.02)
        if source is not None:
            weighting.load_state_dict(copy.deepcopy(source.state_dict()))
            net.load_state_dict(copy.deepcopy(run["net"].state_dict()))
            optimizer.load_state_dict(copy.deepcopy(run["optimizer"].state_dict()))
        return {"net": net, "weighting": weighting, "optimizer": optimizer}

    def step(run: dict) -> torch.Tensor:
        run["optimizer"].zero_grad()
        out = run["weighting"](run["net"].losses(x, ys))
        out.backward()
        run["optimizer"].step()
        return out

    original = make()
    for _ in range(4):
        step(original)
    resumed = make(original["weighting"], original)
    restarted = make()  # the same but the weighting's state: L(0) and the weights start over
    restarted["net"].load_state_dict(original["net"].state_dict())
    restarted["optimizer"].load_state_dict(copy.deepcopy(original["optimizer"].state_dict()))
    for _ in range(4):
        a, b = step(original), step(resumed)
        step(restarted)
        assert torch.equal(a, b)
        assert torch.equal(original["weighting"].weights, resumed["weighting"].weights)
        assert not torch.equal(original["weighting"].weights, restarted["weighting"].weights)
    assert sorted(original["weighting"].state_dict()) == ["initial_losses", "task_weights"]


def paper_problem(T: int, sigmas: list[float], seed: int = 0, n: int = 32):
    """Sec. 4: y_i = σ_i tanh((B + ε_i) x), B and ε_i with N(0, 10) and N(0, 3.5) entries
    (variances), shrunk from 250 inputs and 100 outputs to 12 and 6, and the trunk from 4 tanh
    layers of 100 units to 2 of 16. Full batch of n points."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 12, 6
    B = math.sqrt(10) * torch.randn(d_out, d_in, generator=g)
    x = torch.randn(n, d_in, generator=g)
    ys = []
    for sigma in sigmas:
        eps = math.sqrt(3.5) * torch.randn(d_out, d_in, generator=g)
        ys.append(sigma * torch.tanh(x @ (B + eps).T))
    model = Net(T, d_in=d_in, width=16, d_out=d_out, depth=2, seed=seed)
    return model, x, ys


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    # A 16-unit network: intra-op threads only add synchronisation, which on a busy machine
    # costs 50-100x the work itself.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(kind: str, seed: int, steps: int = 60, last: int = 10) -> tuple[float, list[float]]:
    """Trains on the paper's problem with task scales σ = 1, 5, 20, 100; returns the max / min
    ratio of the weighted task-gradient norms on W (each averaged over the last steps, measured
    independently of the weighting) and the average weights over those steps."""
    T, sigmas = 4, [1.0, 5.0, 20.0, 100.0]
    model, x, ys = paper_problem(T, sigmas, seed=seed)
    # A small asymmetry α: the tasks differ in scale, hardly in difficulty.
    weighting = GradNorm(T, model.last_shared, alpha=0.12) if kind == "gradnorm" else Equal(T)
    optimizer = torch.optim.Adam(
        [{"params": model.parameters()}, {"params": weighting.parameters(), "lr": 0.06}], lr=1e-3
    )
    norms = torch.zeros(T, dtype=torch.float64)
    weights = torch.zeros(T, dtype=torch.float64)
    for step in range(steps):
        optimizer.zero_grad()
        losses = model.losses(x, ys)
        out = weighting(losses)
        if step >= steps - last:
            for t, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, model.last_shared, retain_graph=True)
                norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
                norms[t] += float(weighting.weights[t]) * norm / last
            weights += weighting.weights.double() / last
        out.backward()
        optimizer.step()
    return float(norms.max() / norms.min()), weights.tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_balances_the_gradient_norms_of_the_paper_problem(seed: int) -> None:
    # Measured over seeds 0-9: equal weighting 91-225, GradNorm 1.13-1.54, weights[0] /
    # weights[-1] 105-194 (60 steps, the weights' learning rate 0.06).
    with single_threaded():
        equal_ratio, _ = train("equal", seed)
        gradnorm_ratio, weights = train("gradnorm", seed)
    assert equal_ratio > 50
    assert gradnorm_ratio < 2
    # The task with the largest scale gets the smallest weight, the quietest the largest.
    assert weights == sorted(weights, reverse=True)
    assert weights[0] > 50 * weights[-1]


def test_repr_and_errors() -> None:
    model, x, ys = small_problem()
    assert repr(GradNorm(3, model.last_shared)) == "GradNorm(num_tasks=3, alpha=1.5)"
    with pytest.raises(ValueError, match="alpha must be a non-negative number, got -1"):
        GradNorm(3, model.last_shared, alpha=-1)
    with pytest.raises(ValueError, match="shared_params is empty"):
        GradNorm(3, [])
    with pytest.raises(TypeError, match=r"shared_params\[0\] must be a tensor"):
        GradNorm(3, [model.trunk])
    with pytest.raises(TypeError, match="shared_params must be an iterable of tensors"):
        GradNorm(3, 3)
    with pytest.raises(ValueError, match="more than once"):
        GradNorm(3, model.last_shared * 2)
    with pytest.raises(ValueError, match=r"shared_params\[0\] does not require grad"):
        GradNorm(3, [torch.zeros(2)])
    weighting = GradNorm(3, model.last_shared).double()
    losses = model.losses(x, ys)
    unrelated = (model.trunk[0].weight ** 2).sum()
    with pytest.raises(ValueError, match="the loss of 'depth' does not depend on shared_params"):
        weighting({"seg": losses[0], "normals": losses[1], "depth": unrelated})
    with pytest.raises(ValueError, match="the loss of 'task 2' does not require grad"):
        weighting([losses[0], losses[1], torch.tensor(1.0, dtype=torch.float64)])
    zero = 0 * losses[2]
    with pytest.raises(
        ValueError, match="the initial loss of 'task 2' must be positive and finite"
    ):
        weighting([losses[0], losses[1], zero])


def test_later_loss_not_positive_raises_and_changes_nothing() -> None:
    # L(t) / L(0) <= 0 makes the task's rate NaN (or 0), and its weight silently stops learning.
    model, x, ys = small_problem()
    weighting = GradNorm(3, model.last_shared).double()
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        weighting(model.losses(x, ys)).backward()
        optimizer.step()  # the weights no longer sum to T: renormalising would change them
    weights, initial = weighting.task_weights.detach().clone(), weighting.initial_losses.clone()
    grad = weighting.task_weights.grad.clone()
    losses = model.losses(x, ys)
    negative = losses[1] - losses[1].detach() - 0.5  # value -0.5, gradient that of losses[1]
    named = {"seg": losses[0], "depth": negative, "normals": losses[2]}
    with pytest.raises(
        ValueError, match=r"the loss of 'depth' must be positive and finite .*, got -0.5"
    ):
        weighting(named)
    with pytest.raises(ValueError, match=r"the loss of 'task 2' must be positive .*, got 0.0"):
        weighting([losses[0], losses[1], 0 * losses[2]])
    assert torch.equal(weighting.task_weights.detach(), weights)
    assert torch.equal(weighting.initial_losses, initial)
    assert torch.equal(weighting.task_weights.grad, grad)


def test_non_finite_gradient_names_the_task_and_parameter() -> None:
    model, x, ys = small_problem()
    weighting = GradNorm(3, model.last_shared).double()
    losses = model.losses(x, ys)
    with pytest.raises(NonFiniteGradientError, match=r"task 1: parameter 'shared_params\[0\]'"):
        weighting([losses[0], losses[1] * math.nan, losses[2]])
    assert weighting.task_weights.grad is None and torch.isnan(weighting.initial_losses).all()
