"""What a training step computed: :class:`StepRecord`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepRecord"]


@dataclass
class StepRecord:
    """What one :func:`backward` step computed, at no extra cost.

    Attributes:
        names: the task names (the keys of a dict of losses, else ``"task 0"``, ...).
        weights: float64 task weights of the aggregation (``None`` for elementwise methods).
        gram: float64 T x T Gram matrix of the (unscaled) task gradients, where computed.
        skipped: with a GradScaler, True when a task gradient overflowed (the shared ``.grad``
            holds NaN so that ``scaler.step`` skips the update, as in single-task AMP).
        losses: the (unscaled) task losses, float64, detached.
    """

    names: list[str]
    weights: Tensor | None
    gram: Tensor | None
    skipped: bool = False
    losses: Tensor | None = None

    @property
    def norms(self) -> Tensor | None:
        """Task-gradient norms, from the diagonal of the Gram matrix."""
        return None if self.gram is None else self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> Tensor | None:
        """T x T cosines between task gradients (0 where a gradient is zero)."""
        if self.gram is None:
            return None
        norms = self.norms
        denominator = torch.outer(norms, norms)
        return torch.where(denominator > 0, self.gram / denominator, torch.zeros_like(self.gram))

    @property
    def conflicts(self) -> float | None:
        """Fraction of task pairs with a negative cosine."""
        if self.gram is None or self.gram.shape[0] < 2:
            return None if self.gram is None else 0.0
        T = self.gram.shape[0]
        upper = torch.triu(self.gram, diagonal=1)[torch.triu(torch.ones(T, T, dtype=torch.bool), 1)]
        return float((upper < 0).float().mean())
