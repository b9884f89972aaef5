"""The interface every multi-task model of :mod:`mtlgrad.nn` offers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import Parameter

__all__ = ["MultiTaskModule", "check_task_names", "task_inputs"]


def check_task_names(names: Iterable[Any], owner: str) -> list[str]:
    """Task names as a list of distinct non-empty strings (a clear error otherwise)."""
    result = list(names)
    if not result:
        raise ValueError(f"{owner}: no tasks (expected at least one task name)")
    for k, name in enumerate(result):
        if not isinstance(name, str) or not name:
            raise TypeError(f"{owner}: task names must be non-empty strings, got {name!r} at {k}")
        if "." in name:
            # ModuleDict keys cannot contain dots.
            raise ValueError(f"{owner}: task name {name!r} contains '.', which modules reject")
    duplicates = sorted({n for n in result if result.count(n) > 1})
    if duplicates:
        raise ValueError(f"{owner}: duplicated task names {duplicates}")
    return result


def check_same_tasks(given: Iterable[str], expected: Sequence[str], what: str, owner: str) -> None:
    """Raises a ValueError when the keys of ``what`` are not exactly the task names."""
    keys = list(given)
    missing = [n for n in expected if n not in keys]
    extra = [n for n in keys if n not in expected]
    if missing or extra:
        raise ValueError(
            f"{owner}: {what} must have one entry per task {list(expected)}; "
            f"missing {missing}, unexpected {extra}"
        )


def task_inputs(x: Tensor | Mapping[str, Tensor], names: Sequence[str], owner: str) -> dict:
    """One input per task: ``x`` for every task, or ``x[name]`` when ``x`` is a dict keyed by
    the task names (each task on its own batch)."""
    if isinstance(x, Mapping):
        check_same_tasks(x.keys(), names, "the input dict", owner)
        return {name: x[name] for name in names}
    return {name: x for name in names}


class MultiTaskModule(nn.Module):
    """Base class of the multi-task models: named tasks, one output per task, and an exact
    partition of the parameters into shared and task-specific ones.

    - ``task_names``: the tasks, in order.
    - ``forward(x)`` returns ``{task name: output}``.
    - :meth:`shared_parameters`: the parameters that more than one task's output depends on —
      what :func:`mtlgrad.backward` and :class:`mtlgrad.optim.MTLOptimizer` aggregate.
    - :meth:`task_parameters`: the parameters only that task's output depends on.

    The shared set and the T task sets are pairwise disjoint and together are exactly
    ``set(model.parameters())``. Subclasses implement :meth:`_shared_parameter_list` and
    :meth:`_task_parameter_list`.
    """

    def __init__(self, task_names: Iterable[str]) -> None:
        super().__init__()
        self.task_names: list[str] = check_task_names(task_names, type(self).__name__)

    def check_task(self, name: str) -> str:
        """``name`` if it is a task of this model, else a KeyError listing the known tasks."""
        if name not in self.task_names:
            raise KeyError(
                f"{type(self).__name__}: unknown task {name!r}; the tasks are {self.task_names}"
            )
        return name

    def _shared_parameter_list(self) -> list[Parameter]:
        raise NotImplementedError

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        raise NotImplementedError

    def shared_parameters(self) -> Iterator[Parameter]:
        """The parameters shared by the tasks (each once, in a fixed order)."""
        yield from _unique(self._shared_parameter_list())

    def task_parameters(self, name: str) -> Iterator[Parameter]:
        """The parameters of task ``name`` alone (each once, in a fixed order)."""
        yield from _unique(self._task_parameter_list(self.check_task(name)))

    def check_partition(self) -> None:
        """Raises a ValueError when a parameter belongs to two groups (the shared set and a task,
        or two tasks) — a module reused across tasks, which would make the partition inexact.
        Subclasses call it at the end of ``__init__``."""
        owner: dict[int, str] = {}
        groups = [("the shared parameters", self._shared_parameter_list())]
        groups += [(f"task {name!r}", self._task_parameter_list(name)) for name in self.task_names]
        for label, params in groups:
            for p in params:
                if owner.setdefault(id(p), label) != label:
                    raise ValueError(
                        f"{type(self).__name__}: a parameter of shape {list(p.shape)} belongs to "
                        f"both {owner[id(p)]} and {label}; give each task its own modules "
                        "(copy.deepcopy) and keep shared modules out of the task-specific ones"
                    )

    def extra_repr(self) -> str:
        return f"task_names={self.task_names}"


def _unique(params: Iterable[Parameter]) -> Iterator[Parameter]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p
