from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from training_helpers import sub_batch_losses

import mtlgrad
from mtlgrad.aggregators import MoDo
from mtlgrad.optim import MTLOptimizer


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def simplex_projection_by_bisection(v: torch.Tensor) -> torch.Tensor:
    """Π_Δ(v) = max(v − θ, 0) with θ such that the entries sum to 1, found by bisection (an
    algorithm independent of the sort-based one under test)."""
    low, high = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        theta = (low + high) / 2
        if float((v - theta).clamp_min(0).sum()) > 1:
            low = theta
        else:
            high = theta
    return (v - (low + high) / 2).clamp_min(0)


def reference_modo(steps: list[torch.Tensor], T: int, gamma: float, rho: float) -> torch.Tensor:
    """The paper's Eq. 2.9 over the steps (each a (S T) x P matrix, S = 2 or 3 sub-batches of
    the T tasks): λ ← Π(λ − γ (∇F_{z1}ᵀ ∇F_{z2} λ + ρ λ)); the last step's update
    ½ (J₁ + J₂)ᵀ λ with two sub-batches, J₃ᵀ λ with three."""
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    for J in steps:
        J1, J2 = J[:T], J[T : 2 * T]
        lam = simplex_projection_by_bisection(lam - gamma * (J1 @ (J2.T @ lam) + rho * lam))
    J = steps[-1]
    if J.shape[0] == 2 * T:
        return 0.5 * (J[:T] + J[T:]).T @ lam
    return J[2 * T :].T @ lam


