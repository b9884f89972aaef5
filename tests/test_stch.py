"""STCH (Lin et al. 2024) against a float64 reference of the paper's equation and the official
code's training schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import STCH

EPS = 1e-20


def reference_stch(losses, reference, mu, preference):
    """T g_μ = T μ log Σ_t exp(λ_t (f_t - z_t) / μ) with f_t - z_t = log(L_t / r_t + ε), and
    ∂/∂L_t = T λ_t s_t / (L_t + ε r_t), s the softmax of the exponents (plain Python)."""
    T = len(losses)
    a = [lam * math.log(L / r + EPS) / mu for L, r, lam in zip(losses, reference, preference)]
    top = max(a)
    e = [math.exp(v - top) for v in a]
    value = T * mu * (top + math.log(sum(e)))
    s = [v / sum(e) for v in e]
    grads = [
        T * lam * s_t / (L + EPS * r) for lam, s_t, L, r in zip(preference, s, losses, reference)
    ]
    return value, grads


def reference_run(steps, per_epoch, warmup, mu, preference):
    """Objective and gradient coefficients of every step of the official schedule: log-loss sum
    through epoch ``warmup`` (counted from 0), whose average losses become the reference, then
    T g_μ."""
    out, reference = [], None
    recorded = []
    for i, losses in enumerate(steps):
        epoch = i // per_epoch
        if epoch <= warmup:
            if epoch == warmup:
                recorded.append(losses)
            out.append((sum(math.log(L + EPS) for L in losses), [1 / (L + EPS) for L in losses]))
        else:
            if reference is None:
                reference = [sum(col) / len(recorded) for col in zip(*recorded)]
            out.append(reference_stch(losses, reference, mu, preference))
    return out, reference


@pytest.mark.parametrize(
    ("mu", "preference"), [(1.0, None), (0.3, [0.2, 0.5, 0.3]), (5.0, [1.0, 0.0, 2.0])]
)
def test_matches_the_reference(mu, preference) -> None:
    T, per_epoch, warmup, epochs = 3, 4, 2, 6
    # Every task falls at its own rate, so the reference epoch's averages matter.
    losses = [
        v * torch.tensor([0.9**i, 0.7**i, 0.97**i], dtype=torch.float64)
        for i, v in enumerate(loss_vectors(T, per_epoch * epochs, seed=1))
    ]
    lam = preference or [1.0] * T
    expected, reference = reference_run([v.tolist() for v in losses], per_epoch, warmup, mu, lam)
    weighting = STCH(T, mu=mu, warmup_epochs=warmup, preference=preference)
    for i, (values, (value, grads)) in enumerate(zip(losses, expected)):
        x = values.clone().requires_grad_()
        out = weighting(x)
        assert out.item() == pytest.approx(value, rel=1e-13, abs=1e-13), f"step {i}"
        out.backward()
        assert x.grad.tolist() == pytest.approx(grads, rel=1e-12), f"step {i}"
        assert weighting.weights.tolist() == pytest.approx(grads, rel=1e-12), f"step {i}"
        if i % per_epoch == per_epoch - 1:
            weighting.end_epoch()
    assert weighting.reference_losses.tolist() == pytest.approx(reference, rel=1e-14)
    assert int(weighting.num_epochs) == epochs


def stch_after_reference(T, mu, reference, preference=None, dtype=torch.float64):
    """An STCH past its reference epoch, whose reference losses are ``reference``."""
    weighting = STCH(T, mu=mu, warmup_epochs=0, preference=preference)
    weighting(torch.tensor(reference, dtype=dtype))
    weighting.end_epoch()
    return weighting


def test_gradient_is_the_softmax_weights() -> None:
    # With respect to the log-ratios x_t = log(L_t / r_t + ε): T λ_t softmax(λ x / μ)_t.
    reference, mu, lam = [2.0, 0.5, 1.0, 4.0], 0.7, [0.1, 0.4, 0.2, 0.3]
    weighting = stch_after_reference(4, mu, reference, lam)
    x = torch.tensor([0.3, -0.2, 0.9, 0.0], dtype=torch.float64, requires_grad=True)
    losses = (x.exp() - EPS) * torch.tensor(reference, dtype=torch.float64)
    weighting(losses).backward()
    lam64 = torch.tensor(lam, dtype=torch.float64)
    expected = 4 * lam64 * torch.softmax(lam64 * x.detach() / mu, dim=0)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)
    # Default preference: the coefficients of the log-losses sum to T, as in the warm-up.
    weighting = stch_after_reference(4, mu, reference)
    losses = torch.tensor([1.0, 3.0, 0.2, 5.0], dtype=torch.float64, requires_grad=True)
    weighting(losses).backward()
    assert float((losses.grad * losses.detach()).sum()) == pytest.approx(4.0, rel=1e-14)


def test_small_mu_approaches_the_tchebycheff_max() -> None:
    reference, lam = [1.0, 1.0, 1.0], [0.5, 0.2, 0.3]
    losses = torch.tensor([2.0, 9.0, 0.5], dtype=torch.float64)
    terms = [w * math.log(L) for w, L in zip(lam, losses.tolist())]
    tchebycheff = max(terms)
    assert terms.index(tchebycheff) == 1
    gaps = []
    for mu in (1.0, 1e-1, 1e-3, 1e-8):
        g = stch_after_reference(3, mu, reference, lam)(losses).item() / 3
        assert tchebycheff <= g <= tchebycheff + mu * math.log(3) + 1e-15
        gaps.append(g - tchebycheff)
    assert gaps[0] > 0.1 and gaps[-1] < 1e-12
    # The weights concentrate on the maximising task.
    weighting = stch_after_reference(3, 1e-3, reference, lam)
    weighting(losses)
    assert weighting.weights.tolist() == pytest.approx([0, 3 * 0.2 / 9.0, 0], abs=1e-12)


def test_large_mu_approaches_the_mean_plus_mu_log_t() -> None:
    reference = [1.0, 2.0, 4.0]
    losses = torch.tensor([3.0, 1.0, 10.0], dtype=torch.float64)
    x = [math.log(L / r) for L, r in zip(losses.tolist(), reference)]
    mean = sum(x) / 3
    variance = sum((v - mean) ** 2 for v in x) / 3
    errors = []
    for mu in (1e1, 1e3, 1e5):
        g = stch_after_reference(3, mu, reference)(losses).item() / 3
        errors.append(g - mu * math.log(3) - mean)
    # g_μ - μ log T - mean = Var / (2μ) + O(μ⁻²): it vanishes as μ grows.
    assert errors[0] > 1e-2
    assert errors[1] == pytest.approx(variance / 2e3, rel=1e-3)
    assert errors[2] == pytest.approx(variance / 2e5, rel=1e-3)
    weighting = stch_after_reference(3, 1e8, reference)
    weighting(losses)
    assert (weighting.weights * losses).tolist() == pytest.approx([1.0] * 3, rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu", [1e-12, 1e12])
def test_extreme_mu_and_losses_stay_finite(dtype, mu) -> None:
    weighting = stch_after_reference(3, mu, [1.0, 1e-30, 1e30], dtype=dtype)
    losses = torch.tensor([1e30, 1e-30, 1e-30], dtype=dtype, requires_grad=True)
    out = weighting(losses)
    out.backward()
    assert out.dtype == dtype and math.isfinite(out.item())
    assert torch.isfinite(losses.grad).all() and torch.isfinite(weighting.weights).all()
    if mu < 1:
        # The max: task 0 at log(1e30), all the weight on it.
        assert out.item() / 3 == pytest.approx(30 * math.log(10), rel=1e-5)
        assert weighting.weights[1:].tolist() == [0.0, 0.0]


def test_eval_mode_does_not_record() -> None:
    weighting = STCH(2, warmup_epochs=0)
    weighting(torch.tensor([1.0, 2.0]))
    weighting.eval()
    weighting(torch.tensor([100.0, 100.0]))
    weighting.train()
    weighting.end_epoch()
    assert weighting.reference_losses.tolist() == [1.0, 2.0]


def test_state_round_trip() -> None:
    losses = loss_vectors(3, 30, seed=2)

    def step(weighting: STCH, i: int) -> torch.Tensor:
        out = weighting(losses[i])
        if i % 3 == 2:
            weighting.end_epoch()
        return out

    def make() -> STCH:
        return STCH(3, mu=0.5, warmup_epochs=2)

    # Mid-warm-up, mid-reference epoch (a partial sum), and in the STCH phase.
    for before in (2, 7, 13):
        assert_resumes_identically(make, step, before=before, after=30 - before)
    state = make().state_dict()
    assert sorted(state) == ["loss_sum", "num_epochs", "num_steps", "reference_losses"]


def test_bad_loss_raises_naming_the_task_and_changes_nothing() -> None:
    weighting = STCH(3, warmup_epochs=0)
    weighting(torch.tensor([1.0, 2.0, 3.0]))
    state = copy.deepcopy(weighting.state_dict())
    weights = weighting.weights.clone()
    bad = {"seg": torch.tensor(1.0), "depth": torch.tensor(-0.5), "normals": torch.tensor(2.0)}
    with pytest.raises(
        ValueError, match="STCH: the loss of 'depth' must be non-negative and finite, got -0.5"
    ):
        weighting(bad)
    with pytest.raises(ValueError, match="STCH: the loss of 'task 2' must be .* got nan"):
        weighting(torch.tensor([1.0, 1.0, math.nan]))
    for key, value in weighting.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(weighting.weights, weights)
    # A zero loss is allowed (the ε of the logs) but cannot be a reference.
    weighting = STCH(2, warmup_epochs=0)
    weighting({"seg": torch.tensor(0.0), "depth": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="reference .*loss of 'seg' must be positive and finite"):
        weighting.end_epoch()
    assert int(weighting.num_epochs) == 0 and int(weighting.num_steps) == 1


def test_repr_and_errors() -> None:
    assert repr(STCH(3)) == "STCH(num_tasks=3, mu=1.0, warmup_epochs=4)"
    assert (
        repr(STCH(2, mu=0.5, warmup_epochs=0, preference=[0.25, 0.75]))
        == "STCH(num_tasks=2, mu=0.5, warmup_epochs=0, preference=[0.25, 0.75])"
    )
    with pytest.raises(ValueError, match="mu must be a positive number, got 0"):
        STCH(2, mu=0)
    with pytest.raises(ValueError, match="mu must be finite, got inf"):
        STCH(2, mu=math.inf)
    with pytest.raises(ValueError, match="warmup_epochs must be a non-negative int, got -1"):
        STCH(2, warmup_epochs=-1)
    with pytest.raises(ValueError, match="warmup_epochs must be a non-negative int, got 1.5"):
        STCH(2, warmup_epochs=1.5)
    with pytest.raises(ValueError, match=r"preference must hold 2 values \(one per task\)"):
        STCH(2, preference=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="preference must be finite and non-negative"):
        STCH(2, preference=[1.0, -0.1])
    with pytest.raises(ValueError, match="preference must be finite and non-negative"):
        STCH(2, preference=[1.0, math.nan])
    with pytest.raises(ValueError, match="preference must have a positive sum, got"):
        STCH(2, preference=[0.0, 0.0])
    with pytest.raises(ValueError, match="no losses were recorded in epoch 0, the reference"):
        STCH(2, warmup_epochs=0).end_epoch()
    with pytest.raises(ValueError, match="STCH: expected 2 task losses, got 3"):
        STCH(2)(torch.ones(3))
