from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_non_conflicting,
    assert_permutation_invariant,
    matrices,
    matrix_families,
    matrix_ids,
)

from mtlgrad.aggregators import ConFIG


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    agg = ConFIG()
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(ConFIG, J)


# Rank-deficient with more tasks than the rank: u_iᵀ x = 1 has no solution, and the
# least-squares direction may conflict (as in the paper's method).
INDEPENDENT = [
    (J, name)
    for J, name in zip(matrices(), matrix_ids())
    if not (name.endswith("rank_deficient") and not name.startswith("T2"))
]


@pytest.mark.parametrize("J", [J for J, _ in INDEPENDENT], ids=[name for _, name in INDEPENDENT])
def test_non_conflicting(J: torch.Tensor) -> None:
    assert_non_conflicting(ConFIG(), J)


def reference_config(J: torch.Tensor) -> torch.Tensor:
    """Eq. (2) of Liu et al. (2024) on the gradients themselves, float64."""
    norms = J.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, J / norms.clamp_min(1e-300), torch.zeros_like(J))
    x = torch.linalg.pinv(units) @ torch.ones(J.shape[0], dtype=J.dtype)
    if x.norm() == 0:
        return torch.zeros_like(x)
    x_hat = x / x.norm()
    return (J @ x_hat).sum() * x_hat


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_paper(T: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(T, 60, dtype=torch.float64, generator=gen) * torch.rand(T, 1, generator=gen)
    d = ConFIG()(J)
    expected = reference_config(J)
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=1e-9 * float(expected.norm()))
    # The weights, recovered from the reference update (J has full row rank).
    G = J @ J.T
    expected_w = torch.linalg.solve(G, J @ expected)
    torch.testing.assert_close(ConFIG().weights(G), expected_w, rtol=1e-7, atol=1e-7)


def test_equal_projections_on_the_unit_gradients() -> None:
    # The defining property: every unit gradient has the same (positive) projection on d.
    J = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = J * torch.tensor([1e-3, 1.0, 5.0, 0.2, 30.0, 1.0], dtype=torch.float64).unsqueeze(1)
    d = ConFIG()(J)
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections.mean().expand(6), rtol=1e-10, atol=0)
    assert projections.min() > 0
    # ... and its length is the sum of the gradients' projections on its direction.
    assert float(d.norm()) == pytest.approx(float((J @ d).sum() / d.norm()), rel=1e-12)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "huge"])
def test_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg = ConFIG()
    assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    torch.testing.assert_close(
        agg(J), reference_config(J), rtol=1e-7, atol=1e-7 * float(J.abs().max())
    )


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_matches_torchjd(J: torch.Tensor) -> None:
    # Same equation, same equal task weights; TorchJD takes the pseudo-inverse of U by SVD
    # (torch.linalg.pinv), we of the cosine matrix by eigen-decomposition.
    torchjd = pytest.importorskip("torchjd")
    expected = torchjd.aggregation.ConFIG()(J)
    scale = float(J.norm(dim=1).max())
    torch.testing.assert_close(ConFIG()(J), expected, rtol=1e-9, atol=1e-9 * scale)


def test_special_cases() -> None:
    g = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # Two opposite gradients: no direction has a positive projection on both.
    assert ConFIG()(torch.stack([g, -g])).abs().max() == 0
    # A zero gradient does not change the direction of the others.
    J = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with_zero = torch.cat([J, torch.zeros(1, 40, dtype=torch.float64)])
    torch.testing.assert_close(ConFIG()(with_zero), ConFIG()(J))
    # One task: its gradient.
    torch.testing.assert_close(ConFIG()(g.unsqueeze(0)), g)


def test_opcheck() -> None:
    J = torch.randn(4, 20, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mtlgrad.config_weights.default, (J @ J.T,))


def test_repr() -> None:
    assert repr(ConFIG()) == "ConFIG()"


def test_256_tasks() -> None:
    J = torch.randn(256, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(256))
    w = ConFIG().weights(J @ J.T)
    assert w.shape == (256,) and torch.isfinite(w).all()
    d = J.T @ w
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections.mean().expand(256), rtol=1e-8, atol=0)
