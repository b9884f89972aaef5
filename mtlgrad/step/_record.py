"""What a training step computed: :class:`StepRecord`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["StepRecord"]


@dataclass
class StepRecord:
    """What one :func:`~mtlgrad.backward` step computed, at no extra cost.

    Everything lives on the host: the Gram matrix, the weights and the losses come from the
    step's single device-to-host transfer, and the derived statistics (norms, cosines,
    conflicts) are computed once, on first use, and shared by every reader (the
    :class:`~mtlgrad.diagnostics.GradientMonitor`, the demo, a training script).

    Attributes:
        names: the task names (the keys of a dict of losses, else ``"task 0"``, ...).
        weights: float64 task weights of the aggregation (``None`` for elementwise methods and
            for a skipped step).
        gram: float64 T x T Gram matrix of the (unscaled) task gradients, where computed.
        skipped: with a GradScaler, True when a task gradient overflowed (the shared ``.grad``
            holds NaN so that ``scaler.step`` skips the update, as in single-task AMP).
        losses: the (unscaled) task losses, float64, detached.
    """

    names: list[str]
    weights: Tensor | None
    gram: Tensor | None
    skipped: bool = False
    losses: Tensor | None = field(default=None)

    @cached_property
    def norms(self) -> Tensor | None:
        """Task-gradient norms, from the diagonal of the Gram matrix."""
        return None if self.gram is None else self.gram.diagonal().clamp_min(0).sqrt()

    @cached_property
    def cosines(self) -> Tensor | None:
        """T x T cosines between task gradients (0 where a gradient is zero)."""
        norms = self.norms
        if norms is None or self.gram is None:
            return None
        denominator = torch.outer(norms, norms)
        return torch.where(denominator > 0, self.gram / denominator, torch.zeros_like(self.gram))

    @cached_property
    def conflicts(self) -> float | None:
        """Fraction of task pairs whose gradients have a negative inner product (0.0 for one
        task)."""
        if self.gram is None:
            return None
        T = self.gram.shape[0]
        if T < 2:
            return 0.0
        rows, cols = torch.triu_indices(T, T, offset=1)
        return float((self.gram[rows, cols] < 0).to(torch.float64).mean())
