"""Cross-stitch networks: one column per task, activations mixed by learned units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import (
    MultiTaskModule,
    check_same_tasks,
    check_task_names,
    task_inputs,
)

__all__ = ["CrossStitch", "CrossStitchUnit", "mixing_matrix"]


def mixing_matrix(size: int, alpha_self: float, alpha_other: float | None, owner: str) -> Tensor:
    """``size x size`` matrix with ``alpha_self`` on the diagonal and ``alpha_other`` elsewhere;
    ``alpha_other=None`` means ``(1 - alpha_self) / (size - 1)``, so each row is a convex
    combination (for two tasks, the paper's ``α_D = 1 - α_S``)."""
    alpha_self = float(alpha_self)
    if alpha_other is None:
        alpha_other = (1.0 - alpha_self) / (size - 1) if size > 1 else 0.0
    alpha_other = float(alpha_other)
    for label, value in (("alpha_self", alpha_self), ("alpha_other", alpha_other)):
        if not torch.isfinite(torch.tensor(value)):
            raise ValueError(f"{owner}: {label} must be finite, got {value}")
    matrix = torch.full((size, size), alpha_other)
    matrix.fill_diagonal_(alpha_self)
    return matrix


class CrossStitchUnit(nn.Module):
    """A cross-stitch unit (Misra et al. 2016, Eq. 1): ``x̃_t = Σ_s α_ts x_s`` over the T
    columns' activations, with one T x T matrix for the layer or, when ``channels`` is given,
    one per channel (channel dimension 1, as in ``(N, C, ...)``)."""

    def __init__(
        self,
        num_tasks: int,
        channels: int | None = None,
        alpha_self: float = 0.9,
        alpha_other: float | None = None,
    ) -> None:
        super().__init__()
        matrix = mixing_matrix(num_tasks, alpha_self, alpha_other, "CrossStitchUnit")
        if channels is None:
            self.alpha = Parameter(matrix)
        else:
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ValueError(
                    f"CrossStitchUnit: channels must be a positive int, got {channels!r}"
                )
            self.alpha = Parameter(matrix.expand(channels, -1, -1).clone())
        self.channels = channels

    def forward(self, activations: Sequence[Tensor]) -> list[Tensor]:
        stacked = torch.stack(list(activations))  # (T, N, C, ...)
        alpha = self.alpha.to(stacked.dtype)
        if self.channels is None:
            mixed = torch.einsum("ts,s...->t...", alpha, stacked)
        else:
            if stacked.dim() < 3 or stacked.shape[2] != self.channels:
                raise ValueError(
                    f"CrossStitchUnit: expected activations of shape (N, {self.channels}, ...), "
                    f"got {list(stacked.shape[1:])}"
                )
            flat = stacked.reshape(*stacked.shape[:3], -1)  # (T, N, C, rest)
            mixed = torch.einsum("cts,snck->tnck", alpha, flat).reshape(stacked.shape)
        return list(mixed.unbind(0))

    def extra_repr(self) -> str:
        return f"num_tasks={self.alpha.shape[-1]}, channels={self.channels}"


class CrossStitch(MultiTaskModule):
    """Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, `Cross-stitch networks for
    multi-task learning <https://arxiv.org/abs/1604.03539>`_, CVPR 2016).

    Each task has its own column, a sequence of stages; after the stages listed in
    ``stitch_after``, a :class:`CrossStitchUnit` replaces every column's activation by a learned
    linear combination of all columns' activations (Eq. 1, generalised from two to T tasks:
    ``x̃_t = Σ_s α_ts x_s``). Each task's head reads its column's last activation.

    Initialisation (the paper's design decisions, Sec. 4): ``α_S = alpha_self`` on the diagonal
    and ``α_D = alpha_other`` off it, by default ``(0.9, 0.1)`` for two tasks and
    ``(1 - α_S) / (T - 1)`` off the diagonal for T tasks (rows are convex combinations, as the
    paper's ``α_S + α_D = 1``). The paper also scales the learning rate of the α's up (by 10³)
    to make them move: put ``model.stitch_parameters()`` in a parameter group of their own to do
    the same.

    Partition: a stitch unit serves every task, and once activations are mixed, every task's
    output depends on every column's earlier stages. So ``shared_parameters()`` holds the stitch
    units and all columns' stages up to the last stitched one — the parameters whose task
    gradients must be aggregated — and ``task_parameters(t)`` holds the stages of column t after
    the last stitch unit and head t.

    Args:
        columns: one sequence of stages (modules) per task, keyed by task name; the same number
            of stages in each column, with activations of equal shapes at the stitched stages.
        heads: one module per task.
        stitch_after: the indices of the stages followed by a cross-stitch unit (default: every
            stage).
        channels: optional, for each stitched stage (in ``stitch_after`` order), its number of
            channels (dimension 1) to have one unit per channel as in the paper; ``None`` for one
            T x T matrix per stitched stage.
        alpha_self, alpha_other: the initialisation (see above).
    """

    def __init__(
        self,
        columns: Mapping[str, Sequence[nn.Module]],
        heads: Mapping[str, nn.Module],
        stitch_after: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        alpha_self: float = 0.9,
        alpha_other: float | None = None,
    ) -> None:
        owner = "CrossStitch"
        if not isinstance(columns, Mapping) or not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: columns and heads must be dicts keyed by task name")
        super().__init__(check_task_names(columns.keys(), owner))
        check_same_tasks(heads.keys(), self.task_names, "heads", owner)
        lengths = {name: len(list(columns[name])) for name in self.task_names}
        num_stages = lengths[self.task_names[0]]
        for name, length in lengths.items():
            if length != num_stages:
                raise ValueError(
                    f"{owner}: the column of task {name!r} has {length} stages but the column of "
                    f"task {self.task_names[0]!r} has {num_stages}; columns need the same stages"
                )
        if num_stages == 0:
            raise ValueError(f"{owner}: the columns have no stages")
        self.columns = nn.ModuleDict(
            {name: nn.ModuleList(list(columns[name])) for name in self.task_names}
        )
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        after = list(range(num_stages)) if stitch_after is None else [int(i) for i in stitch_after]
        if sorted(set(after)) != after:
            raise ValueError(f"{owner}: stitch_after must be increasing and distinct, got {after}")
        for i in after:
            if not 0 <= i < num_stages:
                raise ValueError(
                    f"{owner}: stitch_after has stage {i}, but the columns have stages "
                    f"0..{num_stages - 1}"
                )
        if channels is not None and len(channels) != len(after):
            raise ValueError(
                f"{owner}: channels has {len(channels)} entries for {len(after)} stitched stages"
            )
        self.stitch_after = after
        T = len(self.task_names)
        self.stitches = nn.ModuleList(
            CrossStitchUnit(T, None if channels is None else channels[k], alpha_self, alpha_other)
            for k in range(len(after))
        )
        self._num_stages = num_stages
        self.check_partition()

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = task_inputs(x, self.task_names, "CrossStitch")
        activations = [inputs[name] for name in self.task_names]
        stitches = dict(zip(self.stitch_after, self.stitches))
        for i in range(self._num_stages):
            activations = [
                self.columns[name][i](a) for name, a in zip(self.task_names, activations)
            ]
            if i in stitches:
                shapes = {tuple(a.shape) for a in activations}
                if len(shapes) > 1:
                    raise ValueError(
                        f"CrossStitch: stage {i} gives activations of different shapes "
                        f"{dict(zip(self.task_names, (list(a.shape) for a in activations)))}; "
                        "a cross-stitch unit mixes equal shapes"
                    )
                activations = stitches[i](activations)
        return {name: self.heads[name](a) for name, a in zip(self.task_names, activations)}

    def stitch_parameters(self) -> list[Parameter]:
        """The α's of the cross-stitch units (e.g. for a parameter group with a larger LR)."""
        return list(self.stitches.parameters())

    def _shared_parameter_list(self) -> list[Parameter]:
        last = self.stitch_after[-1] if self.stitch_after else -1
        stages = [
            p
            for name in self.task_names
            for stage in self.columns[name][: last + 1]
            for p in stage.parameters()
        ]
        return self.stitch_parameters() + stages

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        last = self.stitch_after[-1] if self.stitch_after else -1
        after = [p for stage in self.columns[name][last + 1 :] for p in stage.parameters()]
        return after + list(self.heads[name].parameters())
