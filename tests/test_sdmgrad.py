from __future__ import annotations

import copy

import pytest
import torch
from test_modo import simplex_projection_by_bisection, train

from mtlgrad.aggregators import SDMGrad


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_sdmgrad(
    steps: list[torch.Tensor],
    T: int,
    lam: float,
    lr: float = 10.0,
    momentum: float = 0.5,
    iterations: int = 20,
) -> torch.Tensor:
    """Algorithm 1 of the paper over the steps (each a (S T) x P matrix): ``iterations``
    momentum steps w ← Π(w − lr u), u ← μ u + G(ξ)ᵀ (G(ξ') w + λ g₀(ξ')) / s² with the
    gradients themselves (not their Gram matrix), w kept between steps; the last step's update
    (G(ζ) w + λ g₀(ζ)) / (1 + λ), ζ the third sub-batch or the mean of the two."""
    w = torch.full((T,), 1.0 / T, dtype=torch.float64)
    for J in steps:
        J1, J2 = J[:T], J[T : 2 * T]
        s = torch.stack([(J1[i] @ J2[i]).clamp_min(0).sqrt() for i in range(T)]).mean()
        u = torch.zeros(T, dtype=torch.float64)
        for _ in range(iterations):
            direction = J2.T @ w + lam * J2.mean(0)  # G(ξ') w + λ g₀(ξ')
            u = momentum * u + J1 @ direction / s**2
            w = simplex_projection_by_bisection(w - lr * u)
    J = steps[-1]
    Jz = 0.5 * (J[:T] + J[T:]) if J.shape[0] == 2 * T else J[2 * T :]
    return (Jz.T @ w + lam * Jz.mean(0)) / (1 + lam)


