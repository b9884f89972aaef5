"""Stage 1 of the step, differentiate: who owns which parameter, and the per-task gradients.

- :func:`partition`: the shared parameters and each task's own parameters (its heads), from one
  walk of the autograd graph for all tasks together (or as given, with no walk at all).
- :func:`differentiate`: the per-task gradients of the shared level (the shared parameters, or
  the shared representation ``features``) and of each task's own parameters, as one
  :class:`TaskGradients`, from one of two engines:

  - ``"loop"``: one backward per task (``retain_graph``), with the shared level and that task's
    own parameters as inputs;
  - ``"batched"``: one vmapped backward over all tasks (``is_grads_batched=True``), in chunks of
    tasks to bound memory; the heads then take one backward of the summed losses (each head is
    reached by one task, so the sum gives every head its own task's gradient).

The per-task gradients are the tensors autograd produces: nothing is copied or concatenated.
Both engines hand each task's gradients of the shared level to an optional ``on_tasks`` callback
as soon as they exist (the loop engine after each task's backward, the batched engine after each
chunk), while the remaining backward passes run: under torch.distributed, their all-reduces
start there (:mod:`mtlgrad.step._overlap`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENGINES",
    "OnTasks",
    "Partition",
    "TaskGradients",
    "all_leaves",
    "differentiate",
    "partition",
]

ENGINES = ("loop", "batched")

#: ``on_tasks(first, level)``: the gradients of the shared level of tasks ``first``,
#: ``first + 1``, ... (``level[i][k]``: task ``first + i``, input k; ``None`` where the task does
#: not reach it), called by the engines as soon as these tasks' backward has returned.
OnTasks = Callable[[int, list[list[Tensor | None]]], None]


@dataclass
class Partition:
    """Who owns which parameter in a step.

    Attributes:
        shared: the shared parameters, whose per-task gradients are aggregated.
        heads: for each task, its own parameters (they get that task's gradient).
        reach: for each shared parameter, the tasks whose loss the walk saw reach it (empty
            where the walk did not go: below the features, or no walk when the partition was
            given).
        above_features: with ``features``, for each shared parameter, the tasks whose loss
            reaches it without passing through the features (empty for a trunk parameter).
        feature_reach: with ``features``, for each feature tensor, the tasks whose loss the
            walk saw reach its autograd node.
    """

    shared: list[Tensor]
    heads: list[list[Tensor]]
    reach: list[list[int]] | None = None
    above_features: list[list[int]] | None = None
    feature_reach: list[list[int]] | None = None


@dataclass
class TaskGradients:
    """What the engines return, the same for every engine.

    Attributes:
        names: the task names.
        level: ``level[t][k]``: the gradient of task t's loss with respect to input k of the
            shared level (a shared parameter, or a feature tensor), ``None`` where that loss does
            not reach it.
        reached: the inputs of the shared level that some task reaches, ascending.
        one_task: recomputes one task's gradients of the shared level alone, while the graph is
            still alive (the batched engine: a non-finite value met in its shared backward
            reaches every task, 0 * Inf being NaN, so this tells which task it came from).
    """

    names: list[str]
    level: list[list[Tensor | None]]
    _heads: list[list[tuple[Tensor, Tensor]]] | Callable[[], list[list[tuple[Tensor, Tensor]]]]
    one_task: Callable[[int], list[Tensor | None]] | None = None
    reached: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        K = len(self.level[0]) if self.level else 0
        self.reached = [k for k in range(K) if any(g[k] is not None for g in self.level)]

    def heads(self) -> list[list[tuple[Tensor, Tensor]]]:
        """For each task, ``(parameter, gradient)`` of each of its own parameters that its loss
        reaches. The batched engine computes them here, with one backward of the summed losses
        (after the aggregation, so that the graph is alive until then)."""
        if callable(self._heads):
            self._heads = self._heads()
        return self._heads

    def map_heads(
        self,
        fn: Callable[[list[list[tuple[Tensor, Tensor]]]], list[list[tuple[Tensor, Tensor]]]],
    ) -> None:
        """Passes the heads' gradients through ``fn`` when they are asked for (averaging them
        over the ranks, under torch.distributed)."""
        inner = self._heads
        self._heads = lambda: fn(inner() if callable(inner) else inner)

    def task_major(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """The reached inputs' gradients as one task-major list (task 0's, then task 1's, ...);
        a task that does not reach an input some other task reaches contributes zeros there."""
        flat: list[Tensor] = []
        for grads in self.level:
            for k in self.reached:
                g = grads[k]
                flat.append(torch.zeros_like(inputs[k]) if g is None else g)
        return flat

    def aggregate(
        self,
        aggregator: Any,
        level: Sequence[Tensor],
        shared: Sequence[Tensor] | None,
        losses: Tensor,
        scale: float | None,
        check_finite: bool = True,
    ) -> Any:
        """Stage 2: the aggregator on these gradients (see :mod:`mtlgrad.step._write`)."""
        from mtlgrad.step._write import aggregate

        return aggregate(aggregator, self, level, shared, losses, scale, check_finite)

    def write(
        self,
        aggregation: Any,
        shared: Sequence[Tensor],
        features: Sequence[Tensor] | None,
        scale_task_params: bool,
        retain_graph: bool,
        trunk_mean: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None,
    ) -> None:
        """Stage 3: the heads' and the shared parameters' ``.grad`` (``trunk_mean``: under
        torch.distributed with ``features``, averages the trunk's gradients over the ranks)."""
        from mtlgrad.step._write import write

        write(self, aggregation, shared, features, scale_task_params, retain_graph, trunk_mean)

    def unreached_tasks(self) -> list[int]:
        """Tasks whose loss reaches none of the reached inputs (their shared gradient is 0)."""
        if not self.reached:
            return []
        return [
            t for t, grads in enumerate(self.level) if all(grads[k] is None for k in self.reached)
        ]


# ---- who owns which parameter: one walk of the graph --------------------------------------------


def _leaf_reach(
    losses: Sequence[Tensor], stop_at: Sequence[Tensor], below_stops: bool
) -> tuple[list[Tensor], list[int], list[int], dict]:
    """One walk of the graph below all the losses: every leaf that requires grad, with two task
    bit masks: the tasks that reach it at all, and those that reach it without passing through
    one of the ``stop_at`` tensors (the features). Without ``below_stops`` the walk does not go
    below those tensors (the trunk under the features is not visited). Also the task mask of
    every node visited."""
    roots = [loss.grad_fn for loss in losses]
    stops = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    # Depth-first post-order over the nodes reachable from any loss, each node visited once; its
    # reverse is a topological order (every node before the nodes it feeds into the backward).
    order = []
    visited = set()
    for root in roots:
        if root is None or root in visited:
            continue
        visited.add(root)
        stack = [(root, iter(root.next_functions))]
        while stack:
            node, children = stack[-1]
            if node in stops and not below_stops:
                children = iter(())
            for child, _ in children:
                if child is not None and child not in visited:
                    visited.add(child)
                    stack.append((child, iter(child.next_functions)))
                    break
            else:
                stack.pop()
                order.append(node)
    reach_all: dict = {}
    reach_direct: dict = {}
    for t, root in enumerate(roots):
        if root is not None:
            reach_all[root] = reach_all.get(root, 0) | (1 << t)
            reach_direct[root] = reach_direct.get(root, 0) | (1 << t)
    leaves: list[Tensor] = []
    masks_all: list[int] = []
    masks_direct: list[int] = []
    for node in reversed(order):
        every = reach_all.get(node, 0)
        direct = 0 if node in stops else reach_direct.get(node, 0)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if getattr(variable, "_mtlgrad_gram_anchor", False):
                continue  # a GramEngine's anchor: no one's parameter
            leaves.append(variable)
            masks_all.append(every)
            masks_direct.append(direct)
            continue
        if node in stops and not below_stops:
            continue
        for child, _ in node.next_functions:
            if child is not None:
                reach_all[child] = reach_all.get(child, 0) | every
                if direct:
                    reach_direct[child] = reach_direct.get(child, 0) | direct
    return leaves, masks_all, masks_direct, reach_all


def all_leaves(losses: Sequence[Tensor]) -> list[Tensor]:
    """Every leaf that requires grad below the losses (a normal backward of them writes into
    each one's ``.grad``), in the walk's order, the same on every replica of a model."""
    return _leaf_reach(losses, (), below_stops=True)[0]


def _tasks(mask: int, num_tasks: int) -> list[int]:
    return [t for t in range(num_tasks) if mask >> t & 1]


def partition(
    losses: Sequence[Tensor],
    *,
    shared: Sequence[Tensor] | None,
    candidates: Sequence[Tensor] = (),
    features: Sequence[Tensor] = (),
) -> Partition:
    """The step's partition from one walk of the graph.

    With ``shared`` given, the heads of task t are the leaves its loss reaches (without passing
    through ``features``) that are not shared. With ``shared=None``, the shared parameters are
    the ``candidates`` (e.g. an optimizer's parameters) that more than one loss reaches (all
    those a single loss reaches, when there is one task).
    """
    T = len(losses)
    leaves, masks_all, masks_direct, nodes = _leaf_reach(
        losses, features, below_stops=shared is None
    )
    index = {id(leaf): i for i, leaf in enumerate(leaves)}
    if shared is None:
        threshold = 2 if T > 1 else 1
        shared = [
            p
            for p in candidates
            if id(p) in index and bin(masks_all[index[id(p)]]).count("1") >= threshold
        ]
    shared = list(shared)
    shared_ids = {id(p) for p in shared}
    heads: list[list[Tensor]] = [[] for _ in range(T)]
    for leaf, mask in zip(leaves, masks_direct):
        if id(leaf) not in shared_ids:
            for t in _tasks(mask, T):
                heads[t].append(leaf)
    reach = [_tasks(masks_all[index[id(p)]], T) if id(p) in index else [] for p in shared]
    above = feature_reach = None
    if features:
        above = [_tasks(masks_direct[index[id(p)]], T) if id(p) in index else [] for p in shared]
        feature_reach = [_tasks(nodes.get(f.grad_fn, 0), T) for f in features]
    return Partition(shared, heads, reach, above, feature_reach)


# ---- the engines -----------------------------------------------------------------------------


def differentiate(
    names: Sequence[str],
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    heads: Sequence[Sequence[Tensor]],
    *,
    engine: str,
    retain_graph: bool,
    batch_size: int | None = None,
    on_tasks: OnTasks | None = None,
) -> TaskGradients:
    """Per-task gradients of ``inputs`` (the shared level) and of each task's ``heads``; each
    task's gradients of ``inputs`` also go to ``on_tasks`` as soon as they exist."""
    if engine == "loop":
        return _loop(names, losses, inputs, heads, retain_graph, on_tasks)
    if engine == "batched":
        return _batched(names, losses, inputs, heads, retain_graph, batch_size, on_tasks)
    raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}; got {engine!r}")


