"""Stacking corresponding task parameters into one matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["stack_task_weights"]


def stack_task_weights(weights: Sequence[Tensor], *, owner: str = "stack_task_weights") -> Tensor:
    """Stacks one tensor per task into the d x T matrix ``W`` (column t = task t's tensor,
    flattened in row-major order).

    This is the matrix of the multi-task feature-learning literature (Argyriou et al. 2008): rows
    are features (here, the entries of the parameter), columns are tasks. For linear heads
    ``weight`` of shape ``(1, d)`` the rows are the d input features; for ``(k, d)`` heads row
    ``i * d + j`` is output i's weight on input j (pass ``weight.t()`` to group by input first).

    The result is a new tensor in the autograd graph (gradients reach every task's tensor).

    Raises:
        ValueError: no tensors, or shapes that differ (naming the task index and both shapes).
        TypeError: an entry that is not a tensor, or mixed dtypes.
    """
    tensors = list(weights)
    if not tensors:
        raise ValueError(f"{owner}: no tensors to stack (expected one per task)")
    for t, w in enumerate(tensors):
        if not isinstance(w, Tensor):
            raise TypeError(f"{owner}: the entry of task {t} is a {type(w).__name__}, not a tensor")
        if w.shape != tensors[0].shape:
            raise ValueError(
                f"{owner}: task {t} has shape {list(w.shape)} but task 0 has shape "
                f"{list(tensors[0].shape)}; corresponding task parameters must have one shape"
            )
        if w.dtype != tensors[0].dtype:
            raise TypeError(f"{owner}: task {t} is {w.dtype} but task 0 is {tensors[0].dtype}")
        if w.device != tensors[0].device:
            raise ValueError(
                f"{owner}: task {t} is on {w.device} but task 0 on {tensors[0].device}"
            )
    return torch.stack([w.reshape(-1) for w in tensors], dim=1)