def steps(T: int, samples: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    # Correlated sub-batches (a common part and noise), so that the cross block's diagonal is
    # positive, as for sub-batches of one batch.
    out = []
    for k in range(count):
        g = gen(seed + k)
        common = torch.randn(T, 15, generator=g, dtype=torch.float64)
        noise = 0.5 * torch.randn(samples, T, 15, generator=g, dtype=torch.float64)
        out.append((common + noise).reshape(samples * T, 15))
    return out


@pytest.mark.parametrize("T", [1, 2, 3, 6])
@pytest.mark.parametrize("samples", [2, 3])
@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_matches_the_paper_over_steps(T: int, samples: int, lam: float) -> None:
    Js = steps(T, samples, 4, seed=10 * T + samples)
    agg = SDMGrad(T, lambda_=lam)
    for k in range(len(Js)):
        d = agg(Js[k])
        torch.testing.assert_close(d, reference_sdmgrad(Js[: k + 1], T, lam), rtol=1e-8, atol=1e-10)


def test_momentum_and_iterations_reach_the_solve() -> None:
    Js = steps(4, 3, 3, seed=3)
    agg = SDMGrad(4, lambda_=0.1, lr=0.5, momentum=0.9, iterations=7)
    for k in range(len(Js)):
        expected = reference_sdmgrad(Js[: k + 1], 4, 0.1, lr=0.5, momentum=0.9, iterations=7)
        torch.testing.assert_close(agg(Js[k]), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("samples", [2, 3])
def test_weights_layout_and_simplex(samples: int) -> None:
    J = steps(3, samples, 1)[0]
    agg = SDMGrad(3, lambda_=0.5)
    w = agg.weights(J @ J.T)
    inner = agg.state_dict()["weights"]
    assert inner.min() >= 0 and abs(float(inner.sum()) - 1) < 1e-12
    v = (inner + 0.5 / 3) / 1.5
    expected = [v / 2, v / 2] if samples == 2 else [torch.zeros(6, dtype=torch.float64), v]
    torch.testing.assert_close(w, torch.cat(expected), rtol=0, atol=1e-15)


def test_a_large_lambda_tends_to_the_mean() -> None:
    J = steps(3, 2, 1)[0]
    w = SDMGrad(3, lambda_=1e9).weights(J @ J.T)
    torch.testing.assert_close(w, torch.full((6,), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize("samples", [2, 3])
def test_permuting_the_tasks_in_every_sub_batch_permutes_the_weights(samples: int) -> None:
    T = 4
    perm = torch.randperm(T, generator=gen(3))
    rows = torch.cat([s * T + perm for s in range(samples)])
    original, permuted = SDMGrad(T), SDMGrad(T)
    for J in steps(T, samples, 4, seed=5):
        torch.testing.assert_close(permuted(J[rows]), original(J), rtol=1e-10, atol=1e-12)
        w, w_perm = original.state_dict()["weights"], permuted.state_dict()["weights"]
        torch.testing.assert_close(w_perm, w[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_under_scaling_and_dtypes(scale: float, dtype: torch.dtype) -> None:
    agg, expected_agg = SDMGrad(3), SDMGrad(3)
    for J in steps(3, 3, 3, seed=7):
        expected = expected_agg(J)
        d = agg((J * scale).to(dtype))
        assert d.dtype == dtype and torch.isfinite(d).all()
        torch.testing.assert_close(d.double() / scale, expected, rtol=1e-5, atol=1e-6)


def test_no_positive_diagonal_and_zero_gradients() -> None:
    T = 3
    J1 = torch.randn(T, 10, generator=gen(1), dtype=torch.float64)
    J = torch.cat([J1, -J1])  # every g_i(ξ) · g_i(ξ') < 0: normalised by the largest entry
    agg = SDMGrad(T)
    d = agg(J)
    assert torch.isfinite(d).all()
    cross = J1 @ -J1.T
    w = torch.full((T,), 1.0 / T, dtype=torch.float64)
    u = torch.zeros(T, dtype=torch.float64)
    for _ in range(20):
        u = 0.5 * u + cross @ (w + 0.3 / T) / cross.abs().max()
        w = simplex_projection_by_bisection(w - 10 * u)
    torch.testing.assert_close(agg.state_dict()["weights"], w, rtol=1e-9, atol=1e-12)
    zero = SDMGrad(T)
    assert torch.equal(zero(torch.zeros(2 * T, 10)), torch.zeros(10))
    assert torch.equal(zero.state_dict()["weights"], torch.full((T,), 1 / T, dtype=torch.float64))


@pytest.mark.parametrize("samples", [2, 3])
def test_matches_torchjd_over_steps(samples: int) -> None:
    jd = pytest.importorskip("torchjd.aggregation")
    T = 3
    ours, theirs = SDMGrad(T, lambda_=0.4), jd.SDMGradWeighting(lambda_=0.4)
    for J in steps(T, samples, 5, seed=20):
        w = ours.weights(J @ J.T)
        # TorchJD's input is J₁ J₂ᵀ; it divides by s² + 1e-8 (here s² ≈ 15: a 1e-9 difference).
        v = theirs(J[:T] @ J[T : 2 * T].T)
        expected = torch.cat([v / 2, v / 2]) if samples == 2 else torch.cat([0 * v] * 2 + [v])
        torch.testing.assert_close(w, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("samples", [2, 3])
def test_training_loop_matches_torchjds_loop(samples: int) -> None:
    """MoDo's training loop with SDMGrad, against TorchJD's documented loop (λ-weights from
    ``SDMGradWeighting(J₁ J₂ᵀ)`` with the Jacobians of the trunk, then a weighted backward)."""
    jd = pytest.importorskip("torchjd.aggregation")
    from test_modo import data, tiny_model
    from training_helpers import sub_batch_losses

    ours = train(lambda: SDMGrad(2), samples, 4, scale_task_params=True)
    trunk, heads = tiny_model()
    params = [*trunk.parameters(), *heads.parameters()]
    weighting = jd.SDMGradWeighting()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for k in range(4):
        x, y = data(k)
        losses = list(sub_batch_losses(trunk, heads, x, y, samples).values())
        per_sample = [torch.stack(losses[2 * s : 2 * s + 2]) for s in range(samples)]
        jacobians = [
            torch.stack(
                [
                    torch.cat(
                        [
                            g.flatten()
                            for g in torch.autograd.grad(
                                loss, list(trunk.parameters()), retain_graph=True
                            )
                        ]
                    )
                    for loss in sample_losses
                ]
            )
            for sample_losses in per_sample[:2]
        ]
        v = weighting(jacobians[0] @ jacobians[1].T)
        optimizer.zero_grad()
        target = (per_sample[0] + per_sample[1]) / 2 if samples == 2 else per_sample[2]
        target.backward(v)
        optimizer.step()
    for p, q in zip(torch.nn.ModuleList([trunk, heads]).parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_state_round_trip_is_bit_identical() -> None:
    Js = [J.float() for J in steps(3, 2, 6, seed=30)]
    original = SDMGrad(3)
    for J in Js[:3]:
        original(J)
    resumed = SDMGrad(3)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    for J in Js[3:]:
        assert torch.equal(resumed(J), original(J))
    original.reset()
    assert original.state_dict() == {"weights": None}


def test_resume_through_the_optimizer_is_bit_identical() -> None:
    straight = train(lambda: SDMGrad(2), 3, 6)
    resumed = train(lambda: SDMGrad(2), 3, 6, resume_at=3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_bad_arguments_and_state() -> None:
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 2.0"):
        SDMGrad(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lambda_ must be a non-negative number, got -0.1"):
        SDMGrad(2, lambda_=-0.1)
    with pytest.raises(ValueError, match="lr must be a positive number, got 0"):
        SDMGrad(2, lr=0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got 1"):
        SDMGrad(2, momentum=1)
    with pytest.raises(ValueError, match="iterations must be a positive int, got 0"):
        SDMGrad(2, iterations=0)
    with pytest.raises(ValueError, match=r"SDMGrad\(num_tasks=3\) expects 2 \* 3 or 3 \* 3 losses"):
        SDMGrad(3)(torch.randn(12, 5))
    with pytest.raises(ValueError, match="non-negative finite weights"):
        SDMGrad(2).load_state_dict({"weights": torch.tensor([float("nan"), 1.0])})


def test_repr() -> None:
    assert (
        repr(SDMGrad(3))
        == "SDMGrad(num_tasks=3, lambda_=0.3, lr=10.0, momentum=0.5, iterations=20)"
    )
