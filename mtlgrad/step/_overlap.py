"""Replicated mode's average of the shared level, overlapped with the backward passes.

Under torch.distributed (replicated mode, without ``features=``), each task's gradients of the
shared parameters are averaged over the ranks before the aggregation. The engines hand each
task's gradients to :meth:`OverlappedLevelMean.add` as soon as its backward returns (the loop
engine) or its chunk's vmapped backward does (the batched engine); their bucketed all-reduces
start there, asynchronously, and run while the next tasks' backward passes do.
:meth:`OverlappedLevelMean.finish`, after the last task, waits for them and divides by the
number of ranks.

What is sent must be the same on every rank without asking the others first: every (task,
input) pair of the shared level is, with zeros where this rank's task does not reach that input
(rare: a task-specific branch passed as shared, or a branch that this rank's batch does not
take). After the last backward, one small MAX all-reduce of the T x K "who reached what" mask
tells which pairs some rank reached: the others get ``None`` again (a shared parameter that no
task reaches on any rank keeps ``.grad`` None; a task that reaches none is warned about, as with
one process).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mtlgrad.step._differentiate import TaskGradients
from mtlgrad.step._distributed import PendingMean, Ranks

__all__ = ["OverlappedLevelMean"]


class OverlappedLevelMean:
    """The rank average of the per-task gradients of the shared level ``level``, started task
    by task while the engine differentiates; pass :meth:`add` as the engine's ``on_tasks``."""

    def __init__(self, ranks: Ranks, level: Sequence[Tensor]) -> None:
        self.ranks = ranks
        self.level = list(level)
        # (first task, task count, the all-reduces in flight), in the order of the launches.
        self.pending: list[tuple[int, int, PendingMean]] = []

    def add(self, first: int, grads: list[list[Tensor | None]]) -> None:
        """Starts the all-reduces of tasks ``first``, ``first + 1``, ...: every input, zeros
        where the task does not reach it on this rank."""
        tensors = []
        for per_task in grads:
            for g, x in zip(per_task, self.level):
                tensors.append(torch.zeros_like(x) if g is None else g)
        pending = self.ranks.launch(tensors)
        self.pending.append((first, len(grads), pending))
        # The buckets hold copies: autograd's tensors can go (one T x P in memory, not two).
        # The engine's lists point into the buckets instead, None staying None, until finish().
        views = iter(pending.views())
        for per_task in grads:
            for k, view in zip(range(len(per_task)), views):
                if per_task[k] is not None:
                    per_task[k] = view

    def finish(self, grads: TaskGradients) -> None:
        """Waits for the all-reduces; ``grads.level`` then holds the averages where some rank's
        task reaches the input (``None`` elsewhere), and ``grads.reached`` the inputs that some
        task reaches on some rank."""
        T, K = len(grads.names), len(self.level)
        assert K == 0 or sum(count for _, count, _ in self.pending) == T, "a task was not added"
        mask = torch.tensor(
            [[g is not None for g in per_task] for per_task in grads.level], dtype=torch.int32
        ).reshape(T, K)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.ranks.group)
        reached = mask.bool().tolist()
        for first, count, pending in self.pending:
            averaged = iter(self.ranks.finish(pending))
            for t in range(first, first + count):
                for k in range(K):
                    g = next(averaged)
                    grads.level[t][k] = g if reached[t][k] else None
        self.pending = []
        grads.reached = mask.any(dim=0).nonzero().flatten().tolist()
