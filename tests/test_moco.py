from __future__ import annotations

import copy

import pytest
import torch
from aggregator_checks import matrix_families, train_tiny

from mtlgrad.aggregators import Mean, MoCo


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def noisy_steps(T: int, steps: int, seed: int = 0, P: int = 30) -> list[torch.Tensor]:
    base = randn(T, P, seed=seed)
    base[-1] = -0.8 * base[0] + 0.3 * base[-1]  # a conflict, so that λ moves
    return [base + 0.3 * randn(T, P, seed=seed + 1 + k) for k in range(steps)]


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """argmin_{w in Δ} ||w − v|| by bisection on the threshold θ of w = max(v − θ, 0)."""
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


def reference_moco(
    Js: list[torch.Tensor],
    losses: list[torch.Tensor] | None = None,
    beta: float = 0.5,
    beta_decay: float = 0.5,
    gamma: float = 0.1,
    gamma_decay: float = 0.5,
    rho: float = 0.0,
    softmax: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Algorithm 1 of Fernando et al. (2023) on the matrices, float64 (LibMTL's variant with
    losses and softmax). Returns (d, λ) per step."""
    T = Js[0].shape[0]
    Y = torch.zeros_like(Js[0])
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    out = []
    for k, J in enumerate(Js, start=1):
        H = J if losses is None else J / J.norm(dim=1, keepdim=True) * losses[k - 1][:, None]
        Y = Y - beta / k**beta_decay * (Y - H)
        step = lam - gamma / k**gamma_decay * (Y @ Y.T + rho * torch.eye(T, dtype=Y.dtype)) @ lam
        lam = torch.softmax(step, 0) if softmax else simplex_projection(step)
        out.append((lam @ Y, lam.clone()))
    return out


@pytest.mark.parametrize(
    "kwargs", [{}, {"beta": 0.9, "beta_decay": 0.0, "gamma": 0.5, "rho": 0.2}, {"gamma": 2.0}]
)
def test_matches_algorithm_1_over_several_steps(kwargs: dict) -> None:
    Js = noisy_steps(4, 8)
    agg = MoCo(**kwargs)
    for J, (d, lam) in zip(Js, reference_moco(Js, **kwargs)):
        torch.testing.assert_close(agg(J), d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(agg.state_dict()["weights"], lam, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(lam, torch.full((4,), 0.25, dtype=torch.float64))


def test_libmtl_variant_normalises_to_the_losses_and_uses_softmax() -> None:
    Js = noisy_steps(3, 6)
    losses = [
        torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) + 0.5
        for k in range(6)
    ]
    agg = MoCo(normalize=True, weight_update="softmax")
    expected = reference_moco(Js, losses, softmax=True)
    for J, L, (d, lam) in zip(Js, losses, expected):
        out = agg.aggregate(list(J.unbind(0)), 3, losses=L)
        torch.testing.assert_close(out.out[0], d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.weights, lam, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs the task losses"):
        MoCo(normalize=True)(Js[0])


def test_permuting_the_tasks_permutes_the_weights() -> None:
    Js = noisy_steps(5, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a, b = MoCo(gamma=1.0), MoCo(gamma=1.0)
    for J in Js:
        torch.testing.assert_close(b(J[perm]), a(J), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.state_dict()["weights"], a.state_dict()["weights"][perm])


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales(scale: float, dtype: torch.dtype) -> None:
    # γ Y Yᵀ is not scale-free: at 1e-30 λ stays uniform, at 1e30 it jumps to a vertex (the
    # task whose tracked gradient has the smallest (Y Yᵀ λ)_t); both finite and on the simplex.
    Js = noisy_steps(3, 3)
    agg = MoCo()
    for J in Js:
        d = agg((J * scale).to(dtype))
        assert d.dtype == dtype and torch.isfinite(d).all()
    lam = agg.state_dict()["weights"]
    assert float(lam.sum()) == pytest.approx(1) and bool((lam >= 0).all())
    if scale < 1:
        torch.testing.assert_close(lam, torch.full((3,), 1 / 3, dtype=torch.float64))
    else:
        assert sorted(lam.tolist()) == [0.0, 0.0, 1.0]


def test_float32_matches_float64() -> None:
    a, b = MoCo(), MoCo()
    for J in noisy_steps(3, 4):
        torch.testing.assert_close(a(J.float()), b(J).float(), rtol=1e-5, atol=1e-6)
    assert a.state_dict()["tracked"][0].dtype == torch.float32


@pytest.mark.parametrize(
    "name", ["rank_deficient", "duplicated_rows", "opposite", "one_zero_row", "all_zero"]
)
def test_singular_and_parallel_gradients(name: str) -> None:
    J = matrix_families(4)[name]
    Js = [J, 1.5 * J, J]
    agg = MoCo(gamma=0.5)
    for J_step, (d, lam) in zip(Js, reference_moco(Js, gamma=0.5)):
        torch.testing.assert_close(agg(J_step), d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(agg.state_dict()["weights"], lam, rtol=1e-10, atol=1e-12)


def test_single_task_tracks_the_gradient() -> None:
    agg = MoCo()
    J = randn(1, 20)
    torch.testing.assert_close(agg(J), 0.5 * J[0])  # y = β g from y = 0


def test_state_round_trip_resumes_bit_identically() -> None:
    a = MoCo(gamma=0.7)
    Js = noisy_steps(3, 6)
    for J in Js[:3]:
        a(J)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"step", "weights", "tracked"} and len(state["tracked"]) == 3
    b = MoCo(gamma=0.7)
    b.load_state_dict(state)
    for J in Js[3:]:
        assert torch.equal(a(J), b(J))
    assert torch.equal(a.state_dict()["weights"], b.state_dict()["weights"])


def test_trains_through_mtl_optimizer_and_resumes() -> None:
    assert torch.equal(train_tiny(MoCo, 5), train_tiny(MoCo, 5, resume_at=3))
    assert not torch.equal(train_tiny(MoCo, 5), train_tiny(Mean, 5))


def test_errors_name_the_parameter() -> None:
    agg = MoCo()
    grads = [randn(4, 3, seed=1), randn(5, seed=2), randn(4, 3, seed=3), randn(5, seed=4)]
    agg.aggregate(grads, 2, names=["trunk.weight", "trunk.bias"])
    with pytest.raises(ValueError, match=r"MoCo: trunk\.bias has shape \[6\]"):
        agg.aggregate(
            [grads[0], randn(6), grads[2], randn(6)], 2, names=["trunk.weight", "trunk.bias"]
        )
    for kwargs, message in [
        ({"beta": 0}, "beta must be a positive number, got 0"),
        ({"beta": 1.5}, r"beta must be in \(0, 1\], got 1.5"),
        ({"gamma": -1}, "gamma must be a positive number, got -1"),
        ({"rho": -1}, "rho must be a non-negative number, got -1"),
        ({"weight_update": "exp"}, "weight_update must be one of 'projection', 'softmax'"),
    ]:
        with pytest.raises(ValueError, match=message):
            MoCo(**kwargs)
    with pytest.raises(ValueError, match="both be set or both None"):
        MoCo().load_state_dict({"step": 0, "weights": torch.ones(2) / 2, "tracked": None})


def test_repr() -> None:
    assert repr(MoCo()) == (
        "MoCo(beta=0.5, beta_decay=0.5, gamma=0.1, gamma_decay=0.5, rho=0.0, normalize=False, "
        "weight_update='projection')"
    )
