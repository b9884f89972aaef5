from __future__ import annotations

import copy

import pytest
import torch
from aggregator_checks import matrix_families, train_tiny

from mtlgrad.aggregators import ExcessMTL, Mean


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def noisy_steps(T: int, steps: int, seed: int = 0, P: int = 30) -> list[torch.Tensor]:
    base = randn(T, P, seed=seed) * torch.linspace(0.5, 3, T, dtype=torch.float64)[:, None]
    return [base + 0.5 * randn(T, P, seed=seed + 1 + k) for k in range(steps)]


def reference_excess_mtl(
    Js: list[torch.Tensor], step_size: float, warmup: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eqs. 6-9 of He et al. (2024) on the matrices, float64: S += g², E = Σ g² / sqrt(S + 1e-7),
    r = E / E⁰ (E⁰: first estimate, or the warm-up mean), α ∝ α exp(η r). Returns (d, α)."""
    T = Js[0].shape[0]
    S = torch.zeros_like(Js[0])
    alpha = torch.full((T,), 1.0 / T, dtype=torch.float64)
    warm_sum = torch.zeros(T, dtype=torch.float64)
    baseline = None
    out = []
    for k, J in enumerate(Js, start=1):
        S = S + J**2
        E = (J**2 / torch.sqrt(S + 1e-7)).sum(1)
        if k <= warmup:
            warm_sum += E
            if k == warmup:
                baseline = warm_sum / warmup
        else:
            if baseline is None:
                baseline = E.clone()
            alpha = alpha * torch.exp(step_size * E / baseline)
            alpha = alpha / alpha.sum()
        out.append((alpha @ J, alpha.clone()))
    return out


@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("step_size", [1.0, 0.3])
def test_matches_the_papers_equations_over_several_steps(warmup: int, step_size: float) -> None:
    Js = noisy_steps(4, 7)
    agg = ExcessMTL(step_size=step_size, warmup_steps=warmup)
    for J, (d, alpha) in zip(Js, reference_excess_mtl(Js, step_size, warmup)):
        torch.testing.assert_close(agg(J), d, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(agg.state_dict()["weights"], alpha, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(alpha, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_matches_torchjd_after_warmup(seed: int) -> None:
    # TorchJD divides by E⁰ + 1e-7 (here E⁰ exactly): with excess risks of order 10 the two agree
    # to ~1e-8. Without warm-up TorchJD puts the first raw estimate into the exponent.
    torchjd = pytest.importorskip("torchjd")
    theirs = torchjd.aggregation.ExcessMTL(robust_step_size=0.5, n_warmup_steps=2)
    ours = ExcessMTL(step_size=0.5, warmup_steps=2)
    for J in noisy_steps(3, 6, seed=10 * seed):
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-6, atol=1e-7)


def test_permuting_the_tasks_permutes_the_weights() -> None:
    Js = noisy_steps(5, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a, b = ExcessMTL(), ExcessMTL()
    for J in Js:
        torch.testing.assert_close(b(J[perm]), a(J), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.state_dict()["weights"], a.state_dict()["weights"][perm])


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scales_stay_finite(scale: float, dtype: torch.dtype) -> None:
    # At 1e30 the squares of float32 gradients overflow; sqrt(S) is kept with hypot instead.
    agg = ExcessMTL()
    Js = noisy_steps(3, 4)
    for J in Js:
        d = agg((J * scale).to(dtype))
        assert d.dtype == dtype and torch.isfinite(d).all()
    if scale > 1 or dtype == torch.float64:
        # The 1e-7 under the root is negligible at 1e30: the weights are the scale-free ones of
        # the estimates without it. Far below sqrt(1e-7), E ∝ g² / sqrt(1e-7): the ratios are
        # again scale-free.
        expected = reference_excess_mtl([J * (1e15 if scale > 1 else 1e-15) for J in Js], 1, 0)
        torch.testing.assert_close(
            agg.state_dict()["weights"], expected[-1][1], rtol=1e-4, atol=1e-6
        )


def test_float32_matches_float64() -> None:
    a, b = ExcessMTL(), ExcessMTL()
    for J in noisy_steps(3, 4):
        torch.testing.assert_close(a(J.float()), b(J).float(), rtol=1e-5, atol=1e-5)
    assert a.state_dict()["root_sum_squares"][0].dtype == torch.float32


@pytest.mark.parametrize("name", ["rank_deficient", "duplicated_rows", "opposite", "one_zero_row"])
def test_singular_and_parallel_gradients(name: str) -> None:
    J = matrix_families(4)[name]
    Js = [J, 1.5 * J, J]
    agg = ExcessMTL()
    for J_step, (d, alpha) in zip(Js, reference_excess_mtl_with_zero_rows(Js)):
        torch.testing.assert_close(agg(J_step), d, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(agg.state_dict()["weights"], alpha)


def reference_excess_mtl_with_zero_rows(Js: list[torch.Tensor]) -> list:
    """As the reference, with ratio 0 for a task whose estimate (hence baseline) is 0."""
    T = Js[0].shape[0]
    S = torch.zeros_like(Js[0])
    alpha = torch.full((T,), 1.0 / T, dtype=torch.float64)
    baseline = None
    out = []
    for J in Js:
        S = S + J**2
        E = (J**2 / torch.sqrt(S + 1e-7)).sum(1)
        baseline = E.clone() if baseline is None else baseline
        ratio = torch.where(baseline > 0, E / baseline.clamp_min(1e-300), 0.0)
        alpha = alpha * torch.exp(ratio)
        alpha = alpha / alpha.sum()
        out.append((alpha @ J, alpha.clone()))
    return out


def test_single_task_returns_the_gradient() -> None:
    agg = ExcessMTL()
    for J in noisy_steps(1, 3):
        torch.testing.assert_close(agg(J), J[0])


def test_state_round_trip_resumes_bit_identically() -> None:
    a = ExcessMTL(step_size=0.7, warmup_steps=1)
    Js = noisy_steps(3, 6)
    for J in Js[:3]:
        a(J)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"step", "weights", "baseline", "warmup_sum", "root_sum_squares"}
    b = ExcessMTL(step_size=0.7, warmup_steps=1)
    b.load_state_dict(state)
    for J in Js[3:]:
        assert torch.equal(a(J), b(J))
    assert torch.equal(a.state_dict()["weights"], b.state_dict()["weights"])
    # A copy: changing the returned state does not change the aggregator.
    state = a.state_dict()
    state["root_sum_squares"][0].fill_(7.0)
    assert not torch.equal(a.state_dict()["root_sum_squares"][0], state["root_sum_squares"][0])


def test_state_belongs_to_its_tasks_and_parameters() -> None:
    agg = ExcessMTL()
    g = [randn(4, 3, seed=t) for t in range(2)] + [randn(5, seed=t) for t in range(2)]
    grads = [g[0], g[2], g[1], g[3]]  # task-major: task 0's (4x3, 5), then task 1's
    agg.aggregate(grads, 2, names=["trunk.weight", "trunk.bias"], task_names=["a", "b"])
    with pytest.raises(ValueError, match=r"trunk\.bias has shape \[6\].*built for shape \[5\]"):
        agg.aggregate(
            [g[0], randn(6), g[1], randn(6)],
            2,
            names=["trunk.weight", "trunk.bias"],
            task_names=["a", "b"],
        )
    with pytest.raises(ValueError, match=r"tasks \['a', 'b'\].*\['b', 'a'\]"):
        agg.aggregate(grads, 2, task_names=["b", "a"])
    with pytest.raises(ValueError, match="state for 2 tasks but got 1"):
        agg(randn(1, 17))
    agg.reset()
    agg(randn(1, 17))


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="step_size must be a positive number, got 0"):
        ExcessMTL(step_size=0)
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative int, got -1"):
        ExcessMTL(warmup_steps=-1)
    agg = ExcessMTL()
    with pytest.raises(ValueError, match="must have keys"):
        agg.load_state_dict({"weights": None})
    bad = {
        "step": 1,
        "weights": torch.tensor([0.5, 0.6]),
        "baseline": torch.ones(2),
        "warmup_sum": torch.zeros(2),
        "root_sum_squares": None,
    }
    with pytest.raises(ValueError, match="simplex"):
        agg.load_state_dict(bad)


def test_repr() -> None:
    assert repr(ExcessMTL()) == "ExcessMTL(step_size=1.0, warmup_steps=0)"


def test_trains_through_mtl_optimizer_and_resumes() -> None:
    assert torch.equal(train_tiny(ExcessMTL, 5), train_tiny(ExcessMTL, 5, resume_at=3))
    assert not torch.equal(train_tiny(ExcessMTL, 5), train_tiny(Mean, 5))
