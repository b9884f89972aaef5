"""Argument checks shared by the ops' Python faces and their fake implementations; they say
what the native checks (csrc/task_grads.cpp) say."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def num_tensors(grads: Sequence[Tensor], num_tasks: int, op: str) -> int:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"{op}: num_tasks must be a positive int, got {num_tasks!r}")
    if len(grads) % num_tasks:
        raise ValueError(
            f"{op}: got {len(grads)} tensors for num_tasks={num_tasks}; grads must hold the same "
            "number of tensors for every task, task-major (task 0's tensors, then task 1's, ...)"
        )
    return len(grads) // num_tasks


def check_task_grads(
    op: str, grads: Sequence[Tensor], num_tasks: int, *, per_tensor_dtypes: bool = False
) -> int:
    """The same checks as the native ops (csrc/task_grads.cpp), for fake and meta tensors.

    With ``per_tensor_dtypes`` (gram, combine) tensor k may have any supported dtype, the same for
    every task; otherwise (graddrop) every tensor must have the dtype of task 0's tensor 0.
    """
    k = num_tensors(grads, num_tasks, op)
    if not grads:
        return k
    first = grads[0]
    for t in range(num_tasks):
        for i in range(k):
            g = grads[t * k + i]
            where = f"tensor {i} of task {t}"
            if g.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{op}: {where} has dtype {_name(g.dtype)}; expected float32, float64, float16 "
                    "or bfloat16"
                )
            if per_tensor_dtypes and g.dtype != grads[i].dtype:
                raise TypeError(
                    f"{op}: mixed dtypes: {where} is {_name(g.dtype)} but tensor {i} of task 0 is "
                    f"{_name(grads[i].dtype)}; every task's tensor k must have the dtype of task "
                    "0's"
                )
            if not per_tensor_dtypes and g.dtype != first.dtype:
                raise TypeError(
                    f"{op}: mixed dtypes: {where} is {_name(g.dtype)} but tensor 0 of task 0 is "
                    f"{_name(first.dtype)}; cast the gradients to one dtype"
                )
            if g.device != first.device:
                raise ValueError(
                    f"{op}: mixed devices: {where} is on {g.device} but tensor 0 of task 0 is on "
                    f"{first.device}"
                )
            if g.shape != grads[i].shape:
                raise ValueError(
                    f"{op}: {where} has shape {list(g.shape)} but tensor {i} of task 0 has "
                    f"shape {list(grads[i].shape)}; every task must list the same shapes in the "
                    "same order"
                )
    return k


def check_outputs(op: str, grads: Sequence[Tensor], k: int, out: Sequence[Tensor]) -> None:
    """The native ops' output checks (csrc/task_grads.cpp, check_outputs), for fake tensors."""
    if len(out) != k:
        raise ValueError(f"{op}: got {len(out)} output tensors for {k} tensors per task")
    for i, o in enumerate(out):
        if o.shape != grads[i].shape or o.dtype != grads[i].dtype or o.device != grads[i].device:
            raise ValueError(
                f"{op}: output {i} is {o.dtype} {list(o.shape)} on {o.device}, but tensor {i} of "
                f"each task is {grads[i].dtype} {list(grads[i].shape)} on {grads[i].device}"
            )


def _name(dtype: torch.dtype) -> str:
    """The dtype as the native checks name it (c10's ScalarType names: Float, BFloat16, ...)."""
    return _NATIVE_NAMES.get(dtype, str(dtype))


_NATIVE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}
