from __future__ import annotations

import itertools

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_matrix_call_is_weighted_sum,
    assert_owns_its_generator,
    matrices,
    matrix_families,
    matrix_ids,
)

from mtlgrad.aggregators import GradVac, PCGrad


def seeded(seed: int = 0, beta: float = 0.5) -> GradVac:
    return GradVac(beta=beta, generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    assert_finite_and_shaped(seeded(), J)
    # Same seeds, same orders, same (zero) initial targets: linear under scaling, over several
    # calls (the targets are cosines, scale-free).
    agg_a, agg_b = seeded(3), seeded(3)
    for c in (1e-3, 7.0, 1e-3):
        torch.testing.assert_close(
            agg_a(c * J), c * agg_b(J), rtol=1e-7, atol=1e-7 * c * float(J.abs().max() or 1)
        )
    assert_matrix_call_is_weighted_sum(seeded, J)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "conflicting", "huge"])
def test_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg_a, agg_b = seeded(1), seeded(1)
    scale = float(J.abs().max())
    assert_finite_and_shaped(seeded(), J)
    for _ in range(3):
        torch.testing.assert_close(agg_b(2 * J), 2 * agg_a(J), rtol=1e-7, atol=1e-7 * scale)


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_beta_zero_is_pcgrad(J: torch.Tensor) -> None:
    # Targets that stay 0 make the closed form PCGrad's projection (the paper's remark that
    # GradVac generalises PCGrad); the orders come from the same draws.
    gradvac = seeded(7, beta=0.0)
    pcgrad = PCGrad(generator=torch.Generator().manual_seed(7))
    for _ in range(2):
        scale = float(J.abs().max() or 1)
        torch.testing.assert_close(gradvac(J), pcgrad(J), rtol=1e-10, atol=1e-10 * scale)


