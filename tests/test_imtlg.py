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

from mtlgrad.aggregators import IMTLG


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_imtlg(G: torch.Tensor, pinv: bool = False) -> torch.Tensor:
    """The closed form of Liu et al. (2021) on the gradients' Gram matrix, with task 1 (the first
    non-zero gradient) as reference: α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T}, where
    D = [g_1 − g_t]_t and U = [u_1 − u_t]_t. Zero gradients get weight 0."""
    weights = torch.zeros(G.shape[0], dtype=torch.float64)
    tasks = [t for t in range(G.shape[0]) if G[t, t] > 0]
    if not tasks:
        return weights
    n = len(tasks)
    Gs = G[tasks][:, tasks]
    gu = Gs / Gs.diagonal().sqrt()[None, :]  # gu[i, j] = g_i · u_j
    DU = torch.zeros(n - 1, n - 1, dtype=torch.float64)
    g1U = torch.zeros(n - 1, dtype=torch.float64)
    for i in range(1, n):
        g1U[i - 1] = gu[0, 0] - gu[0, i]
        for j in range(1, n):
            DU[i - 1, j - 1] = gu[0, 0] - gu[0, j] - gu[i, 0] + gu[i, j]
    rest = g1U @ (torch.linalg.pinv(DU) if pinv else torch.linalg.inv(DU))
    weights[tasks[0]] = 1 - rest.sum()
    weights[tasks[1:]] = rest
    return weights


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    agg = IMTLG()
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(IMTLG, J)


@pytest.mark.parametrize("T", [2, 3, 5, 8, 64])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_paper(T: int, seed: int) -> None:
    J = torch.randn(T, max(2 * T, 30), generator=gen(seed), dtype=torch.float64)
    J *= torch.rand(T, 1, generator=gen(seed + 9), dtype=torch.float64) * 10
    assert_weights_match(IMTLG(), J, reference_imtlg, rtol=1e-9)
    # The defining property: equal projections of the update on the unit gradients.
    d = IMTLG()(J)
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(T))


@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("name", ["duplicated_rows", "rank_deficient", "opposite"])
def test_singular_systems_use_the_pseudo_inverse(T: int, name: str) -> None:
    J = matrix_families(T)[name]
    G = J @ J.T
    expected = reference_imtlg(G, pinv=True)
    torch.testing.assert_close(IMTLG()(J), J.T @ expected, rtol=1e-7, atol=1e-7 * float(J.norm()))


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_nearly_parallel_gradients_in_any_order(T: int) -> None:
    # Gradients parallel up to 1e-9: the system is singular to rounding, and which solution is
    # returned must not depend on the order of the tasks (differences of 0.1-0.9 of |d| when
    # rounding was inverted relative to task 1).
    for seed in range(3):
        base = torch.randn(50, generator=gen(seed), dtype=torch.float64)
        noise = torch.randn(T, 50, generator=gen(seed + 10), dtype=torch.float64)
        scales = 0.5 + torch.rand(T, 1, generator=gen(seed + 20), dtype=torch.float64)
        J = base * (1 + 1e-9 * noise) * scales
        d = IMTLG()(J)
        for k in range(6):
            perm = torch.randperm(T, generator=gen(100 * seed + k))
            torch.testing.assert_close(IMTLG()(J[perm]), d, rtol=0, atol=1e-10 * float(d.norm()))


def test_parallel_gradients_get_the_limit_of_nearly_parallel_ones() -> None:
    # g and 3g: every α with Σ α = 1 has equal projections. The weights are those of g and
    # 3g + εh as ε -> 0 (the paper's closed form: α ∝ 1 / ||g_t||), i.e. pinv(G) √diag(G)
    # normalised, as TorchJD.
    g = torch.randn(30, generator=gen(5), dtype=torch.float64)
    h = torch.randn(30, generator=gen(6), dtype=torch.float64)
    expected = torch.tensor([0.75, 0.25], dtype=torch.float64)
    near = torch.stack([g, 3 * g + 1e-4 * h])
    torch.testing.assert_close(reference_imtlg(near @ near.T), expected, rtol=1e-3, atol=0)
    J = torch.stack([g, 3 * g])
    torch.testing.assert_close(IMTLG().weights(J @ J.T), expected)


def test_dependent_gradients_without_conflict_give_zero() -> None:
    # Three pairwise acute gradients in a plane: no update in the plane has equal, non-zero
    # projections on all three, so the update is 0 (also the paper's closed form, D Uᵀ being
    # invertible here), although nothing conflicts.
    J = torch.tensor([[1.0, 0.2, 0.0], [0.8, 0.6, 0.0], [0.9, 0.1, 0.0]], dtype=torch.float64)
    assert (J @ J.T > 0).all()
    assert float(IMTLG()(J).norm()) < 1e-12
    torch.testing.assert_close(J.T @ reference_imtlg(J @ J.T), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("duplicated", [False, True])
def test_256_tasks(duplicated: bool) -> None:
    J = torch.randn(256, 600, generator=gen(13), dtype=torch.float64)
    if duplicated:  # a singular system: the pseudo-inverse path
        J[128:] = J[:128]
    d = IMTLG()(J)
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(256), rtol=1e-9, atol=1e-9)


def test_zero_gradient_gets_weight_zero() -> None:
    J = torch.randn(4, 30, generator=gen(4), dtype=torch.float64)
    J[0] = 0
    w = IMTLG().weights(J @ J.T)
    assert w[0] == 0
    torch.testing.assert_close(w[1:], IMTLG().weights(J[1:] @ J[1:].T))


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(IMTLG()(J), J[0])


def test_repr_and_state() -> None:
    assert repr(IMTLG()) == "IMTLG()"
    assert IMTLG().state_dict() == {}


@pytest.mark.parametrize("T", [2, 3, 8])
def test_matches_torchjd(T: int) -> None:
    # TorchJD computes pinv(G) √diag(G) normalised to sum 1: the same weights for invertible G.
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(T, 40, generator=gen(T), dtype=torch.float64)
    torch.testing.assert_close(IMTLG()(J), torchjd_aggregation.IMTLG()(J), rtol=1e-9, atol=1e-12)


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    torch.library.opcheck(torch.ops.mtlgrad.imtlg_weights.default, (G,))