def _loop(
    names: Sequence[str],
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    heads: Sequence[Sequence[Tensor]],
    retain_graph: bool,
    on_tasks: OnTasks | None,
) -> TaskGradients:
    K = len(inputs)
    level, head_grads = [], []
    for t, loss in enumerate(losses):
        own = list(heads[t])
        keep = retain_graph or t < len(losses) - 1
        result = torch.autograd.grad(loss, list(inputs) + own, retain_graph=keep, allow_unused=True)
        level.append(list(result[:K]))
        if on_tasks is not None:
            on_tasks(t, level[-1:])
        head_grads.append([(h, g) for h, g in zip(own, result[K:]) if g is not None])
    return TaskGradients(list(names), level, head_grads)


def _batched(
    names: Sequence[str],
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    heads: Sequence[Sequence[Tensor]],
    retain_graph: bool,
    batch_size: int | None,
    on_tasks: OnTasks | None,
) -> TaskGradients:
    T = len(losses)
    # A parameter in several tasks' heads needs its per-task gradients: it joins the vmapped
    # backward. The others take one backward of the summed losses.
    owners: dict[int, int] = {}
    for hs in heads:
        for h in hs:
            owners[id(h)] = owners.get(id(h), 0) + 1
    multi: list[Tensor] = []
    single: list[Tensor] = []
    seen: set[int] = set()
    for hs in heads:
        for h in hs:
            if id(h) not in seen:
                seen.add(id(h))
                (multi if owners[id(h)] > 1 else single).append(h)
    batched_inputs = list(inputs) + multi
    K = len(inputs)
    level: list[list[Tensor | None]] = [[] for _ in range(T)]
    multi_grads: list[list[Tensor | None]] = [[] for _ in range(T)]
    if batched_inputs:
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
        step = T if batch_size is None else max(1, batch_size)
        for start in range(0, T, step):
            rows = eye[start : start + step]
            keep = retain_graph or bool(single) or start + step < T
            try:
                grads = torch.autograd.grad(
                    stacked,
                    batched_inputs,
                    grad_outputs=rows,
                    retain_graph=keep,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            except RuntimeError as error:
                raise RuntimeError(
                    "engine='batched' could not vmap the backward of this model (some operation "
                    f"has no batching rule): {error}\nUse engine='loop', which runs one backward "
                    "per task."
                ) from error
            for i in range(rows.shape[0]):
                per_task = [None if g is None else g[i] for g in grads]
                level[start + i] = per_task[:K]
                multi_grads[start + i] = per_task[K:]
            if on_tasks is not None:
                on_tasks(start, level[start : start + rows.shape[0]])
    multi_heads = [
        [(h, g) for h, g in zip(multi, multi_grads[t]) if g is not None] for t in range(T)
    ]

    def heads_after_aggregation() -> list[list[tuple[Tensor, Tensor]]]:
        if not single:
            return multi_heads
        summed = torch.autograd.grad(
            sum(losses), single, retain_graph=retain_graph, allow_unused=True
        )
        grad_of = {id(h): g for h, g in zip(single, summed)}
        result = [list(pairs) for pairs in multi_heads]
        for t, hs in enumerate(heads):
            for h in hs:
                g = grad_of.get(id(h))
                if g is not None and owners[id(h)] == 1:
                    result[t].append((h, g))
        return result

    graph_alive = retain_graph or bool(single)

    def one_task(t: int) -> list[Tensor | None]:
        return list(
            torch.autograd.grad(losses[t], list(inputs), retain_graph=True, allow_unused=True)
        )

    return TaskGradients(
        list(names), level, heads_after_aggregation, one_task if graph_alive else None
    )
