from __future__ import annotations

import copy
import itertools

import pytest
import torch
from aggregator_checks import assert_finite_and_shaped, matrices, matrix_ids

from mtlgrad.aggregators import PCD


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_direction(J: torch.Tensor, tau: float) -> torch.Tensor:
    """min ½ ||d − g_1||² s.t. g_jᵀ d >= τ ||g_j||², by enumerating the active sets (the reference
    code's method, Appendix B.2 of the paper): the KKT point d = g_1 + Σ_{j∈S} μ_j g_j with μ_S >= 0
    solving the active constraints with equality and every other constraint satisfied."""
    g1, S = J[0], J[1:]
    m = S.shape[0]
    best = None
    for size in range(m + 1):
        for active in itertools.combinations(range(m), size):
            A = S[list(active)]
            if size:
                rhs = tau * (A * A).sum(1) - A @ g1
                mu = torch.linalg.solve(A @ A.T, rhs)
                if (mu < -1e-12).any():
                    continue
                d = g1 + mu @ A
            else:
                d = g1.clone()
            feasible = bool((S @ d >= tau * (S * S).sum(1) - 1e-9).all())
            if feasible and (best is None or (d - g1).norm() < (best - g1).norm()):
                best = d
    assert best is not None
    return best


def reference_pcd(steps: list[torch.Tensor], tau: float, beta: float, eps: float) -> torch.Tensor:
    """The update of the last step, with the bias-corrected moving average of the squared norms."""
    average = torch.zeros(steps[0].shape[0], dtype=torch.float64)
    for k, J in enumerate(steps, start=1):
        average = beta * average + (1 - beta) * (J * J).sum(1)
        scales = 1 / (average / (1 - beta**k) + eps).sqrt()
    d = reference_direction(scales[:, None] * J, tau)
    return d * J[0].norm() / d.norm()


@pytest.mark.parametrize("J", matrices((1, 2, 3, 8)), ids=matrix_ids((1, 2, 3, 8)))
def test_properties(J: torch.Tensor) -> None:
    assert_finite_and_shaped(PCD(tau=0.1), J)
    T = J.shape[0]
    if T > 2:  # the secondary tasks may be permuted
        perm = torch.cat(
            [torch.zeros(1, dtype=torch.long), 1 + torch.randperm(T - 1, generator=gen(1))]
        )
        scale = float(J.norm(dim=1).max()) or 1.0
        torch.testing.assert_close(
            PCD(tau=0.1)(J[perm]), PCD(tau=0.1)(J), rtol=1e-7, atol=1e-7 * scale
        )


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("tau", [0.0, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_matches_the_paper(T: int, tau: float, seed: int) -> None:
    steps = [
        torch.randn(T, 12, generator=gen(10 * seed + k), dtype=torch.float64)
        * torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]
        for k in range(3)
    ]
    agg = PCD(tau=tau, beta=0.9)
    for J in steps:
        d = agg(J)
    torch.testing.assert_close(d, reference_pcd(steps, tau, 0.9, 1e-8), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scales_and_dtypes(scale: float, dtype: torch.dtype) -> None:
    J = torch.randn(4, 20, generator=gen(4), dtype=torch.float64)
    expected = PCD(tau=0.3, eps=0.0)(J)
    d = PCD(tau=0.3, eps=0.0)((J * scale).to(dtype))
    assert d.dtype == dtype and torch.isfinite(d).all()
    torch.testing.assert_close(d.double() / scale, expected, rtol=1e-5, atol=1e-5)


def test_special_cases() -> None:
    g = torch.randn(20, generator=gen(1), dtype=torch.float64)
    h = torch.randn(20, generator=gen(2), dtype=torch.float64)
    # A zero primary gradient: zero update.
    assert PCD()(torch.stack([torch.zeros(20, dtype=torch.float64), g, h])).abs().max() == 0
    # Anti-parallel secondary gradients with tau > 0: incompatible constraints, the update is g_1.
    torch.testing.assert_close(PCD(tau=0.1)(torch.stack([h, g, -g])), h)
    # Duplicated secondary gradients: the same update as one of them.
    torch.testing.assert_close(
        PCD(tau=0.5)(torch.stack([h, g, g])),
        PCD(tau=0.5)(torch.stack([h, g])),
        rtol=1e-9,
        atol=1e-9,
    )
    # The update has the norm of the primary gradient and meets every constraint.
    J = torch.stack([h, g, -h + 0.1 * g])
    agg = PCD(tau=0.2)
    d = agg(J)
    torch.testing.assert_close(d.norm(), h.norm())
    assert len(agg.weights(J @ J.T)) == 3


def test_per_task_tau() -> None:
    J = torch.randn(4, 20, generator=gen(8), dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=[0.3, 0.3, 0.3])(J), PCD(tau=0.3)(J))
    with pytest.raises(ValueError, match="3 tau values .* got 5 tasks, i.e. 4 secondary"):
        PCD(tau=[0.3, 0.3, 0.3])(torch.randn(5, 4))


@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("tau", [0.02, 0.4])
def test_matches_torchjd_over_steps(T: int, tau: float) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    ours, theirs = PCD(tau=tau, beta=0.9), torchjd_aggregation.PCD(tau=tau, beta=0.9)
    for k in range(4):
        J = torch.randn(T, 30, generator=gen(100 * T + k), dtype=torch.float64)
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-9, atol=1e-12)


def test_state_round_trip_is_bit_identical() -> None:
    steps = [torch.randn(4, 25, generator=gen(k)) for k in range(6)]
    original = PCD(tau=0.3, beta=0.8)
    for J in steps[:3]:
        original(J)
    resumed = PCD(tau=0.3, beta=0.8)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    for J in steps[3:]:
        assert torch.equal(resumed(J), original(J))
    assert original.state_dict()["steps"] == 6
    original.reset()
    assert original.state_dict() == {"sq_norm_average": None, "steps": 0}


def test_bad_arguments_and_state() -> None:
    with pytest.raises(ValueError, match="tau must lie in"):
        PCD(tau=1.5)
    with pytest.raises(ValueError, match="tau values must lie in"):
        PCD(tau=[0.1, -0.1])
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\), got 1"):
        PCD(beta=1)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        PCD(eps=-1.0)
    agg = PCD()
    agg(torch.randn(3, 5))
    with pytest.raises(ValueError, match="of 3 tasks but got a 4 x 4 Gram matrix; call reset"):
        agg(torch.randn(4, 5))
    with pytest.raises(ValueError, match="expects state with keys"):
        agg.load_state_dict({"steps": 1})
    with pytest.raises(ValueError, match="unexpected state"):
        agg.load_state_dict({"sq_norm_average": None, "steps": 0, "other": 1})
    with pytest.raises(ValueError, match="non-negative finite"):
        agg.load_state_dict({"sq_norm_average": torch.tensor([-1.0, 1.0]), "steps": 1})


def test_repr() -> None:
    assert repr(PCD()) == "PCD(tau=0.02, beta=0.999, eps=1e-08)"
    assert repr(PCD(tau=[0.1, 0.2])) == "PCD(tau=[0.1, 0.2], beta=0.999, eps=1e-08)"


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=gen(0), dtype=torch.float64)
    args = (J @ J.T, torch.ones(4, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64))
    torch.library.opcheck(torch.ops.mtlgrad.pcd_weights.default, args)
