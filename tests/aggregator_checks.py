"""Shared inputs and mathematical properties for the aggregator tests.

Each method's test file states which properties it claims, e.g.::

    @pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
    def test_properties(J):
        agg = UPGrad()
        assert_finite_and_shaped(agg, J)
        assert_non_conflicting(agg, J)
        assert_permutation_invariant(agg, J)
        assert_linear_under_scaling(agg, J)
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators import Aggregator, GramAggregator

P = 40


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def matrix_families(T: int, seed: int = 0) -> dict[str, Tensor]:
    """Named T x P float64 test matrices: the cases every method must handle."""
    g = _gen(seed + 100 * T)
    full = torch.randn(T, P, generator=g, dtype=torch.float64)
    families = {"random": full}
    if T >= 2:
        basis = torch.randn(2, P, generator=g, dtype=torch.float64)
        families["rank_deficient"] = torch.randn(T, 2, generator=g, dtype=torch.float64) @ basis
        families["duplicated_rows"] = torch.cat([full[: (T + 1) // 2], full[: T // 2]])
        families["opposite"] = (
            torch.cat([full[:1], -full[:1], full[2:]])
            if T > 2
            else torch.stack([full[0], -full[0]])
        )
        with_zero = full.clone()
        with_zero[T // 2] = 0
        families["one_zero_row"] = with_zero
        # Mostly conflicting: every pair at an obtuse angle.
        families["conflicting"] = torch.eye(T, P, dtype=torch.float64) - 0.9 / T
    families["all_zero"] = torch.zeros(T, P, dtype=torch.float64)
    families["tiny"] = full * 1e-15
    families["huge"] = full * 1e15
    return families


def matrices(tasks: tuple[int, ...] = (1, 2, 3, 8)) -> list[Tensor]:
    return [J for T in tasks for J in matrix_families(T).values()]


def matrix_ids(tasks: tuple[int, ...] = (1, 2, 3, 8)) -> list[str]:
    return [f"T{T}-{name}" for T in tasks for name in matrix_families(T)]


def spread_norm_matrices(count: int, decades: float = 8.0, seed: int = 10_000) -> list[Tensor]:
    """``count`` small float64 matrices (T = 3-5 tasks in P = 2-4 dimensions, so that the
    gradients interact) whose row norms spread log-uniformly over ``decades`` orders of magnitude:
    a gradient 1e-8 of the largest must be resolved like any other."""
    out = []
    for k in range(count):
        g = _gen(seed + k)
        T = int(torch.randint(3, 6, (1,), generator=g))
        P = int(torch.randint(2, 5, (1,), generator=g))
        J = torch.randn(T, P, generator=g, dtype=torch.float64)
        exponents = decades * torch.rand(T, 1, generator=g, dtype=torch.float64) - decades / 2
        out.append(J / J.norm(dim=1, keepdim=True) * 10**exponents)
    return out


def least_squares(A: Tensor, b: Tensor) -> Tensor:
    """argmin_x ||A x − b||, with the columns of A scaled to unit norm first, so that columns of
    very different norms are resolved alike (float64, QR-based)."""
    norms = A.norm(dim=0).clamp_min(torch.finfo(A.dtype).tiny)
    return torch.linalg.lstsq(A / norms, b.unsqueeze(1)).solution.squeeze(1) / norms


def assert_update_close(d: Tensor, expected: Tensor, w: Tensor, J: Tensor, rtol: float = 1e-6):
    """|d − expected| <= rtol |expected| + the rounding floor of the two computations: 1e-11
    Σ_t |w_t| |g_t| for d = Σ_t w_t g_t (the terms can cancel, e.g. to an exact answer of 0) and
    1e-13 max_t |g_t| for a float64 reference built from the rows themselves."""
    norms = J.norm(dim=1)
    floor = 1e-11 * float((w.abs() * norms).sum()) + 1e-13 * float(norms.max())
    error = float((d - expected).norm())
    assert error <= rtol * float(expected.norm()) + floor, (
        f"|d - expected| = {error:.3g}, |expected| = {float(expected.norm()):.3g}, row norms "
        f"{norms.tolist()}, weights {w.tolist()}"
    )


def scale_of(J: Tensor) -> float:
    return float(J.norm(dim=1).max()) or 1.0


def assert_finite_and_shaped(agg: Aggregator, J: Tensor) -> Tensor:
    d = agg(J)
    assert d.shape == (J.shape[1],), f"{agg}: shape {tuple(d.shape)}"
    assert d.dtype == J.dtype
    assert torch.isfinite(d).all(), f"{agg}: non-finite output"
    if isinstance(agg, GramAggregator):
        w = agg.weights(ops.gram(list(J.unbind(0)), J.shape[0]))
        assert w.shape == (J.shape[0],) and w.dtype == torch.float64
        assert torch.isfinite(w).all(), f"{agg}: non-finite weights {w}"
    return d


def assert_non_conflicting(agg: Aggregator, J: Tensor, rtol: float = 1e-6) -> None:
    """J d >= 0: the update does not increase any task's loss to first order.

    The tolerance is relative to |J| |d|, with a floor of 1e-11 |J|² |w|₁ for Gram-based methods:
    when the exact update is 0 (opposite or rank-deficient gradients), the computed one is
    rounding noise of that size.
    """
    d = agg(J)
    products = J @ d
    tolerance = rtol * scale_of(J) * max(float(d.norm()), 1e-300)
    if isinstance(agg, GramAggregator):
        w = agg.weights(ops.gram(list(J.unbind(0)), J.shape[0]))
        tolerance += 1e-11 * scale_of(J) ** 2 * float(w.abs().sum())
    assert (products >= -tolerance).all(), f"{agg}: J d = {products.tolist()}"


def assert_permutation_invariant(agg: Aggregator, J: Tensor, rtol: float = 1e-7) -> None:
    perm = torch.randperm(J.shape[0], generator=_gen(1))
    d, d_perm = agg(J), agg(J[perm])
    torch.testing.assert_close(d_perm, d, rtol=rtol, atol=rtol * scale_of(J))


def assert_linear_under_scaling(agg: Aggregator, J: Tensor, rtol: float = 1e-7) -> None:
    """agg(c J) = c agg(J) for c > 0."""
    for c in (1e-3, 7.0):
        torch.testing.assert_close(agg(c * J), c * agg(J), rtol=rtol, atol=rtol * c * scale_of(J))


def assert_weights_match(
    agg: GramAggregator, J: Tensor, reference: Callable[[Tensor], Tensor], rtol: float = 1e-7
) -> None:
    """The native weights agree with a float64 reference of the paper's equations."""
    G = J @ J.T
    w = agg.weights(G)
    expected = reference(G)
    torch.testing.assert_close(w, expected, rtol=rtol, atol=rtol * float(expected.abs().max() or 1))