def steps(T: int, samples: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    return [
        torch.randn(samples * T, 15, generator=gen(seed + k), dtype=torch.float64)
        for k in range(count)
    ]


@pytest.mark.parametrize("T", [1, 2, 3, 6])
@pytest.mark.parametrize("samples", [2, 3])
@pytest.mark.parametrize("gamma,rho", [(0.1, 0.1), (0.01, 0.0), (1.0, 0.5)])
def test_matches_the_paper_over_steps(T: int, samples: int, gamma: float, rho: float) -> None:
    Js = steps(T, samples, 5, seed=10 * T + samples)
    agg = MoDo(T, gamma=gamma, rho=rho)
    for k in range(len(Js)):
        d = agg(Js[k])
        torch.testing.assert_close(
            d, reference_modo(Js[: k + 1], T, gamma, rho), rtol=1e-9, atol=1e-11
        )
        lam = agg.state_dict()["weights"]
        assert lam.min() >= 0 and abs(float(lam.sum()) - 1) < 1e-12


@pytest.mark.parametrize("samples", [2, 3])
def test_weights_layout(samples: int) -> None:
    J = steps(3, samples, 1)[0]
    agg = MoDo(3)
    w = agg.weights(J @ J.T)
    lam = agg.state_dict()["weights"]
    expected = [lam / 2, lam / 2] if samples == 2 else [torch.zeros(6, dtype=torch.float64), lam]
    assert torch.equal(w, torch.cat(expected))


@pytest.mark.parametrize("samples", [2, 3])
def test_permuting_the_tasks_in_every_sub_batch_permutes_the_weights(samples: int) -> None:
    T = 4
    perm = torch.randperm(T, generator=gen(3))
    rows = torch.cat([s * T + perm for s in range(samples)])
    original, permuted = MoDo(T, gamma=0.3), MoDo(T, gamma=0.3)
    for J in steps(T, samples, 4, seed=5):
        torch.testing.assert_close(permuted(J[rows]), original(J), rtol=1e-12, atol=1e-12)
        lam, lam_perm = original.state_dict()["weights"], permuted.state_dict()["weights"]
        torch.testing.assert_close(lam_perm, lam[perm], rtol=0, atol=1e-15)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scales_and_dtypes(scale: float, dtype: torch.dtype) -> None:
    # γ (C + ρ I) on c J is γ c² (C + ρ/c² I) on J: the same weights with γ c² and ρ / c².
    expected_agg = MoDo(3, gamma=0.2 * scale**2, rho=0.1 / scale**2)
    agg = MoDo(3, gamma=0.2, rho=0.1)
    for J in steps(3, 2, 3, seed=7):
        expected = expected_agg(J)
        d = agg((J * scale).to(dtype))
        assert d.dtype == dtype and torch.isfinite(d).all()
        torch.testing.assert_close(d.double() / scale, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("samples", [2, 3])
@pytest.mark.parametrize("gamma,rho", [(0.1, 0.1), (0.5, 0.0)])
def test_matches_torchjd_over_steps(samples: int, gamma: float, rho: float) -> None:
    jd = pytest.importorskip("torchjd.aggregation")
    T = 3
    ours, theirs = MoDo(T, gamma=gamma, rho=rho), jd.MoDoWeighting(gamma=gamma, rho=rho)
    for J in steps(T, samples, 5, seed=20):
        w = ours.weights(J @ J.T)
        lam = theirs(J[:T] @ J[T : 2 * T].T)  # TorchJD's input: J₁ J₂ᵀ
        expected = (
            torch.cat([lam / 2, lam / 2]) if samples == 2 else torch.cat([0 * lam] * 2 + [lam])
        )
        torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-14)


def tiny_model(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    return trunk, heads


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(1000 + step)
    return torch.randn(12, 4, generator=g), torch.randn(12, 2, generator=g)


def train(make, samples: int, count: int, resume_at: int | None = None, **options) -> nn.Module:
    """The loop of the docstring: every batch split into ``samples`` sub-batches, one dict of
    ``2 * samples`` losses per step."""
    trunk, heads = tiny_model()
    params = [*trunk.parameters(), *heads.parameters()]

    def build() -> MTLOptimizer:
        return MTLOptimizer(torch.optim.SGD(params, lr=0.1), make(), trunk.parameters(), **options)

    optimizer = build()
    for k in range(count):
        if k == resume_at:
            state = copy.deepcopy(optimizer.state_dict())
            optimizer = build()
            optimizer.load_state_dict(state)
        x, y = data(k)
        optimizer.zero_grad()
        optimizer.backward(sub_batch_losses(trunk, heads, x, y, samples))
        optimizer.step()
    return nn.ModuleList([trunk, heads])


@pytest.mark.parametrize("samples", [2, 3])
def test_training_loop_matches_torchjds_loop(samples: int) -> None:
    """The docstring's loop with ``scale_task_params=True`` is TorchJD's documented loop: λ from
    ``MoDoWeighting(J₁ J₂ᵀ)``, then ``(mean of the sub-batches' losses).backward(λ)`` (two) or
    ``losses_3.backward(λ)`` (three), over every parameter, with ``J₁, J₂`` the Jacobians of the
    shared parameters (the trunk), which is where mtlgrad takes the Gram matrix."""
    jd = pytest.importorskip("torchjd.aggregation")
    ours = train(lambda: MoDo(2, gamma=0.5), samples, 4, scale_task_params=True)
    trunk, heads = tiny_model()
    params = [*trunk.parameters(), *heads.parameters()]
    weighting = jd.MoDoWeighting(gamma=0.5)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for k in range(4):
        x, y = data(k)
        losses = sub_batch_losses(trunk, heads, x, y, samples)
        per_sample = [torch.stack(list(losses.values())[2 * s : 2 * s + 2]) for s in range(samples)]
        jacobians = []
        for sample_losses in per_sample[:2]:
            rows = [
                torch.cat(
                    [
                        g.flatten()
                        for g in torch.autograd.grad(
                            loss, list(trunk.parameters()), retain_graph=True
                        )
                    ]
                )
                for loss in sample_losses
            ]
            jacobians.append(torch.stack(rows))
        lam = weighting(jacobians[0] @ jacobians[1].T)
        optimizer.zero_grad()
        target = (per_sample[0] + per_sample[1]) / 2 if samples == 2 else per_sample[2]
        target.backward(lam)
        optimizer.step()
    for p, q in zip(nn.ModuleList([trunk, heads]).parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_state_round_trip_is_bit_identical() -> None:
    Js = [J.float() for J in steps(3, 3, 6, seed=30)]
    original = MoDo(3, gamma=0.4)
    for J in Js[:3]:
        original(J)
    state = copy.deepcopy(original.state_dict())
    resumed = MoDo(3, gamma=0.4)
    resumed.load_state_dict(state)
    for J in Js[3:]:
        assert torch.equal(resumed(J), original(J))
    original.reset()
    assert original.state_dict() == {"weights": None}


def test_resume_through_the_optimizer_is_bit_identical() -> None:
    make = lambda: MoDo(2, gamma=0.5)  # noqa: E731
    straight = train(make, 2, 6)
    resumed = train(make, 2, 6, resume_at=3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_named_losses_keep_their_weights_when_the_dict_order_changes() -> None:
    trunk, heads = tiny_model()
    x, y = data(0)
    in_order, reordered = MoDo(2, gamma=0.5), MoDo(2, gamma=0.5)
    names = ["t1/1", "t0/1", "t1/2", "t0/2"]  # the tasks swapped in both sub-batches
    records = {}
    for agg, order in ((in_order, None), (reordered, names)):
        for _ in range(2):
            losses = sub_batch_losses(trunk, heads, x, y, 2)
            if order is not None and agg.state_dict()["weights"] is not None:
                losses = {k: losses[k] for k in order}
            records[order is None] = mtlgrad.backward(
                losses, shared_params=trunk.parameters(), aggregator=agg
            )
    assert records[False].names == names
    expected = dict(zip(records[True].names, records[True].weights.tolist()))
    assert dict(zip(names, records[False].weights.tolist())) == pytest.approx(expected)


def test_bad_arguments_and_state() -> None:
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        MoDo(0)
    with pytest.raises(ValueError, match="gamma must be a positive number, got 0"):
        MoDo(2, gamma=0)
    with pytest.raises(ValueError, match="rho must be a non-negative number, got -1"):
        MoDo(2, rho=-1)
    agg = MoDo(2)
    for n in (2, 5, 8):
        with pytest.raises(
            ValueError,
            match=rf"MoDo\(num_tasks=2\) expects 2 \* 2 or 3 \* 2 losses .* got {n}; check",
        ):
            agg(torch.randn(n, 5))
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        agg.weights(torch.full((4, 4), float("inf")))
    with pytest.raises(ValueError, match="expects state with key 'weights'"):
        agg.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"weights": None, "other": 1})
    with pytest.raises(ValueError, match=r"must be 2 non-negative finite weights \(num_tasks=2\)"):
        agg.load_state_dict({"weights": torch.tensor([0.2, 0.3, 0.5])})


def test_repr() -> None:
    assert repr(MoDo(3)) == "MoDo(num_tasks=3, gamma=0.1, rho=0.1)"
