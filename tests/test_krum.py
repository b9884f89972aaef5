from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_weights_match,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import Krum


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_scores(J: torch.Tensor, f: int) -> list[float]:
    T = J.shape[0]
    scores = []
    for i in range(T):
        d = sorted(float(((J[i] - J[j]) ** 2).sum()) for j in range(T) if j != i)
        scores.append(sum(d[: T - f - 2]))
    return scores


def selection_is_tied(J: torch.Tensor, f: int, m: int) -> bool:
    """Whether the m-th and (m+1)-th best scores are equal to rounding (e.g. every pair of the
    symmetric 'conflicting' family at the same distance): the selection is then up to rounding."""
    scores = sorted(reference_scores(J.double(), f))
    top = max(abs(s) for s in scores) or 1.0
    return m < len(scores) and scores[m] - scores[m - 1] <= 1e-9 * top


def reference_krum(J: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Blanchard et al. (2017), from the vectors themselves: s(i) = Σ ||V_i − V_j||² over the
    n − f − 2 closest V_j (j ≠ i); Multi-Krum averages the m lowest scores (ties: lower index)."""
    T = J.shape[0]
    scores = reference_scores(J, f)
    chosen = sorted(range(T), key=lambda i: (scores[i], i))[:m]
    w = torch.zeros(T, dtype=torch.float64)
    w[chosen] = 1.0 / m
    return w


def clustered(T: int, f: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """T − f gradients around a common one, f far away: the paper's setting."""
    g = gen(seed)
    honest = torch.randn(1, 40, generator=g, dtype=torch.float64)
    J = honest + 0.1 * torch.randn(T, 40, generator=g, dtype=torch.float64)
    J[T - f :] = 20 * torch.randn(f, 40, generator=g, dtype=torch.float64)
    return J * scale


@pytest.mark.parametrize("J", matrices((3, 8)), ids=matrix_ids((3, 8)))
def test_properties(J: torch.Tensor) -> None:
    agg = Krum(n_byzantine=0, n_selected=2)
    assert_finite_and_shaped(agg, J)
    if not selection_is_tied(J, 0, 2):
        assert_linear_under_scaling(agg, J)
        assert_matrix_call_is_weighted_sum(lambda: Krum(n_byzantine=0, n_selected=2), J)


@pytest.mark.parametrize("T,f,m", [(4, 1, 1), (5, 1, 2), (8, 2, 3), (8, 0, 8), (16, 5, 4)])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_paper(T: int, f: int, m: int, seed: int) -> None:
    J = torch.randn(T, 30, generator=gen(seed), dtype=torch.float64)
    J *= torch.rand(T, 1, generator=gen(seed + 9), dtype=torch.float64) * 10
    assert_weights_match(Krum(f, m), J, lambda G: reference_krum(J, f, m), rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selects_the_honest_gradients_at_any_scale(scale: float, dtype: torch.dtype) -> None:
    T, f = 9, 3
    J = clustered(T, f, seed=1, scale=scale).to(dtype)
    w = Krum(f, n_selected=T - f).weights(J.double() @ J.double().T)
    torch.testing.assert_close(w[: T - f], torch.full((T - f,), 1.0 / (T - f), dtype=w.dtype))
    assert (w[T - f :] == 0).all()
    d = Krum(f, n_selected=T - f)(J)
    assert d.dtype == dtype
    torch.testing.assert_close(d, J[: T - f].mean(0), rtol=1e-5, atol=0)


def test_permutation_moves_the_selection_with_the_tasks() -> None:
    J = clustered(8, 2, seed=3)
    for k in range(5):
        perm = torch.randperm(8, generator=gen(k))
        agg = Krum(2, 3)
        torch.testing.assert_close(
            agg.weights((J @ J.T)[perm][:, perm]), agg.weights(J @ J.T)[perm]
        )
        torch.testing.assert_close(agg(J[perm]), agg(J), rtol=1e-12, atol=0)


def test_duplicated_and_parallel_gradients() -> None:
    # Ties at distance 0 go to the lower index; equal gradients give the same update.
    g = torch.randn(30, generator=gen(2), dtype=torch.float64)
    J = torch.stack([3 * g, g, g, g, -5 * g])
    w = Krum(1).weights(J @ J.T)
    assert w.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(Krum(1)(J[[2, 0, 4, 3, 1]]), g)


def test_single_selection_is_one_of_the_gradients() -> None:
    J = torch.randn(6, 50, generator=gen(7))
    d = Krum(1)(J)
    assert any(torch.equal(d, row) for row in J)


@pytest.mark.parametrize("T,f,m", [(4, 1, 2), (7, 2, 3), (10, 3, 4)])
def test_matches_torchjd_when_the_scores_agree(T: int, f: int, m: int) -> None:
    # TorchJD sums the distances, the paper their squares: the same selection when the outliers
    # are clear (on random inputs they may differ). With one neighbour (T = 4, f = 1) the closest
    # pair ties; m = 2 takes both.
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = clustered(T, f, seed=T)
    torch.testing.assert_close(Krum(f, m)(J), torchjd_aggregation.Krum(f, m)(J))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_byzantine must be a non-negative int, got -1"):
        Krum(-1)
    with pytest.raises(ValueError, match="n_selected must be a positive int, got 0"):
        Krum(0, 0)
    with pytest.raises(ValueError, match=r"n_byzantine \+ 3 = 5 tasks .* got 4"):
        Krum(2)(torch.randn(4, 5))
    with pytest.raises(
        ValueError, match=r"n_selected=5\) averages n_selected gradients but got only 4"
    ):
        Krum(0, 5)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Krum(0).weights(torch.full((3, 3), float("nan"), dtype=torch.float64))


def test_repr_and_state() -> None:
    assert repr(Krum(2, 3)) == "Krum(n_byzantine=2, n_selected=3)"
    assert Krum(1).state_dict() == {}


def test_opcheck() -> None:
    J = torch.randn(5, 10, generator=gen(0), dtype=torch.float64)
    torch.library.opcheck(torch.ops.mtlgrad.krum_weights.default, (J @ J.T, 1, 2))
