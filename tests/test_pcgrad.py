from __future__ import annotations

import itertools

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_matrix_call_is_weighted_sum,
    assert_owns_its_generator,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import PCGrad


def seeded(seed: int = 0) -> PCGrad:
    return PCGrad(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    assert_finite_and_shaped(seeded(), J)
    # Same seed, same orders: linear under scaling.
    agg_a, agg_b = seeded(3), seeded(3)
    for c in (1e-3, 7.0):
        torch.testing.assert_close(
            agg_a(c * J), c * agg_b(J), rtol=1e-7, atol=1e-7 * c * float(J.abs().max() or 1)
        )
    assert_matrix_call_is_weighted_sum(seeded, J)


def reference_pcgrad(J: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of Yu et al. (2020) on the gradients themselves, float64, given orders."""
    projected = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            dot = g @ J[j]
            if dot < 0 and J[j].norm() > 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


def test_matches_the_paper_for_two_tasks() -> None:
    J = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J[1] -= 1.5 * (J[0] @ J[1] / (J[0] @ J[0]) + 1) * J[0]  # make them conflict
    assert J[0] @ J[1] < 0
    torch.testing.assert_close(seeded()(J), reference_pcgrad(J, [[1], [0]]))


def test_matches_the_paper_for_one_of_the_orders() -> None:
    # With T = 3 the result depends on the random orders: every seeded result must be the
    # reference's outcome for one of the possible orders.
    J = torch.randn(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    J[2] = -0.8 * J[0] + 0.3 * J[2]
    others = [[j for j in range(3) if j != i] for i in range(3)]
    candidates = [
        reference_pcgrad(J, [list(a), list(b), list(c)])
        for a in itertools.permutations(others[0])
        for b in itertools.permutations(others[1])
        for c in itertools.permutations(others[2])
    ]
    seen = set()
    for seed in range(30):
        d = seeded(seed)(J)
        matches = [
            k for k, c in enumerate(candidates) if torch.allclose(d, c, rtol=1e-9, atol=1e-9)
        ]
        assert matches, f"seed {seed}: not the outcome of any order"
        seen.add(matches[0])
    assert len(seen) > 1, "the orders are not random"


def test_non_conflicting_for_two_tasks() -> None:
    # For T = 2 the projected sum never conflicts with either gradient (Yu et al., Theorem 1 setup).
    for seed in range(20):
        J = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        d = seeded()(J)
        assert (J @ d >= -1e-9 * J.norm() * d.norm()).all()


def test_seeded_runs_reproduce() -> None:
    J = torch.randn(8, 100)
    assert torch.equal(seeded(5)(J), seeded(5)(J))
    assert not torch.equal(seeded(5)(J), seeded(6)(J))


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(seeded()(J), J[0])


def test_no_conflict_means_sum() -> None:
    J = torch.rand(6, 40, dtype=torch.float64)  # all entries positive: no conflicts
    torch.testing.assert_close(seeded()(J), J.sum(0))


def test_owns_its_generator() -> None:
    J = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) - 0.3  # conflicts
    assert_owns_its_generator(PCGrad, J)
    assert PCGrad().state_dict().keys() == {"generator"}


def test_generator_is_checked() -> None:
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        PCGrad(generator=3)