def reference_gradvac(
    J: torch.Tensor, targets: torch.Tensor, beta: float, orders: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of Wang et al. (2021) on the gradients themselves, float64, given orders."""
    targets = targets.clone()
    adjusted = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            if g.norm() == 0 or J[j].norm() == 0:
                continue
            phi = float(g @ J[j] / (g.norm() * J[j].norm()))
            target = float(targets[i, j])
            if phi < target:
                a = (
                    g.norm()
                    * (target * (1 - phi**2) ** 0.5 - phi * (1 - target**2) ** 0.5)
                    / (J[j].norm() * (1 - target**2) ** 0.5)
                )
                g = g + a * J[j]
            targets[i, j] = (1 - beta) * target + beta * phi
        adjusted.append(g)
    return torch.stack(adjusted).sum(0), targets


def test_matches_algorithm_1_over_several_steps() -> None:
    # With T = 3 each call's result depends on the random orders: every native step must be the
    # reference's outcome (update and targets) for one of the possible orders.
    T = 3
    others = [[j for j in range(T) if j != i] for i in range(T)]
    combos = [
        [list(a), list(b), list(c)]
        for a in itertools.permutations(others[0])
        for b in itertools.permutations(others[1])
        for c in itertools.permutations(others[2])
    ]
    agg = seeded(11, beta=0.3)
    targets = torch.zeros(T, T, dtype=torch.float64)
    seen = set()
    for step in range(12):
        J = randn(T, 20, seed=step)
        J[2] = -0.7 * J[0] + 0.4 * J[2]  # conflicts, so that adjustments happen
        d = agg(J)
        new_targets = agg.state_dict()["targets"]
        matches = []
        for k, orders in enumerate(combos):
            expected_d, expected_targets = reference_gradvac(J, targets, 0.3, orders)
            if torch.allclose(d, expected_d, rtol=1e-10, atol=1e-10) and torch.allclose(
                new_targets, expected_targets, rtol=1e-10, atol=1e-12
            ):
                matches.append(k)
        assert matches, f"step {step}: not the outcome of any order"
        seen.add(matches[0])
        targets = new_targets
    assert len(seen) > 1, "the orders are not random"
    assert (targets != 0).any()


def test_adjustment_reaches_the_target() -> None:
    # Task 1's target of -1 is never undercut, so only task 0's gradient is adjusted:
    # w = (1, 1 + a) and g_0' = g_0 + a g_1 must have exactly the target cosine with g_1.
    J = randn(2, 30, seed=4)
    cos = float(J[0] @ J[1] / (J[0].norm() * J[1].norm()))
    for target in (-0.5, 0.0, 0.3, 0.9):
        assert cos < target or target == -0.5
        agg = seeded()
        targets = torch.tensor([[0.0, target], [-1.0, 0.0]], dtype=torch.float64)
        agg.load_state_dict({"targets": targets})
        w = agg.weights(J @ J.T)
        assert float(w[0]) == 1.0
        adjusted = J[0] + (w[1] - 1) * J[1]
        reached = float(adjusted @ J[1] / (adjusted.norm() * J[1].norm()))
        assert reached == pytest.approx(max(target, cos), abs=1e-12)
        # The targets move towards the cosine measured before the adjustment.
        assert float(agg.state_dict()["targets"][0, 1]) == pytest.approx(0.5 * target + 0.5 * cos)


@pytest.mark.parametrize("seed", range(5))
def test_matches_torchjd_for_two_tasks(seed: int) -> None:
    # With two tasks there is one visiting order, so TorchJD's GradVac (global RNG) and ours
    # must agree call after call, targets included. TorchJD adds eps = 1e-8 to its denominators
    # (we normalise G instead): agreement to ~1e-8 with gradients of norm ~5.
    torchjd = pytest.importorskip("torchjd")
    theirs = torchjd.aggregation.GradVac(beta=0.3)
    ours = seeded(seed, beta=0.3)
    for step in range(6):
        J = randn(2, 25, seed=100 * seed + step)
        J[1] -= (0.2 * step) * J[0]
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            ours.state_dict()["targets"],
            theirs.gramian_weighting._phi_t,
            rtol=1e-6,
            atol=1e-6,
        )


def test_state_round_trip() -> None:
    a = seeded(5, beta=0.2)
    for step in range(3):
        a(randn(4, 30, seed=step))
    state = a.state_dict()
    assert set(state) == {"targets", "generator"} and state["targets"].shape == (4, 4)
    b = GradVac(beta=0.2, generator=torch.Generator())
    b.load_state_dict(state)
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    a.generator = torch.Generator().manual_seed(9)
    b.generator = torch.Generator().manual_seed(9)
    J = randn(4, 30, seed=10)
    assert torch.equal(a(J), b(J))
    assert torch.equal(a.state_dict()["targets"], b.state_dict()["targets"])
    # The state is a copy: changing it does not change the aggregator.
    state = a.state_dict()
    state["targets"].fill_(0.5)
    assert not torch.equal(a.state_dict()["targets"], state["targets"])


def test_reset_forgets_the_targets() -> None:
    a = seeded(1)
    J = randn(3, 30)
    first = a(J)
    a(randn(3, 30, seed=1))
    a.reset()
    assert a.state_dict()["targets"] is None
    a.generator = torch.Generator().manual_seed(1)
    assert torch.equal(a(J), first)


def test_zero_gradient_leaves_its_targets() -> None:
    J = randn(3, 30)
    J[1] = 0
    agg = seeded()
    agg(J)
    targets = agg.state_dict()["targets"]
    assert (targets[1] == 0).all() and (targets[:, 1] == 0).all()
    assert targets[0, 2] != 0


def test_number_of_tasks_must_match_the_state() -> None:
    agg = seeded()
    agg(randn(3, 10))
    with pytest.raises(ValueError, match="targets for 3 tasks but got a 4 x 4"):
        agg(randn(4, 10))
    agg.reset()
    agg(randn(4, 10))


def test_seeded_runs_reproduce() -> None:
    J = randn(8, 100)
    assert torch.equal(seeded(5)(J), seeded(5)(J))
    assert not torch.equal(seeded(5)(J), seeded(6)(J))


def test_single_task_returns_the_gradient() -> None:
    J = randn(1, 100)
    agg = seeded()
    for _ in range(2):
        torch.testing.assert_close(agg(J), J[0])


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_constructor_errors(beta: object) -> None:
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\]"):
        GradVac(beta=beta)  # type: ignore[arg-type]


def test_owns_its_generator() -> None:
    J = randn(6, 40) - 0.3  # conflicts
    assert_owns_its_generator(GradVac, J)
    assert GradVac().state_dict().keys() == {"generator", "targets"}


def test_generator_is_checked() -> None:
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        GradVac(generator=3)  # type: ignore[arg-type]


def test_load_state_dict_errors() -> None:
    agg = GradVac()
    with pytest.raises(ValueError, match="key 'targets'"):
        agg.load_state_dict({"phi": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="T x T matrix"):
        agg.load_state_dict({"targets": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        agg.load_state_dict({"targets": torch.full((2, 2), 1.5)})
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        agg.load_state_dict({"targets": torch.full((2, 2), float("nan"))})
    agg.load_state_dict({"targets": None})


def test_repr() -> None:
    assert repr(GradVac()) == "GradVac(beta=0.5)"
    assert repr(GradVac(beta=0.01)) == "GradVac(beta=0.01)"


def test_opcheck() -> None:
    J = randn(4, 20)
    targets = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.mtlgrad.gradvac_weights.default, (J @ J.T, targets, 0.5, 3))


def test_256_tasks() -> None:
    J = randn(256, 300, seed=256)
    w = seeded().weights(J @ J.T)
    assert w.shape == (256,) and torch.isfinite(w).all()
