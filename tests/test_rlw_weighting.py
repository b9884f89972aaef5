"""RLW loss weighting (Lin et al. 2022): softmax of standard normal samples drawn per call."""

from __future__ import annotations

import math

import pytest
import torch
from weighting_checks import assert_resumes_identically, loss_vectors

from mtlgrad.weighting import RLW


def seeded(T: int, seed: int = 0) -> RLW:
    return RLW(T, generator=torch.Generator().manual_seed(seed))


def reference_weights(T: int, seed: int, calls: int) -> list[list[float]]:
    """The weights of ``calls`` successive calls: z drawn with torch (the documented source of
    randomness), softmax in Python floats."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(calls):
        z = torch.randn(T, generator=g, dtype=torch.float64).tolist()
        top = max(z)
        e = [math.exp(v - top) for v in z]
        out.append([v / sum(e) for v in e])
    return out


@pytest.mark.parametrize("T", [1, 2, 5])
def test_matches_the_reference(T: int) -> None:
    weighting = seeded(T, seed=3)
    losses = loss_vectors(T, 4)
    for i, expected in enumerate(reference_weights(T, 3, 4)):
        out = weighting(losses[i])
        assert weighting.weights.tolist() == pytest.approx(expected, rel=1e-14)
        reference = sum(w * v for w, v in zip(expected, losses[i].tolist()))
        assert out.item() == pytest.approx(reference, rel=1e-14)


def test_distribution() -> None:
    # log λ_i − log λ_j = z_i − z_j ~ N(0, 2); E[λ_i] = 1/T; Σ λ = 1.
    T, n = 4, 4000
    weighting = seeded(T, seed=11)
    draws = []
    for _ in range(n):
        weighting(torch.ones(T, dtype=torch.float64))
        draws.append(weighting.weights)
    w = torch.stack(draws)
    torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64))
    diff = w[:, 0].log() - w[:, 1].log()
    assert abs(float(diff.mean())) < 0.1
    assert abs(float(diff.var()) - 2) < 0.2
    torch.testing.assert_close(
        w.mean(0), torch.full((T,), 0.25, dtype=torch.float64), atol=0.02, rtol=0
    )


def test_state_round_trip() -> None:
    losses = loss_vectors(3, 10)
    assert_resumes_identically(lambda: seeded(3, seed=5), lambda w, i: w(losses[i]))
    # Without the state, a fresh generator restarts the sequence: the check above can fail.
    a = seeded(3, seed=5)
    a(losses[0])
    b = seeded(3, seed=5)
    a(losses[1]), b(losses[1])
    assert not torch.equal(a.weights, b.weights)


def test_owns_its_generator() -> None:
    # Built without a generator: one of its own, seeded from torch's global RNG once, restored by
    # load_state_dict into a fresh instance (which then repeats the run bit for bit), moved by
    # no other draw from the global RNG, and not shared with another instance.
    losses = loss_vectors(3, 10)
    assert_resumes_identically(lambda: RLW(3), lambda w, i: w(losses[i]))
    torch.manual_seed(0)
    a = RLW(3)
    first = [a(losses[i]) for i in range(3)]
    torch.manual_seed(0)
    b = RLW(3)
    for i in range(3):
        torch.randn(3)
        assert torch.equal(b(losses[i]), first[i])
    c, d = RLW(3), RLW(3)
    assert not torch.equal(c(losses[0]), d(losses[0]))


def test_repr() -> None:
    assert repr(RLW(2)) == "RLW(num_tasks=2)"


def test_errors() -> None:
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        RLW(2, generator=0)
    with pytest.raises(ValueError, match="RLW: expected 2 task losses, got 3"):
        seeded(2)(torch.ones(3))
