"""Task-specific batch normalisation: one BN per task, the rest of the model shared."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names, task_inputs

__all__ = [
    "TaskBatchNorm",
    "TaskBatchNormModel",
    "convert_task_batchnorm",
    "task_batchnorm_parameters",
    "use_task",
]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class TaskBatchNorm(nn.Module):
    """Batch normalisation with one set of statistics and affine parameters per task (the
    private, non-shared BN of Mills, Hu & Min, `Multi-task federated learning for personalised
    deep neural networks in edge computing <https://arxiv.org/abs/2007.09236>`_, arXiv 2020,
    IEEE TPDS 2022).

    Holds one ``nn.BatchNorm{dims}d`` per task in ``norms``; the active task, set with
    :meth:`set_task` or :func:`use_task`, chooses which one normalises the input (and, in
    training, which running statistics are updated). Running without an active task is an error.

    Args:
        task_names: the tasks.
        num_features, eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        dims: 1, 2 or 3 (``BatchNorm1d``, ``2d``, ``3d``).
    """

    def __init__(
        self,
        task_names: Iterable[str],
        num_features: int,
        dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if dims not in _BY_DIMS:
            raise ValueError(f"TaskBatchNorm: dims must be 1, 2 or 3, got {dims!r}")
        names = check_task_names(task_names, "TaskBatchNorm")
        kind = _BY_DIMS[dims]
        self.norms = nn.ModuleDict(
            {name: kind(num_features, eps, momentum, affine, track_running_stats) for name in names}
        )
        self.task: str | None = None

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, task_names: Iterable[str]) -> TaskBatchNorm:
        """One copy of ``bn`` per task: its affine parameters and running statistics are copied
        into every task's batch norm (same device and dtype)."""
        if not isinstance(bn, BATCHNORMS):
            raise TypeError(
                f"TaskBatchNorm.from_batchnorm: expected an nn.BatchNorm1d/2d/3d, got "
                f"{type(bn).__name__}"
            )
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in bn.parameters()):
            raise ValueError(
                "TaskBatchNorm.from_batchnorm: the lazy batch norm is not initialised yet; run "
                "one forward before converting"
            )
        names = check_task_names(task_names, "TaskBatchNorm")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.norms = nn.ModuleDict({name: copy.deepcopy(bn) for name in names})
        module.task = None
        return module

    @property
    def task_names(self) -> list[str]:
        return list(self.norms.keys())

    def set_task(self, name: str | None) -> None:
        """Makes ``name`` the active task (``None``: no active task)."""
        if name is not None and name not in self.norms:
            raise KeyError(f"TaskBatchNorm: unknown task {name!r}; the tasks are {self.task_names}")
        self.task = name

    def forward(self, x: Tensor) -> Tensor:
        if self.task is None:
            raise RuntimeError(
                "TaskBatchNorm: no active task; choose one with mtlgrad.nn.use_task(model, name) "
                "or batch_norm.set_task(name), or wrap the model in TaskBatchNormModel"
            )
        return self.norms[self.task](x)

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


def convert_task_batchnorm(model: nn.Module, task_names: Iterable[str]) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` of ``model`` by a :class:`TaskBatchNorm` holding
    one copy per task (weights and running statistics copied), in place; returns the model (a new
    module when ``model`` itself is a batch norm), like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    With every task's copy equal to the original, the converted model computes what the original
    did, whichever task is active."""
    names = check_task_names(task_names, "convert_task_batchnorm")
    if isinstance(model, BATCHNORMS):
        return TaskBatchNorm.from_batchnorm(model, names)
    for child_name, child in model.named_children():
        if isinstance(child, TaskBatchNorm):
            continue
        converted = convert_task_batchnorm(child, names)
        if converted is not child:
            setattr(model, child_name, converted)
    return model


def _task_batchnorms(model: nn.Module) -> list[TaskBatchNorm]:
    return [m for m in model.modules() if isinstance(m, TaskBatchNorm)]


@contextmanager
def use_task(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Within the block, every :class:`TaskBatchNorm` of ``model`` uses task ``name``'s batch
    norm; the previous active tasks are restored afterwards."""
    norms = _task_batchnorms(model)
    previous = [m.task for m in norms]
    try:
        for m in norms:
            m.set_task(name)
        yield model
    finally:
        for m, task in zip(norms, previous):
            m.task = task


def task_batchnorm_parameters(model: nn.Module, name: str) -> list[Parameter]:
    """The parameters of task ``name``'s batch norms in every :class:`TaskBatchNorm` of
    ``model`` (a KeyError naming the known tasks when a batch norm does not have that task)."""
    params = []
    for m in _task_batchnorms(model):
        if name not in m.norms:
            raise KeyError(
                f"task_batchnorm_parameters: unknown task {name!r}; the tasks are {m.task_names}"
            )
        params.extend(m.norms[name].parameters())
    return params


class TaskBatchNormModel(MultiTaskModule):
    """A model whose batch norms are task-specific and everything else shared (Mills et
    al., see :class:`TaskBatchNorm`).

    The batch norms of ``model`` are converted in place with :func:`convert_task_batchnorm`
    (a model already holding :class:`TaskBatchNorm` s for these tasks is used as it is).
    ``forward(x)`` runs the model once per task with that task's batch norms — each task
    normalises with its own statistics, so the tasks need separate forwards — and returns
    ``{task: output}``, through ``heads[task]`` when heads are given. ``x`` may be a dict with one
    batch per task.

    Partition: ``task_parameters(t)`` = task t's batch-norm parameters (and head t);
    ``shared_parameters()`` = every other parameter of the model.

    Args:
        model: the network (e.g. a torchvision ResNet).
        task_names: the tasks.
        heads: optional, one module per task applied to the model's output.
    """

    def __init__(
        self,
        model: nn.Module,
        task_names: Iterable[str],
        heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        owner = "TaskBatchNormModel"
        super().__init__(check_task_names(task_names, owner))
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        model = convert_task_batchnorm(model, self.task_names)
        norms = _task_batchnorms(model)
        if not norms:
            raise ValueError(
                f"{owner}: the model has no nn.BatchNorm1d/2d/3d to make task-specific"
            )
        for m in norms:
            if m.task_names != self.task_names:
                raise ValueError(
                    f"{owner}: a TaskBatchNorm of the model has tasks {m.task_names}, expected "
                    f"{self.task_names}"
                )
        self.model = model
        if heads is not None:
            check_same_tasks(heads.keys(), self.task_names, "heads", owner)
            self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        else:
            self.heads = None
        self.check_partition()

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = task_inputs(x, self.task_names, "TaskBatchNormModel")
        outputs = {}
        for name in self.task_names:
            with use_task(self.model, name):
                out = self.model(inputs[name])
            outputs[name] = out if self.heads is None else self.heads[name](out)
        return outputs

    def _shared_parameter_list(self) -> list[Parameter]:
        own = {id(p) for m in _task_batchnorms(self.model) for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in own]

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        heads = [] if self.heads is None else list(self.heads[name].parameters())
        return task_batchnorm_parameters(self.model, name) + heads
