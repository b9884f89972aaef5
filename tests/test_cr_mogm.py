from __future__ import annotations

import copy

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    matrices,
    matrix_ids,
)

from mtlgrad.aggregators import CRMOGM, MGDA, GradVac, Mean, TrimmedMean, UPGrad


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def steps(T: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(T, 30, generator=gen(seed + k), dtype=torch.float64) for k in range(count)]


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties_of_a_first_step(J: torch.Tensor) -> None:
    # The first step's weights are the wrapped method's, whatever alpha (a fresh instance per
    # call: the state would smooth the second call's weights with the first's).
    assert_finite_and_shaped(CRMOGM(UPGrad()), J)
    torch.testing.assert_close(CRMOGM(UPGrad(), alpha=0.7)(J), UPGrad()(J))
    scale = float(J.norm(dim=1).max()) or 1.0
    perm = torch.randperm(J.shape[0], generator=gen(1))
    torch.testing.assert_close(
        CRMOGM(UPGrad())(J[perm]), CRMOGM(UPGrad())(J), atol=1e-7 * scale, rtol=1e-7
    )
    torch.testing.assert_close(
        CRMOGM(UPGrad())(7 * J), 7 * CRMOGM(UPGrad())(J), atol=7e-7 * scale, rtol=1e-7
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_matches_the_paper(alpha: float) -> None:
    """λ_k = α λ_{k−1} + (1 − α) λ̂_k with λ_0 = λ̂_1, from the wrapped method's weights."""
    agg, inner = CRMOGM(MGDA(), alpha=alpha), MGDA()
    smoothed = None
    for J in steps(4, 5):
        G = J @ J.T
        current = inner.weights(G)
        smoothed = current if smoothed is None else alpha * smoothed + (1 - alpha) * current
        torch.testing.assert_close(agg(J), smoothed @ J, rtol=1e-12, atol=1e-12)


def test_initial_weights_and_alpha_schedule() -> None:
    J1, J2 = steps(3, 2)
    agg = CRMOGM(UPGrad(), alpha=0.5, initial_weights=[1.0, 0.0, 0.0])
    w1 = 0.5 * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.5 * UPGrad().weights(
        J1 @ J1.T
    )
    torch.testing.assert_close(agg.weights(J1 @ J1.T), w1)
    agg.alpha = 0.25  # e.g. 1 - lr / lr_0
    w2 = 0.25 * w1 + 0.75 * UPGrad().weights(J2 @ J2.T)
    torch.testing.assert_close(agg.weights(J2 @ J2.T), w2)


def test_wrapped_state_moves_and_round_trips_bit_identically() -> None:
    Js = [J.float() for J in steps(4, 8, seed=3)]
    original = CRMOGM(GradVac(generator=gen(0)), alpha=0.8)
    for J in Js[:4]:
        original(J)
    state = copy.deepcopy(original.state_dict())
    assert set(state) == {"weights", "aggregator"} and state["aggregator"]["targets"] is not None
    resumed = CRMOGM(GradVac(generator=gen(99)), alpha=0.8)
    resumed.load_state_dict(state)
    for J in Js[4:]:
        assert torch.equal(resumed(J), original(J))
    original.reset()
    assert original.state_dict()["weights"] is None
    assert original.state_dict()["aggregator"]["targets"] is None


def test_losses_reach_the_wrapped_method() -> None:
    J = steps(3, 1)[0]
    losses = torch.tensor([1.0, 2.0, 4.0])
    G = J @ J.T
    torch.testing.assert_close(
        CRMOGM(MGDA(normalization="loss")).weights(G, losses),
        MGDA(normalization="loss").weights(G, losses),
    )


def test_matches_torchjd() -> None:
    jd = pytest.importorskip("torchjd.aggregation")
    theirs = jd.GramianWeightedAggregator(jd.CRMOGMWeighting(jd.UPGradWeighting(), alpha=0.6))
    ours = CRMOGM(UPGrad(reg_eps=1e-4), alpha=0.6)  # TorchJD's UPGrad regularises G / trace(G)
    for J in steps(5, 4, seed=7):
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-7, atol=1e-9)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="aggregator must be a GramAggregator .* got TrimmedMean"):
        CRMOGM(TrimmedMean(1))  # type: ignore[arg-type]
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            CRMOGM(Mean(), alpha=bad)  # type: ignore[arg-type]
    agg = CRMOGM(Mean())
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 2"):
        agg.alpha = 2
    with pytest.raises(ValueError, match="initial_weights must be a non-empty sequence"):
        CRMOGM(Mean(), initial_weights=[float("nan")])
    with pytest.raises(ValueError, match="2 initial_weights but got 3 tasks"):
        CRMOGM(Mean(), initial_weights=[0.5, 0.5])(torch.randn(3, 4))
    agg(torch.randn(3, 4))
    with pytest.raises(ValueError, match="for 3 tasks but got a 4 x 4 Gram matrix; call reset"):
        agg(torch.randn(4, 4))
    with pytest.raises(ValueError, match="expects state with keys 'weights' and 'aggregator'"):
        agg.load_state_dict({"weights": None})


def test_repr() -> None:
    assert repr(CRMOGM(UPGrad())) == "CRMOGM(aggregator=UPGrad(reg_eps=0.0), alpha=0.9)"
    assert repr(CRMOGM(Mean(), 0.5, [1.0, 0.0])) == (
        "CRMOGM(aggregator=Mean(), alpha=0.5, initial_weights=[1.0, 0.0])"
    )
