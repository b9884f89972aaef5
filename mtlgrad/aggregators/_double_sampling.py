"""Base class of the double-sampling methods (MoDo, SDMGrad): their "tasks" are the T tasks'
losses on two or three independent sub-batches, and their weights are a T-vector on the simplex,
stepped with the cross block of the Gram matrix (sub-batch 1 against sub-batch 2) and kept
between steps."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_positive_int

#: The numbers of sub-batches a step may hold.
SAMPLES = (2, 3)


class DoubleSamplingAggregator(GramAggregator):
    """An aggregator called with ``S * num_tasks`` losses, ``S`` in {2, 3}, **sample-major**: the
    T tasks' losses on sub-batch 1, then the same T tasks (in the same order) on sub-batch 2
    (and 3). The Gram matrix of these ``S T`` gradients holds the cross block
    ``C = J₁ J₂ᵀ`` (``C[i, j] = g_i(ξ₁) · g_j(ξ₂)``), an unbiased estimate of the true Gram
    matrix from which the T task weights ``λ`` (kept between steps) take their step.

    The returned weights put ``v / 2`` on both sub-batches with two (the update is ``v``
    applied to the mean of the two sub-batches' gradients) and ``[0, 0, v]`` with three (the
    update comes from the third sub-batch alone, independent of ``λ``'s step), where ``v`` is
    the method's T-vector of weights.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self._simplex_weights: Tensor | None = None

    def _samples(self, n: int) -> int:
        T = self.num_tasks
        if n % T != 0 or n // T not in SAMPLES:
            raise ValueError(
                f"{type(self).__name__}(num_tasks={T}) expects 2 * {T} or 3 * {T} losses (the "
                f"{T} tasks on each of 2 or 3 independent sub-batches, sample-major), got {n}; "
                "check num_tasks"
            )
        return n // T

    def _weights(self, G: Tensor) -> Tensor:
        T = self.num_tasks
        samples = self._samples(G.shape[0])
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"{type(self).__name__}: the Gram matrix holds NaN or Inf")
        previous = self._simplex_weights
        if previous is None:
            previous = torch.full((T,), 1.0 / T, dtype=torch.float64)
        simplex_weights, v = self._step(G[:T, T : 2 * T], previous)
        self._simplex_weights = simplex_weights
        if samples == 2:
            return torch.cat([v / 2, v / 2])
        return torch.cat([torch.zeros(2 * T, dtype=torch.float64), v])

    @abstractmethod
    def _step(self, cross: Tensor, simplex_weights: Tensor) -> tuple[Tensor, Tensor]:
        """The next simplex weights from the T x T float64 cross block ``J₁ J₂ᵀ`` and the
        current ones, and the T weights of the update."""

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"weights": λ, the T float64 weights on the simplex (None before the first
        step)}``."""
        w = self._simplex_weights
        return {"weights": None if w is None else w.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        state = dict(state_dict)
        if "weights" not in state:
            raise ValueError(f"{name} expects state with key 'weights', got {sorted(state_dict)}")
        weights = state.pop("weights")
        super().load_state_dict(state)  # rejects unknown keys
        if weights is not None:
            weights = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float64)
            if (
                weights.shape != (self.num_tasks,)
                or not bool(torch.isfinite(weights).all())
                or not bool((weights >= 0).all())
            ):
                raise ValueError(
                    f"{name} state 'weights' must be {self.num_tasks} non-negative finite "
                    f"weights (num_tasks={self.num_tasks}), got {weights.tolist()}"
                )
            weights = weights.clone()
        self._simplex_weights = weights

    _keeps_task_state = True

    def reset(self) -> None:
        """Restarts the weights from uniform."""
        super().reset()
        self._simplex_weights = None
