from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.weighting._base import LossWeighting


class RLW(LossWeighting):
    """Random loss weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, `Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_).

    Every call draws fresh weights ``λ = softmax(z)`` with ``z ~ N(0, I_T)`` (the paper's
    default distribution, as in LibMTL) and returns ``Σ_t λ_t L_t``: positive weights summing
    to 1. ``z`` is drawn in float64 on the CPU from ``generator``: by default one of its own,
    seeded once from torch's global RNG at construction (so ``torch.manual_seed`` reproduces a
    run, and nothing else drawing from the global RNG moves it). The generator's state is in
    ``state_dict()``, so a resumed run draws the same weights. Needs nothing but the losses.

    For the update of the shared parameters this is the same as
    :class:`mtlgrad.aggregators.RLW` (which weights the task gradients), at the cost of one
    backward pass.

    Args:
        num_tasks: T.
        generator: a ``torch.Generator`` on the CPU, or ``None`` for one of its own.
    """

    def __init__(self, num_tasks: int, generator: torch.Generator | None = None) -> None:
        super().__init__(num_tasks)
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got {generator.device}")
        self.generator = generator

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        _, stacked = self._stack(losses)
        z = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return self._weighted_sum(stacked, torch.softmax(z, dim=0))

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        generator_state = state.get("generator")
        if generator_state is not None:  # None: a state saved before the generator was kept
            self.generator.set_state(generator_state)
