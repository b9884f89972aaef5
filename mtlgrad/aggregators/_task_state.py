"""Base class of the aggregators that keep P-sized state per task (tracked gradients, EMAs of
the gradients, running sums of squares): the state has one tensor per gradient tensor, on the
gradients' device, so these methods are not Gram-based and cost T times the shared parameters'
size in memory."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import (
    Aggregation,
    Aggregator,
    combine_into,
    fill_nan,
    gram_on_host,
)
from mtlgrad.ops._checks import num_tensors


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state of half-precision gradients is kept in float32 (sums and EMAs of many steps)."""
    return torch.promote_types(dtype, torch.float32)


class TaskStateAggregator(Aggregator):
    """An aggregator whose update is ``Σ_t w_t s_t`` for per-task tensors ``s_t`` it keeps
    (or the gradients themselves), with state updated from each step's gradients.

    :meth:`aggregate` checks the gradients (one pass of the native ``gram``, which also gives the
    record its Gram matrix and, under a GradScaler, the overflow check), hands the unscaled
    gradients' factor ``1 / scale`` to :meth:`_step`, and combines what :meth:`_step` returns in one
    pass of the native ``combine``. The state belongs to the tasks and tensors of the first call:
    another number of tasks, other task names, or other shapes raise (call :meth:`reset`).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._layout: list[tuple[tuple[int, ...], torch.device]] | None = None

    @abstractmethod
    def _step(
        self,
        grads: list[Tensor],
        num_tasks: int,
        G: Tensor,
        losses: Tensor | None,
        inv_scale: float,
        task_names: Sequence[str] | None,
    ) -> tuple[list[Tensor], Tensor]:
        """Updates the state from the gradients (multiply them by ``inv_scale`` to unscale) and
        returns the task-major tensors to combine and their float64 CPU weights (``G`` is the
        unscaled gradients' float64 Gram matrix, ``losses`` the float64 losses): ``grads`` itself
        (the list passed in), or unscaled tensors of the state."""

    def aggregate(
        self,
        grads: Sequence[Tensor],
        num_tasks: int,
        out: Sequence[Tensor | None] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
        *,
        task_names: Sequence[str] | None = None,
        scale: float | None = None,
        accumulate: bool = False,
        check_finite: bool = True,
    ) -> Aggregation:
        grads = list(grads)
        method = type(self).__name__
        num_tensors(grads, num_tasks, method)
        self._check_layout(grads, num_tasks, names, task_names)
        G, losses64 = gram_on_host(
            grads,
            num_tasks,
            losses,
            names=names,
            task_names=task_names,
            scale=scale,
            check_finite=check_finite,
        )
        if G is None:  # an overflow under a GradScaler: the state is left as it was
            return Aggregation(fill_nan(grads, num_tasks, out), None, None, True, losses64)
        if losses64 is not None and losses64.shape != (num_tasks,):
            raise ValueError(
                f"{method}: expected {num_tasks} losses (one per task), got shape "
                f"{tuple(losses64.shape)}"
            )
        inv_scale = 1.0 if scale is None else 1.0 / scale
        tensors, w = self._step(grads, num_tasks, G, losses64, inv_scale, task_names)
        device = grads[0].device if grads else w.device
        # The state is unscaled; the gradients themselves already carry the scale.
        w_out = w if scale is None or tensors is grads else w * scale
        combined = combine_into(tensors, num_tasks, w_out.to(device), out, accumulate)
        return Aggregation(combined, w, G, losses=losses64)

    def _check_layout(
        self,
        grads: list[Tensor],
        num_tasks: int,
        names: Sequence[str] | None,
        task_names: Sequence[str] | None,
    ) -> None:
        method = type(self).__name__
        K = len(grads) // num_tasks
        layout = [(tuple(g.shape), g.device) for g in grads[:K]]
        task_list = None if task_names is None else [str(n) for n in task_names]
        known_tasks = getattr(self, "_task_order", None)
        if task_list is not None and known_tasks is not None and task_list != known_tasks:
            raise ValueError(
                f"{method} keeps per-task state for the tasks {known_tasks}, but this step's "
                f"tasks are {task_list}; call reset() to start over with other tasks"
            )
        num_known = self._num_tasks_in_state()
        if num_known is not None and num_known != num_tasks:
            raise ValueError(
                f"{method} keeps state for {num_known} tasks but got {num_tasks}; call reset() "
                "to start over with another number of tasks"
            )
        if self._layout is not None and self._has_tensor_state():
            if len(layout) != len(self._layout):
                raise ValueError(
                    f"{method} keeps state for {len(self._layout)} tensors per task but got "
                    f"{len(layout)}; call reset() to start over with other parameters"
                )
            for k, (now, then) in enumerate(zip(layout, self._layout)):
                if now != then:
                    name = names[k] if names is not None else f"tensor {k}"
                    raise ValueError(
                        f"{method}: {name} has shape {list(now[0])} on {now[1]}, but the state "
                        f"was built for shape {list(then[0])} on {then[1]}; call reset() to "
                        "start over with other parameters"
                    )
        self._layout = layout
        if task_list is not None and known_tasks is None:
            self._task_order = task_list

    @abstractmethod
    def _num_tasks_in_state(self) -> int | None:
        """The number of tasks the state belongs to (``None`` before the first call)."""

    @abstractmethod
    def _has_tensor_state(self) -> bool:
        """Whether per-tensor state exists (so that shapes must match)."""


def clone_tensors(tensors: list[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [t.detach().clone() for t in tensors]


def load_tensors(method: str, key: str, value: Any) -> list[Tensor] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, Tensor) for t in value):
        raise ValueError(f"{method} state: {key} must be a list of tensors or None")
    return [t.detach().clone() for t in value]


def load_vector(method: str, key: str, value: Any) -> Tensor | None:
    if value is None:
        return None
    v = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64).clone()
    if v.dim() != 1:
        raise ValueError(f"{method} state: {key} must be a vector, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{method} state: {key} must be finite, got {v.tolist()}")
    return v


def load_step(method: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{method} state: step must be a non-negative int, got {value!r}")
    return value


def task_label(t: int, task_names: Sequence[str] | None) -> str:
    return f"task {t}" if task_names is None else f"task {task_names[t]!r}"


def step_sizes(base: float, decay: float, step: int) -> float:
    """``base / step**decay``, LibMTL's schedule of MoCo's and DB-MTL's rates (step from 1)."""
    return base / step**decay
