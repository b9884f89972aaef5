"""Fake (meta) implementations of the native ops, so that they trace under torch.compile.

They repeat the native ops' argument checks (csrc/task_grads.cpp) on fake tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlgrad.ops._checks import check_outputs, check_task_grads


@torch.library.register_fake("mtlgrad::gram")
def _gram_fake(grads: list[Tensor], num_tasks: int) -> tuple[Tensor, Tensor]:
    check_task_grads("mtlgrad.gram", grads, num_tasks, per_tensor_dtypes=True)
    like = grads[0]
    return (
        like.new_empty((num_tasks, num_tasks), dtype=torch.float64),
        like.new_empty((num_tasks,), dtype=torch.int64),
    )


@torch.library.register_fake("mtlgrad::combine")
def _combine_fake(
    grads: list[Tensor],
    num_tasks: int,
    weights: Tensor,
    out: list[Tensor],
    accumulate: bool = False,
) -> None:
    op = "mtlgrad.combine"
    k = check_task_grads(op, grads, num_tasks, per_tensor_dtypes=True)
    if weights.dim() != 1 or weights.numel() != num_tasks:
        raise ValueError(
            f"{op}: weights must have shape [{num_tasks}] (one per task), got {list(weights.shape)}"
        )
    check_outputs(op, grads, k, out)


@torch.library.register_fake("mtlgrad::graddrop")
def _graddrop_fake(
    grads: list[Tensor],
    num_tasks: int,
    leak: Tensor,
    seed: int,
    check_finite: bool,
    out: list[Tensor],
) -> Tensor:
    op = "mtlgrad.graddrop"
    k = check_task_grads(op, grads, num_tasks)
    if leak.dim() != 1 or leak.numel() != num_tasks:
        raise ValueError(
            f"{op}: leak must have shape [{num_tasks}] (one value per task), got {list(leak.shape)}"
        )
    check_outputs(op, grads, k, out)
    return grads[0].new_empty((num_tasks,), dtype=torch.int64)
