from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    matrices,
    matrix_ids,
    scale_of,
)

from mtlgrad.aggregators import CosineGating


def reference_cosine_gating(J: torch.Tensor, main: int, weighted: bool) -> torch.Tensor:
    """Du et al. (2018) on the gradients: g_main + Σ_k [cos(g_main, g_k) > 0] · (1 or cos) · g_k."""
    d = J[main].clone()
    for k in range(J.shape[0]):
        if k == main:
            continue
        norms = J[main].norm() * J[k].norm()
        cosine = J[main] @ J[k] / norms if norms > 0 else torch.zeros((), dtype=J.dtype)
        if cosine > 0:
            d = d + (cosine if weighted else 1.0) * J[k]
    return d


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor, weighted: bool) -> None:
    main = J.shape[0] - 1
    agg = CosineGating(main=main, weighted=weighted)
    d = assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: CosineGating(main, weighted), J)
    # Never conflicts with the main task.
    assert J[main] @ d >= J[main] @ J[main] - 1e-9 * scale_of(J) ** 2
    # Invariant under permutations of the tasks (the main task moving with them).
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(1))
    permuted = CosineGating(main=int((perm == main).nonzero()), weighted=weighted)(J[perm])
    torch.testing.assert_close(permuted, d, rtol=1e-7, atol=1e-7 * scale_of(J))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("T", [2, 3, 8, 64])
def test_matches_the_paper(T: int, weighted: bool) -> None:
    J = torch.randn(T, 50, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    for main in {0, T // 2, T - 1}:
        expected = reference_cosine_gating(J, main, weighted)
        torch.testing.assert_close(CosineGating(main, weighted)(J), expected)


def test_gates() -> None:
    g = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    J = torch.stack([g, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0]), 0 * g])
    J = torch.cat([J, torch.tensor([[0.0, 0.0, 1.0]])]).double()  # orthogonal: cosine 0, closed
    G = J @ J.T
    torch.testing.assert_close(
        CosineGating(0).weights(G), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        CosineGating(0, weighted=True).weights(G),
        torch.tensor([1.0, 2**-0.5, 0.0, 0.0, 0.0], dtype=torch.float64),
    )
    # A zero main gradient closes every gate.
    torch.testing.assert_close(
        CosineGating(3).weights(G), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    )


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(CosineGating()(J), J[0])


def test_checks_and_repr() -> None:
    assert repr(CosineGating()) == "CosineGating(main=0, weighted=False)"
    assert repr(CosineGating(2, weighted=True)) == "CosineGating(main=2, weighted=True)"
    assert CosineGating().state_dict() == {}
    with pytest.raises(ValueError, match="main must be a non-negative int"):
        CosineGating(main=-1)
    with pytest.raises(ValueError, match="main must be a non-negative int"):
        CosineGating(main=1.0)
    with pytest.raises(TypeError, match="weighted must be a bool"):
        CosineGating(weighted=1)
    with pytest.raises(ValueError, match="CosineGating: main task 3 is out of range for 2 tasks"):
        CosineGating(main=3)(torch.randn(2, 5))


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    torch.library.opcheck(torch.ops.mtlgrad.cosine_gating_weights.default, (G, 1, True))