def assert_owns_its_generator(make: Callable[[], Aggregator], J: Tensor, steps: int = 3) -> None:
    """A randomised method built without a generator draws from one of its own: seeded once from
    torch's global RNG (``torch.manual_seed`` reproduces a run), not moved by other draws from
    it, not shared with another instance, and restored by ``load_state_dict`` into a fresh
    instance (also built without one), which then repeats the run bit for bit."""
    torch.manual_seed(0)
    original = make()
    first = [original(J) for _ in range(steps)]
    torch.manual_seed(0)
    again = make()
    for expected in first:
        torch.randn(3)  # other draws from the global RNG between the calls
        assert torch.equal(again(J), expected), "torch.manual_seed does not reproduce the run"
    state = copy.deepcopy(original.state_dict())
    expected = [original(J) for _ in range(steps)]
    resumed = make()  # seeded from wherever the global RNG is now
    resumed.load_state_dict(state)
    for e in expected:
        assert torch.equal(resumed(J), e), "the resumed run differs"
    a, b = make(), make()
    assert not torch.equal(a(J), b(J)), "two instances draw the same numbers"


def assert_matrix_call_is_weighted_sum(make: Callable[[], GramAggregator], J: Tensor) -> None:
    """agg(J) is ``Jᵀ w`` with ``w`` the method's weights of ``G = J Jᵀ``, where G and the sum
    are float64 matrix products, independent of the native gram and combine kernels; ``make``
    builds a fresh aggregator (with a freshly seeded generator for randomised methods)."""
    d = make()(J)
    J64 = J.to(torch.float64)
    w = make().weights(J64 @ J64.T)
    expected = (w @ J64).to(J.dtype)
    atol = 1e-9 * scale_of(J) * max(1.0, float(w.abs().sum()))
    torch.testing.assert_close(d, expected, rtol=1e-9, atol=atol)


def train_tiny(
    make: Callable[[], Aggregator], steps: int, resume_at: int | None = None, num_tasks: int = 2
) -> Tensor:
    """Trains a tiny trunk + heads model with ``MTLOptimizer(SGD, make())`` and returns the
    trunk's weight; with ``resume_at``, the optimizer is rebuilt at that step from a deep copy of
    its ``state_dict()`` (a stateful method must then end bit-identically)."""
    from mtlgrad.optim import MTLOptimizer

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(num_tasks))
    params = [*trunk.parameters(), *heads.parameters()]
    x, y = torch.randn(16, 4), torch.randn(16, num_tasks)

    def build() -> MTLOptimizer:
        return MTLOptimizer(torch.optim.SGD(params, lr=0.1), make(), trunk.parameters())

    opt = build()
    for k in range(steps):
        if k == resume_at:
            state = copy.deepcopy(opt.state_dict())
            opt = build()
            opt.load_state_dict(state)
        z = trunk(x)
        losses = {f"t{t}": ((heads[t](z)[:, 0] - y[:, t]) ** 2).mean() for t in range(num_tasks)}
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
    return trunk[0].weight.detach().clone()
