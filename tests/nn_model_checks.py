"""Checks for the models of mtlgrad.nn beyond nn_checks: training through
MTLOptimizer(..., model=model) (the model's own partition) and a state_dict round trip."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from nn_checks import LossFn, check_training

from mtlgrad.aggregators import Aggregator
from mtlgrad.nn import MultiTaskModule


def check_training_with_model(
    model: MultiTaskModule,
    x: object,
    loss_fn: LossFn,
    aggregator: Aggregator,
    steps: int = 15,
    lr: float = 2e-2,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> None:
    """:func:`nn_checks.check_training` through ``MTLOptimizer(..., model=model)``."""
    check_training(model, x, loss_fn, aggregator, steps, lr, extra_loss, with_model=True)


def check_state_dict_round_trip(make_model: Callable[[int], MultiTaskModule], x: object) -> None:
    """Two models from different seeds compute different outputs; loading one's state_dict
    (through torch.save / torch.load) into the other makes them compute the same."""
    source, target = make_model(0), make_model(1)
    source.eval()
    target.eval()
    with torch.no_grad():
        expected = source(x)
        before = target(x)
    assert any(not torch.equal(expected[t], before[t]) for t in source.task_names)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        got = target(x)
    for task in source.task_names:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)
