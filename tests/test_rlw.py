from __future__ import annotations

import math

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_matrix_call_is_weighted_sum,
    assert_owns_its_generator,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import RLW


def seeded(seed: int = 0) -> RLW:
    return RLW(generator=torch.Generator().manual_seed(seed))


def splitmix64(seed: int):
    """Vigna's SplitMix64, the generator of csrc/solvers/random.h."""
    state = seed
    mask = (1 << 64) - 1
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def reference_rlw(T: int, seed: int) -> torch.Tensor:
    """softmax(z), z ~ N(0, I_T) by Box-Muller on the same 53-bit uniforms as the native solver."""
    bits = splitmix64(seed)
    z = []
    while len(z) < T:
        u1, u2 = (next(bits) >> 11) * 2.0**-53, (next(bits) >> 11) * 2.0**-53
        radius = math.sqrt(-2 * math.log(1 - u1))
        z += [radius * math.cos(2 * math.pi * u2), radius * math.sin(2 * math.pi * u2)]
    return torch.softmax(torch.tensor(z[:T], dtype=torch.float64), 0)


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    assert_finite_and_shaped(seeded(), J)
    # Same seed, same weights: linear under scaling.
    for c in (1e-3, 7.0):
        torch.testing.assert_close(
            seeded(3)(c * J), c * seeded(3)(J), rtol=1e-7, atol=1e-7 * c * float(J.abs().max() or 1)
        )
    assert_matrix_call_is_weighted_sum(seeded, J)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 64, 256])
@pytest.mark.parametrize("seed", [0, 1, 2**62 - 1])
def test_matches_the_reference(T: int, seed: int) -> None:
    w = torch.ops.mtlgrad.rlw_weights(torch.eye(T, dtype=torch.float64), seed)
    torch.testing.assert_close(w, reference_rlw(T, seed), rtol=1e-13, atol=0)
    assert (w > 0).all() and abs(float(w.sum()) - 1) < 1e-12


def test_distribution() -> None:
    # log λ_i − log λ_j = z_i − z_j ~ N(0, 2); E[λ_i] = 1/T.
    T, n = 4, 4000
    agg = seeded(7)
    G = torch.eye(T, dtype=torch.float64)
    w = torch.stack([agg.weights(G) for _ in range(n)])
    diff = w[:, 0].log() - w[:, 1].log()
    assert abs(float(diff.mean())) < 0.1
    assert abs(float(diff.var()) - 2) < 0.2
    torch.testing.assert_close(
        w.mean(0), torch.full((T,), 1 / T, dtype=torch.float64), atol=0.02, rtol=0
    )


def test_seeded_runs_reproduce_and_differ_per_call() -> None:
    J = torch.randn(5, 20)
    a, b = seeded(5), seeded(5)
    first = a(J)
    assert torch.equal(first, b(J))
    assert not torch.equal(first, a(J))  # fresh weights every call


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(seeded()(J), J[0])


def test_owns_its_generator() -> None:
    assert_owns_its_generator(RLW, torch.randn(4, 30, generator=torch.Generator().manual_seed(2)))


def test_repr_state_and_checks() -> None:
    assert repr(RLW()) == "RLW()"
    assert RLW().state_dict().keys() == {"generator"}
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        RLW(generator=3)


def test_same_distribution_as_torchjd() -> None:
    # TorchJD's Random draws from torch's generator, so only the distributions can agree.
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    T, n = 3, 3000
    torch.manual_seed(0)
    theirs = torch.stack(
        [torchjd_aggregation.Random()(torch.eye(T, dtype=torch.float64)) for _ in range(n)]
    )
    agg = seeded(1)
    ours = torch.stack([agg.weights(torch.eye(T, dtype=torch.float64)) for _ in range(n)])
    for w in (theirs, ours):
        diff = w[:, 0].log() - w[:, 2].log()
        assert abs(float(diff.var()) - 2) < 0.2
        assert abs(float(w.mean(0).max()) - 1 / T) < 0.02


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    torch.library.opcheck(torch.ops.mtlgrad.rlw_weights.default, (G, 3))
