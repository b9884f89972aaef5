from __future__ import annotations

import itertools
import re

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    assert_permutation_invariant,
    assert_update_close,
    assert_weights_match,
    least_squares,
    matrices,
    matrix_families,
    matrix_ids,
    scale_of,
    spread_norm_matrices,
)

from mtlgrad import ops
from mtlgrad.aggregators import MGDA


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(J: torch.Tensor) -> list[torch.Tensor]:
    return list(J.unbind(0))


def assert_non_conflicting(agg: MGDA, J: torch.Tensor, rtol: float = 1e-6) -> None:
    """J d >= 0, to rounding. The shared check's tolerance is relative to |d|; when the min-norm
    point is 0 (0 in the convex hull) the computed d is rounding noise, so the tolerance here adds
    the floor of rounding and of the solver's KKT tolerance, relative to |J|² |w|₁."""
    w = agg.weights(ops.gram(rows(J), J.shape[0]))
    d = agg(J)
    scale = scale_of(J)
    tolerance = rtol * scale * float(d.norm()) + 1e-11 * scale**2 * float(w.abs().sum())
    products = J @ d
    assert (products >= -tolerance).all(), f"{agg}: J d = {products.tolist()}"


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    agg = MGDA()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(MGDA, J)
    w = agg.weights(J @ J.T)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties_with_l2_normalization(J: torch.Tensor) -> None:
    agg = MGDA("l2")
    assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: MGDA("l2"), J)
    if J.shape[0] < 3 or not torch.equal(J, matrix_families(J.shape[0])["rank_deficient"]):
        # With more normalised gradients than dimensions, 0 is typically in their hull with
        # many weight vectors, which give different combinations of the original gradients:
        # the official convention is not permutation invariant there.
        assert_permutation_invariant(agg, J)


@pytest.mark.parametrize("name", ["random", "rank_deficient", "duplicated_rows", "conflicting"])
def test_properties_with_many_tasks(name: str) -> None:
    J = matrix_families(64)[name]
    agg = MGDA()
    assert_finite_and_shaped(agg, J)
    assert_non_conflicting(agg, J)
    assert_permutation_invariant(agg, J)
    assert_linear_under_scaling(agg, J)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties_with_loss_normalizations(J: torch.Tensor, normalization: str) -> None:
    T = J.shape[0]
    losses = torch.rand(T, dtype=torch.float64, generator=_gen(T)) + 0.1
    agg = MGDA(normalization)
    d = agg.aggregate(rows(J), T, losses=losses).out[0]
    assert torch.isfinite(d).all()
    for c in (1e-3, 7.0):
        scaled = agg.aggregate(rows(c * J), T, losses=losses).out[0]
        torch.testing.assert_close(scaled, c * d, rtol=1e-7, atol=1e-7 * c * scale_of(J))
    if T < 3 or not torch.equal(J, matrix_families(T)["rank_deficient"]):
        perm = torch.randperm(T, generator=_gen(1))
        permuted = agg.aggregate(rows(J[perm]), T, losses=losses[perm]).out[0]
        torch.testing.assert_close(permuted, d, rtol=1e-7, atol=1e-7 * scale_of(J))


# ---- references -------------------------------------------------------------------------------


