from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_permutation_invariant,
    assert_weights_match,
    matrices,
    matrix_families,
    matrix_ids,
)

from mtlgrad import ops
from mtlgrad.aggregators import AlignedMTL

MODES = ["min", "median", "rmse"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor, mode: str) -> None:
    agg = AlignedMTL(mode)
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: AlignedMTL(mode), J)


def reference_weights(G: torch.Tensor, mode: str) -> torch.Tensor:
    """Algorithm 1 of Senushkin et al. (2023) with the official code's rank and scale rules."""
    values, vectors = torch.linalg.eigh(G)
    T = G.shape[0]
    keep = values > values.max() * T * torch.finfo(torch.float32).eps
    values, vectors = values[keep], vectors[:, keep]
    sigma = {"min": values.min(), "median": values.median(), "rmse": values.mean()}[mode]
    B = sigma.sqrt() * vectors @ torch.diag(values.rsqrt()) @ vectors.T
    return B @ torch.ones(T, dtype=G.dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [2, 3, 4, 7, 16])
def test_weights_match_the_paper(T: int, mode: str) -> None:
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        J = torch.randn(T, 50, dtype=torch.float64, generator=gen)
        J = J * torch.rand(T, 1, dtype=torch.float64, generator=gen)
        assert_weights_match(AlignedMTL(mode), J, lambda G: reference_weights(G, mode), rtol=1e-9)
        # Rank-deficient: only the gradients' subspace is aligned.
        low_rank = torch.randn(T, 2, dtype=torch.float64, generator=gen) @ J[:2]
        assert_weights_match(
            AlignedMTL(mode), low_rank, lambda G: reference_weights(G, mode), rtol=1e-9
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_update_is_a_sum_of_orthogonal_equal_norm_gradients(mode: str, rank: int) -> None:
    # The aligned gradients (columns of Jᵀ B) satisfy Bᵀ G B = σ P, P the projector onto the
    # range of G: orthogonal, of norm √σ, spanning the gradients' subspace. So the update, their
    # sum, has ||d||² = σ 1ᵀ P 1 (σ T at full rank).
    gen = torch.Generator().manual_seed(rank)
    J = torch.randn(6, rank, dtype=torch.float64, generator=gen) @ torch.randn(
        rank, 40, dtype=torch.float64, generator=gen
    )
    d = AlignedMTL(mode)(J)
    values, vectors = torch.linalg.eigh(J @ J.T)
    kept, basis = values[-rank:], vectors[:, -rank:]
    sigma = {"min": kept.min(), "median": kept.median(), "rmse": kept.mean()}[mode]
    ones = torch.ones(6, dtype=torch.float64)
    expected = sigma * (basis.T @ ones).square().sum()
    assert float(d @ d) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "huge"])
def test_many_tasks(mode: str, name: str) -> None:
    J = matrix_families(64)[name]
    agg = AlignedMTL(mode)
    assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_weights_match(agg, J, lambda G: reference_weights(G, mode), rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_matches_torchjd(J: torch.Tensor, mode: str) -> None:
    # Same algorithm and scale modes; TorchJD averages the aligned gradients where the official
    # code (and we) sum them, hence the factor T.
    torchjd = pytest.importorskip("torchjd")
    expected = J.shape[0] * torchjd.aggregation.AlignedMTL(scale_mode=mode)(J)
    scale = float(J.norm(dim=1).max())
    torch.testing.assert_close(AlignedMTL(mode)(J), expected, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("mode", MODES)
def test_float32_rank_deficient_gradients(mode: str) -> None:
    # float32 gradients of rank 2: their Gram matrix (float32 products) has eigenvalues of
    # rounding noise, which the rank threshold must drop, or "min" would scale by noise.
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(8, 2, dtype=torch.float64, generator=gen) @ torch.randn(
        2, 5000, dtype=torch.float64, generator=gen
    )
    rows32 = list(J.float().unbind(0))
    w32 = AlignedMTL(mode).weights(ops.gram(rows32, 8))
    w64 = AlignedMTL(mode).weights(J @ J.T)
    torch.testing.assert_close(w32, w64, rtol=1e-4, atol=1e-4 * float(w64.abs().max()))


def test_rank_cut_drops_a_gradient_much_smaller_than_the_other() -> None:
    # Two orthogonal gradients, the second r times shorter: eigenvalues 1 and 1/r², cut below
    # 2 ε₃₂, i.e. past r = (2 ε₃₂)^(-1/2) = 2048. Below, d = g_1 / r + g_2 (both aligned gradients
    # of norm |g_2|); past it, d = g_1.
    g1 = torch.zeros(4, dtype=torch.float64)
    g1[0] = 1
    g2 = torch.zeros(4, dtype=torch.float64)
    g2[1] = 1
    for r in (1000.0, 2000.0):
        d = AlignedMTL()(torch.stack([g1, g2 / r]))
        torch.testing.assert_close(d, (g1 + g2) / r)
    torch.testing.assert_close(AlignedMTL()(torch.stack([g1, g2 / 2100])), g1)


def test_special_cases() -> None:
    g = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(AlignedMTL()(g.unsqueeze(0)), g)  # one task: its gradient
    # Orthogonal gradients of equal norm are already aligned: B = I for every mode.
    Q = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64))[0].T * 3.0
    for mode in MODES:
        torch.testing.assert_close(
            AlignedMTL(mode).weights(Q @ Q.T), torch.ones(4, dtype=torch.float64)
        )
    assert AlignedMTL().weights(torch.zeros(3, 3, dtype=torch.float64)).tolist() == [1.0, 1.0, 1.0]


def test_constructor_errors() -> None:
    with pytest.raises(
        ValueError, match="scale_mode must be one of 'min', 'median', 'rmse'; got 'max'"
    ):
        AlignedMTL("max")
    with pytest.raises(ValueError, match="scale_mode must be 'min', 'median' or 'rmse'"):
        torch.ops.mtlgrad.aligned_mtl_weights(torch.eye(2, dtype=torch.float64), "mean")


def test_opcheck() -> None:
    J = torch.randn(4, 20, dtype=torch.float64)
    for mode in MODES:
        torch.library.opcheck(torch.ops.mtlgrad.aligned_mtl_weights.default, (J @ J.T, mode))


def test_repr() -> None:
    assert repr(AlignedMTL()) == "AlignedMTL(scale_mode='min')"
    assert repr(AlignedMTL("rmse")) == "AlignedMTL(scale_mode='rmse')"


def test_256_tasks() -> None:
    J = torch.randn(256, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(256))
    w = AlignedMTL().weights(J @ J.T)
    assert w.shape == (256,) and torch.isfinite(w).all()
    torch.testing.assert_close(w, reference_weights(J @ J.T, "min"), rtol=1e-8, atol=1e-8)
