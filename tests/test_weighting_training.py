"""Every loss weighting in a few steps of a real training loop with a small multi-head model."""

from __future__ import annotations

import pytest
import torch
from training_helpers import TwoHeadNet, batch, task_losses

from mtlgrad import weighting as weightings


def make(name: str, model: TwoHeadNet) -> weightings.LossWeighting:
    T = len(model.heads)
    if name == "Constant":
        return weightings.Constant([1.0, 0.5, 0.25])
    if name == "RLW":
        return weightings.RLW(T, generator=torch.Generator().manual_seed(0))
    if name == "GradNorm":
        return weightings.GradNorm(T, model.trunk[2].parameters())
    if name == "STCH":
        return weightings.STCH(T, warmup_epochs=1)
    return getattr(weightings, name)(T)


NAMES = [n for n in weightings.__all__ if n != "LossWeighting"]


def test_every_weighting_is_listed() -> None:
    assert sorted(NAMES) == sorted(
        [
            *("Constant", "DWA", "Equal", "FAMO", "GLS", "GradNorm", "RLW", "STCH"),
            "UncertaintyWeighting",
        ]
    )


@pytest.mark.parametrize("name", NAMES)
def test_training_loop(name: str) -> None:
    model = TwoHeadNet(tasks=3, seed=1)
    weighting = make(name, model)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=0.01)
    x, y = batch(0)
    totals = []
    for step in range(40):
        optimizer.zero_grad()
        losses = task_losses(model(x)[1], y)
        totals.append(sum(loss.item() for loss in losses))
        weighting(losses).backward()
        optimizer.step()
        if name == "FAMO":
            with torch.no_grad():
                weighting.update(task_losses(model(x)[1], y))
        if name in ("DWA", "STCH") and step % 5 == 4:
            weighting.end_epoch()
        assert torch.isfinite(weighting.weights).all() and (weighting.weights >= 0).all()
    assert totals[-1] < 0.7 * totals[0], totals
    if name in ("DWA", "FAMO", "GLS", "GradNorm", "RLW", "STCH", "UncertaintyWeighting"):
        assert not torch.equal(weighting.weights, torch.ones_like(weighting.weights))