def min_norm_weights(G: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of wᵀ G w (Sener & Koltun, Eq. 3) for a positive definite G, by
    enumerating supports S: G_SS w_S = λ 1, Σ w_S = 1, w_S >= 0 and (G w)_i >= λ for all i."""
    T = G.shape[0]
    for size in range(1, T + 1):
        for S in itertools.combinations(range(T), size):
            S = list(S)
            K = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            K[:size, :size] = G[S][:, S]
            K[:size, size] = -1
            K[size, :size] = 1
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1
            solution = torch.linalg.solve(K, rhs)
            w = torch.zeros(T, dtype=torch.float64)
            w[S] = solution[:size]
            lam = solution[size]
            if (w >= 0).all() and (G @ w >= lam - 1e-10 * G.diagonal().max()).all():
                return w
    raise AssertionError("no support satisfies the KKT conditions")


def min_norm_point(J: torch.Tensor) -> torch.Tensor:
    """The min-norm point p of the convex hull of the rows of J, in the primal, by enumerating
    supports S: p is the min-norm point of their affine hull (a least-squares problem in the
    differences g_s − g_first), with non-negative weights, and g_iᵀ p >= |p|² for every row (KKT).
    Tolerances are relative to each row's own norm (and to the rounding of the largest)."""
    T = J.shape[0]
    norms = J.norm(dim=1)
    for size in range(1, T + 1):
        for S in itertools.combinations(range(T), size):
            first, rest = J[S[0]], J[list(S[1:])]
            beta = least_squares((rest - first).T, -first) if size > 1 else first[:0]
            if (beta < -1e-12).any() or beta.sum() > 1 + 1e-12:
                continue
            p = first + (rest - first).T @ beta if size > 1 else first
            slack = J @ p - p @ p
            if (slack >= -1e-9 * norms * p.norm() - 1e-12 * norms * norms.max()).all():
                return p
    raise AssertionError("no support satisfies the KKT conditions")


def normalizers(J: torch.Tensor, losses: torch.Tensor | None, normalization: str) -> torch.Tensor:
    """The official code's gradient_normalizers."""
    norms = J.norm(dim=1)
    return {
        "none": torch.ones_like(norms),
        "l2": norms,
        "loss": losses,
        "loss+": losses * norms if losses is not None else None,
    }[normalization]


def reference_mgda(J: torch.Tensor, normalization: str = "none", losses=None) -> torch.Tensor:
    """The official training step: normalise the gradients, solve the min-norm problem on them,
    then scale the ORIGINAL losses (hence gradients) by the solution."""
    normalised = J / normalizers(J, losses, normalization)[:, None]
    w = min_norm_weights(normalised @ normalised.T)
    return J.T @ w


@pytest.mark.parametrize("T", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(2))
def test_weights_match_the_min_norm_problem(T: int, seed: int) -> None:
    J = torch.randn(T, 30, dtype=torch.float64, generator=_gen(seed))
    J[0] *= 3  # a long gradient that is not in the support
    assert_weights_match(MGDA(), J, min_norm_weights)
    torch.testing.assert_close(MGDA()(J), reference_mgda(J))


def test_gradients_whose_norms_span_eight_decades() -> None:
    # The min-norm point is at most the smallest gradient's norm; it must be found to that
    # gradient's precision, not to the largest one's.
    for J in spread_norm_matrices(150):
        w = MGDA().weights(J @ J.T)
        assert_update_close(J.T @ w, min_norm_point(J), w, J)


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_normalizations_follow_the_official_code(normalization: str, T: int) -> None:
    J = torch.randn(T, 30, dtype=torch.float64, generator=_gen(T))
    J *= torch.linspace(0.1, 5.0, T, dtype=torch.float64)[:, None]  # different norms
    losses = torch.linspace(3.0, 0.2, T, dtype=torch.float64)
    agg = MGDA(normalization)
    out = agg.aggregate(rows(J), T, losses=losses)
    torch.testing.assert_close(out.out[0], reference_mgda(J, normalization, losses))
    # The weights are the min-norm weights of the normalised gradients and apply to the
    # original ones: not the same as solving on the normalised gradients and using them.
    normalised = J / normalizers(J, losses, normalization)[:, None]
    torch.testing.assert_close(out.weights, min_norm_weights(normalised @ normalised.T))


def test_weights_match_projected_gradient_with_many_tasks() -> None:
    # T = 64: plain projected-gradient iterations on the simplex (G is well conditioned for
    # P = 1000, so they converge to rounding); the first eight gradients lie beyond the min-norm
    # point and get weight 0.
    T = 64
    J = torch.randn(T, 1000, dtype=torch.float64, generator=_gen(3))
    J[:8] = 3 * J[8:].mean(0) + 0.1 * J[:8]
    G = J @ J.T
    Q = G / G.trace()
    step = 1 / torch.linalg.eigvalsh(Q).max()
    w = torch.full((T,), 1 / T, dtype=torch.float64)
    for _ in range(600):
        w = project_onto_simplex(w - step * (Q @ w))
    assert (w[:8] == 0).all() and (w[8:] > 0).all()
    torch.testing.assert_close(MGDA().weights(G), w, rtol=1e-9, atol=1e-12)


def project_onto_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, Σ w = 1} (sort-based)."""
    u, _ = torch.sort(x, descending=True)
    cumulative = u.cumsum(0) - 1
    k = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    rho = int((u - cumulative / k > 0).nonzero().max())
    return (x - cumulative[rho] / (rho + 1)).clamp_min(0)


def test_large_inputs_are_finite() -> None:
    # T = 256, in 40 dimensions (nearly rank-deficient) and in 2000.
    near = matrix_families(256)["rank_deficient"] + 1e-3 * torch.randn(256, 40, generator=_gen(1))
    for J in (near, torch.randn(256, 2000, dtype=torch.float64, generator=_gen(2))):
        assert_finite_and_shaped(MGDA(), J)


# ---- behaviour ----------------------------------------------------------------------------------


def test_min_norm_point_is_below_every_gradient() -> None:
    # KKT of the min-norm problem: g_i · d >= |d|² for every task (equality on the support).
    J = torch.randn(8, 30, dtype=torch.float64, generator=_gen(2))
    d = MGDA()(J)
    assert (J @ d >= (d @ d) * (1 - 1e-9)).all()


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    for normalization in ("none", "l2"):
        torch.testing.assert_close(MGDA(normalization)(J), J[0])


def test_pareto_stationary_gradients_give_zero() -> None:
    g = torch.randn(50, dtype=torch.float64, generator=_gen(0))
    J = torch.stack([g, -2 * g, torch.zeros(50, dtype=torch.float64)])
    assert MGDA()(J[:2]).norm() < 1e-12 * g.norm()
    torch.testing.assert_close(MGDA()(J), torch.zeros(50, dtype=torch.float64))


def test_zero_gradient_under_l2_normalization() -> None:
    J = torch.randn(3, 20, dtype=torch.float64, generator=_gen(1))
    J[1] = 0
    agg = MGDA("l2")
    torch.testing.assert_close(
        agg.weights(J @ J.T), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(agg(J), torch.zeros(20, dtype=torch.float64))


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_loss_normalizations_need_the_losses(normalization: str) -> None:
    J = torch.randn(3, 20)
    agg = MGDA(normalization)
    expected = re.escape(f"MGDA(normalization='{normalization}') needs the task losses")
    with pytest.raises(ValueError, match=expected):
        agg.weights(J @ J.T)
    with pytest.raises(ValueError, match=expected):
        agg(J)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_loss_normalizations_check_the_losses(bad: float) -> None:
    J = torch.randn(3, 20, dtype=torch.float64)
    losses = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match="positive and finite; task 1 has loss"):
        MGDA("loss").aggregate(rows(J), 3, losses=losses)


def test_other_normalizations_ignore_the_losses() -> None:
    J = torch.randn(4, 20, dtype=torch.float64, generator=_gen(4))
    G = J @ J.T
    losses = torch.tensor([-1.0, 0.0, float("nan"), 2.0])
    for normalization in ("none", "l2"):
        agg = MGDA(normalization)
        torch.testing.assert_close(agg.weights(G, losses), agg.weights(G))


def test_opcheck() -> None:
    G = ops.gram(rows(matrix_families(5)["random"]), 5)
    op = torch.ops.mtlgrad.mgda_weights.default
    torch.library.opcheck(op, (G, "none", None))
    torch.library.opcheck(op, (G, "loss+", torch.linspace(1, 2, 5, dtype=torch.float64)))


# ---- TorchJD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_matches_torchjd(T: int) -> None:
    pytest.importorskip("torchjd")
    from torchjd.aggregation import MGDA as TorchJDMGDA

    J = torch.randn(T, 40, dtype=torch.float64, generator=_gen(20 + T))
    # TorchJD runs the paper's Frank-Wolfe iterations (Algorithm 2), by default to a step of
    # 1e-3 or 100 iterations; run to convergence it agrees with the exact solution.
    expected = TorchJDMGDA(epsilon=1e-12, max_iters=100_000)(J)
    torch.testing.assert_close(MGDA()(J), expected, rtol=1e-7, atol=1e-9 * float(J.norm()))
    assert (MGDA()(J) - TorchJDMGDA()(J)).norm() <= 0.2 * expected.norm()


# ---- construction and state ---------------------------------------------------------------------


def test_constructor_checks_normalization() -> None:
    for bad in ("L2", "l1", "", None):
        with pytest.raises(ValueError, match="normalization must be one of 'none', 'l2'"):
            MGDA(bad)


def test_repr() -> None:
    assert repr(MGDA()) == "MGDA(normalization='none')"
    assert repr(MGDA("loss+")) == "MGDA(normalization='loss+')"


def test_state_round_trip() -> None:
    agg = MGDA("l2")
    state = agg.state_dict()
    assert state == {}
    agg.load_state_dict(state)
    agg.reset()
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"x": 1})
