"""Shared checks of the loss weightings (mtlgrad.weighting)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from mtlgrad.weighting import LossWeighting


def loss_vectors(num_tasks: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Positive float64 task losses for ``steps`` steps, spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, num_tasks, dtype=torch.float64)
    return [
        scales * (0.5 + torch.rand(num_tasks, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]


def assert_resumes_identically(
    make: Callable[[], LossWeighting],
    step: Callable[[LossWeighting, int], torch.Tensor],
    before: int = 5,
    after: int = 5,
) -> None:
    """Runs ``before`` steps, loads the state into a fresh instance and checks that the original
    and the copy produce bit-identical outputs and weights over ``after`` more steps.

    ``step(weighting, i)`` runs step ``i`` and returns its output (the scalar to backpropagate).
    """
    original = make()
    for i in range(before):
        step(original, i)
    state = copy.deepcopy(original.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    for i in range(before, before + after):
        a, b = step(original, i), step(resumed, i)
        assert torch.equal(a, b), f"step {i}: {a.item()!r} != {b.item()!r}"
        assert torch.equal(original.weights, resumed.weights), f"step {i}: the weights differ"
