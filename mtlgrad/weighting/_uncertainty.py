from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlgrad.weighting._base import LossWeighting

KINDS = ("regression", "classification")


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, `Multi-Task
    Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_).

    Each task has a learnable log-variance ``s_t = log σ_t²`` (initialised to ``init``) and the
    objective is the paper's, with ``s`` for numerical stability as the paper advises (Sec. 3.2):

    - regression (Gaussian likelihood, Eq. 7): ``L_t / (2σ_t²) + log σ_t = ½ e^{-s_t} L_t + ½ s_t``
    - classification (scaled softmax, Eq. 10, with its approximation):
      ``L_t / σ_t² + log σ_t = e^{-s_t} L_t + ½ s_t``

    summed over tasks. At the optimum of a regression task ``σ_t² = L_t``: noisier tasks learn
    larger variances and get smaller weights. ``weights`` holds ``c_t e^{-s_t}`` (``c_t`` = ½ or
    1). Add ``weighting.parameters()`` to the optimizer.

    Args:
        num_tasks: T.
        kinds: ``"regression"`` (default) or ``"classification"``, for all tasks or one per task.
        init: initial log-variance.
    """

    def __init__(
        self, num_tasks: int, kinds: str | Sequence[str] = "regression", init: float = 0.0
    ) -> None:
        super().__init__(num_tasks)
        kinds = [kinds] * num_tasks if isinstance(kinds, str) else list(kinds)
        if len(kinds) != num_tasks:
            raise ValueError(f"kinds must name {num_tasks} tasks, got {len(kinds)}")
        for t, kind in enumerate(kinds):
            if kind not in KINDS:
                raise ValueError(f"kinds[{t}] must be one of {KINDS}, got {kind!r}")
        self.kinds = kinds
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init)))
        self.register_buffer(
            "scales",
            torch.tensor([0.5 if kind == "regression" else 1.0 for kind in kinds]),
            persistent=False,
        )

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        _, stacked = self._stack(losses)
        log_vars = self.log_vars.to(stacked.dtype)
        precisions = self.scales.to(stacked.dtype) * torch.exp(-log_vars)
        self.weights = precisions.detach()
        return (precisions * stacked).sum() + 0.5 * log_vars.sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, kinds={self.kinds}"
