from __future__ import annotations

import copy

import pytest
import torch
from aggregator_checks import matrix_families, train_tiny

import mtlgrad
from mtlgrad.aggregators import DBMTL, Mean


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def noisy_steps(T: int, steps: int, seed: int = 0, P: int = 30):
    base = randn(T, P, seed=seed) * torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]
    Js = [base + 0.3 * randn(T, P, seed=seed + 1 + k) for k in range(steps)]
    g = torch.Generator().manual_seed(seed)
    losses = [torch.rand(T, dtype=torch.float64, generator=g) * 10 + 0.1 for _ in range(steps)]
    return Js, losses


def step(agg: DBMTL, J: torch.Tensor, losses: torch.Tensor):
    return agg.aggregate(list(J.unbind(0)), J.shape[0], losses=losses)


def reference_db_mtl(Js, losses, beta: float = 0.9, beta_decay: float = 0.0):
    """Algorithm 1 of Lin et al. (2023) on the matrices, float64: gradients of log L_t, their EMA
    ĝ ← β_k ĝ + (1 − β_k) ∇log L, and d = Σ_t (max_s ||ĝ_s|| / ||ĝ_t||) ĝ_t."""
    E = torch.zeros_like(Js[0])
    out = []
    for k, (J, L) in enumerate(zip(Js, losses), start=1):
        b = beta / k**beta_decay
        E = b * E + (1 - b) * J / L[:, None]
        norms = E.norm(dim=1)
        alpha = torch.where(norms > 0, norms.max() / norms.clamp_min(1e-300), 0.0)
        out.append((alpha @ E, alpha))
    return out


@pytest.mark.parametrize("kwargs", [{}, {"beta": 0.5, "beta_decay": 0.5}, {"beta": 0.0}])
def test_matches_algorithm_1_over_several_steps(kwargs: dict) -> None:
    Js, losses = noisy_steps(4, 7)
    agg = DBMTL(**kwargs)
    for J, L, (d, alpha) in zip(Js, losses, reference_db_mtl(Js, losses, **kwargs)):
        out = step(agg, J, L)
        torch.testing.assert_close(out.out[0], d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.weights, alpha, rtol=1e-10, atol=1e-12)


def test_balances_every_task_to_the_largest_norm() -> None:
    Js, losses = noisy_steps(3, 1)
    out = step(DBMTL(beta=0.0), Js[0], losses[0])
    contributions = out.weights[:, None] * Js[0] / losses[0][:, None]
    norms = contributions.norm(dim=1)
    torch.testing.assert_close(norms, norms.max().expand(3))


def test_permuting_the_tasks_permutes_the_weights() -> None:
    Js, losses = noisy_steps(5, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a, b = DBMTL(), DBMTL()
    for J, L in zip(Js, losses):
        torch.testing.assert_close(step(b, J[perm], L[perm]).out[0], step(a, J, L).out[0])


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_in_the_gradients_scale_and_free_of_the_losses_scale(scale, dtype) -> None:
    Js, losses = noisy_steps(3, 3)
    a, b = DBMTL(), DBMTL()
    for J, L in zip(Js, losses):
        d = step(a, (J * scale).to(dtype), L * 1e5).out[0]
        expected = step(b, J, L).out[0] * scale * 1e-5
        assert d.dtype == dtype and torch.isfinite(d).all()
        torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["rank_deficient", "duplicated_rows", "opposite", "one_zero_row"])
def test_singular_and_parallel_gradients(name: str) -> None:
    J = matrix_families(4)[name]
    L = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    agg = DBMTL()
    Js, Ls = [J, 2 * J, J], [L, L, 2 * L]
    for J_step, L_step, (d, alpha) in zip(Js, Ls, reference_db_mtl(Js, Ls)):
        out = step(agg, J_step, L_step)
        torch.testing.assert_close(out.out[0], d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.weights, alpha)


def test_float32_matches_float64() -> None:
    Js, losses = noisy_steps(3, 4)
    a, b = DBMTL(), DBMTL()
    for J, L in zip(Js, losses):
        torch.testing.assert_close(step(a, J.float(), L).out[0], step(b, J, L).out[0].float())


def test_state_round_trip_resumes_bit_identically() -> None:
    Js, losses = noisy_steps(3, 6)
    a = DBMTL(beta=0.8, beta_decay=0.3)
    for J, L in zip(Js[:3], losses[:3]):
        step(a, J, L)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"step", "ema", "num_tasks"}
    b = DBMTL(beta=0.8, beta_decay=0.3)
    b.load_state_dict(state)
    for J, L in zip(Js[3:], losses[3:]):
        assert torch.equal(step(a, J, L).out[0], step(b, J, L).out[0])


def test_one_import_through_mtlgrad_backward() -> None:
    # The losses reach the aggregator through mtlgrad.backward: the trunk's gradient is the
    # balanced sum of the gradients of the log-losses, with no wiring in the loop.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 5, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 5, dtype=torch.float64)
    z = trunk(x)
    losses = [((z[:, :2] - targets[:, :2]) ** 2).mean(), 100 * ((z - targets) ** 2).mean()]
    J = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(L, list(trunk.parameters()), retain_graph=True)
                ]
            )
            for L in losses
        ]
    )
    L64 = torch.stack([L.detach() for L in losses])
    ((expected, _),) = reference_db_mtl([J], [L64])
    mtlgrad.backward(losses, shared_params=trunk.parameters(), aggregator=DBMTL())
    got = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])
    torch.testing.assert_close(got, expected)


def test_trains_through_mtl_optimizer_and_resumes() -> None:
    assert torch.equal(train_tiny(DBMTL, 5), train_tiny(DBMTL, 5, resume_at=3))
    assert not torch.equal(train_tiny(DBMTL, 5), train_tiny(Mean, 5))


def test_errors_name_the_task_and_parameter() -> None:
    J = randn(2, 10)
    with pytest.raises(ValueError, match="needs the task losses"):
        DBMTL()(J)
    with pytest.raises(ValueError, match=r"loss of task 'depth' is 0.0; it must be positive"):
        DBMTL().aggregate(
            list(J.unbind(0)), 2, losses=torch.tensor([1.0, 0.0]), task_names=["seg", "depth"]
        )
    with pytest.raises(ValueError, match="loss of task 0 is -1.0"):
        step(DBMTL(), J, torch.tensor([-1.0, 1.0]))
    agg = DBMTL()
    grads = [randn(4, 3, seed=1), randn(5, seed=2), randn(4, 3, seed=3), randn(5, seed=4)]
    agg.aggregate(grads, 2, names=["trunk.weight", "trunk.bias"], losses=torch.ones(2))
    with pytest.raises(ValueError, match=r"DBMTL: trunk\.bias has shape \[6\]"):
        agg.aggregate(
            [grads[0], randn(6), grads[2], randn(6)],
            2,
            names=["trunk.weight", "trunk.bias"],
            losses=torch.ones(2),
        )
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got 1"):
        DBMTL(beta=1)
    with pytest.raises(ValueError, match="beta_decay must be a non-negative number"):
        DBMTL(beta_decay=-0.5)


def test_repr() -> None:
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_decay=0.0)"
