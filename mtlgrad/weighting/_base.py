"""Loss-based weighting: task losses in, one scalar to backpropagate out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "LossWeighting",
    "check_nonnegative",
    "check_positive",
    "task_loss_list",
    "task_losses",
]


def task_loss_list(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor, num_tasks: int, owner: str
) -> tuple[list[str], list[Tensor]]:
    """The task names and the task losses as given (checked, graph kept).

    Raises a ``ValueError`` naming the task when a loss is not a real scalar or the count differs
    from ``num_tasks``.
    """
    if isinstance(losses, Mapping):
        names, values = [str(k) for k in losses], list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"{owner}: a tensor of losses must be 1-D (one per task), got shape "
                f"{tuple(losses.shape)}"
            )
        names, values = [f"task {i}" for i in range(losses.shape[0])], list(losses.unbind())
    else:
        values = list(losses)
        names = [f"task {i}" for i in range(len(values))]
    if len(values) != num_tasks:
        raise ValueError(f"{owner}: expected {num_tasks} task losses, got {len(values)}")
    for name, loss in zip(names, values):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"{owner}: the loss of {name!r} must be a scalar tensor, got {shape}")
        if not loss.dtype.is_floating_point:
            raise TypeError(
                f"{owner}: the loss of {name!r} must be floating point, got {loss.dtype}"
            )
    devices = {loss.device for loss in values}
    if len(devices) > 1:
        raise ValueError(
            f"{owner}: the task losses are on several devices: {sorted(map(str, devices))}"
        )
    return names, values


def task_losses(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor, num_tasks: int, owner: str
) -> tuple[list[str], Tensor]:
    """The task names and the losses stacked into one 1-D tensor (graph kept); errors as
    :func:`task_loss_list`."""
    names, values = task_loss_list(losses, num_tasks, owner)
    return names, torch.stack([loss.reshape(()) for loss in values])


class LossWeighting(nn.Module):
    """Base class of the loss-based weightings.

    A weighting is an ``nn.Module``: calling it on the task losses (a sequence, a dict keyed by
    task name, or a 1-D tensor) returns the one scalar to backpropagate, usually
    ``Σ_t w_t L_t`` (plus the method's own terms). Learnable weightings hold ``nn.Parameter`` s:
    give ``weighting.parameters()`` to the optimizer. Everything a method carries across steps is
    in ``state_dict()``. ``weights`` holds the last task weights used (detached).

    No per-task gradients are needed (GradNorm alone reads gradient norms on one shared layer), so
    a weighting costs about what ``sum(losses).backward()`` costs.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self.weights: Tensor | None = None

    def _stack(
        self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor
    ) -> tuple[list[str], Tensor]:
        return task_losses(losses, self.num_tasks, type(self).__name__)

    def _weighted_sum(self, stacked: Tensor, weights: Tensor) -> Tensor:
        """``Σ_t w_t L_t`` with constant weights (cast to the losses' dtype and device); records
        them in ``weights`` (a copy: learnable weights change at the optimizer's step)."""
        weights = weights.detach().to(dtype=stacked.dtype, device=stacked.device, copy=True)
        self.weights = weights
        return (weights * stacked).sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"


# ---- argument checks shared by the constructors ---------------------------------------------


def check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
