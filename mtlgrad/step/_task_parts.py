"""Each task's own part of the graph (its head), differentiated one task at a time before the
Gram engine's vmapped backward over the tasks.

The vmapped backward runs every node it passes for the T tasks at once. A task's head is reached
by that task's loss alone, so vmapped it carries T rows of which T - 1 are zeros: on the engines
table's MLP (T = 8 Linear heads 1024 -> 1 on 256 rows) that is eight 2048 x 1024 outer products and
seven sums of 8 x 256 x 1024 tensors per step, a sixth of the step, where each task needs one
256 x 1024 product. A task-specific decoder would cost T times its own backward.

So the engine first finds each task's own part: the nodes its loss reaches whose every parent is
in that part (so no other loss reaches them), that use no shared parameter and are not a hooked
shared layer's hand-over node. Task t's loss is differentiated through its part alone, to the edges
where the part ends (its *frontier*: typically the trunk's output), and the vmapped backward
starts at the frontier edges of all tasks, seeded with each task's gradient there (zeros where an
edge is not on a task's frontier). The result is the same: the chain rule through a cut.

A cut needs that none of a task's frontier edges lies below another of its own (the gradient at
the lower one, taken through the whole graph, would include the path through the upper one, and
the vmapped backward would then add that path a second time: a head that reads the trunk's output
and also an intermediate of it). Where that happens, or where no task has a part of its own
(per-sample losses of one tensor, a loss that is the trunk's output), :func:`find` gives None and
the engine runs its vmapped backward from the losses themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["TaskParts", "find"]


@dataclass
class TaskParts:
    """The frontier edges of the tasks' own parts, and which edges are each task's."""

    roots: list[GradientEdge | None]  # each task's loss as an edge (None: its loss is constant)
    edges: list[GradientEdge]  # every task's frontier edges, each once
    frontier: list[list[int]]  # per task, indices into ``edges``
    own: list[bool]  # per task, whether it has a part of its own (else its frontier is its loss)

    def seeds(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """For each frontier edge, the T tasks' gradients there (``T x ...``): one backward per
        task through its own part only."""
        T = len(self.roots)
        per_edge: list[list[Tensor | None]] = [[None] * T for _ in self.edges]
        one = torch.ones((), dtype=dtype, device=device)
        for t in range(T):
            root = self.roots[t]
            if root is None or not self.frontier[t]:
                continue
            if not self.own[t]:
                per_edge[self.frontier[t][0]][t] = one  # its frontier is its loss itself
                continue
            grads = torch.autograd.grad(
                [root],
                [self.edges[i] for i in self.frontier[t]],
                grad_outputs=[one],
                retain_graph=True,
                allow_unused=True,
            )
            for i, g in zip(self.frontier[t], grads):
                per_edge[i][t] = g
        seeds = []
        for rows in per_edge:
            some = next((g for g in rows if g is not None), None)
            if some is None:  # autograd passed nothing through this edge for any task
                some = torch.zeros((), dtype=dtype, device=device)
                rows = [some] * T
            seeds.append(torch.stack([torch.zeros_like(some) if g is None else g for g in rows]))
        return seeds


def find(
    stacked: Tensor,
    indegree: dict,
    blocked: Callable[[object], bool],
) -> TaskParts | None:
    """The tasks' own parts of the graph under ``stacked`` (the T losses stacked), or None where
    no task has one or where a frontier would not be a cut (module docstring).

    Args:
        stacked: ``torch.stack`` of the T scalar losses.
        indegree: for every node the losses reach, the number of edges into it from nodes the
            losses reach (the stack's own edges included).
        blocked: whether a node may not be in a task's part (it uses a shared parameter, or it is
            a hooked shared layer's hand-over node).
    """
    root = stacked.grad_fn
    if root is None or len(root.next_functions) != stacked.shape[0]:
        return None
    roots: list[GradientEdge | None] = []
    edges: list[GradientEdge] = []
    index: dict[tuple, int] = {}
    frontier: list[list[int]] = []
    own: list[bool] = []

    def edge_index(node: object, nr: int) -> int:
        key = (node, nr)
        if key not in index:
            index[key] = len(edges)
            edges.append(GradientEdge(node, nr))
        return index[key]

    for node, nr in root.next_functions:
        if node is None:
            roots.append(None)
            frontier.append([])
            own.append(False)
            continue
        roots.append(GradientEdge(node, nr))
        part = _own_part(node, indegree, blocked)
        if not part:
            frontier.append([edge_index(node, nr)])
            own.append(False)
            continue
        ends = _ends(part)
        if not _is_cut({child for child, _ in ends}):
            return None
        frontier.append(sorted({edge_index(child, cnr) for child, cnr in ends}))
        own.append(True)
    if not any(own):
        return None
    return TaskParts(roots, edges, frontier, own)


def _children(node: object) -> Sequence[tuple]:
    """The edges to a node's children that carry gradient to other nodes (not to leaves)."""
    return [(c, nr) for c, nr in node.next_functions if c is not None and not _is_leaf(c)]


def _is_leaf(node: object) -> bool:
    return getattr(node, "variable", None) is not None


def _own_part(start: object, indegree: dict, blocked: Callable[[object], bool]) -> dict:
    """The nodes reached from ``start`` whose every parent is ``start`` or in the part (a node
    enters once its last parent has), none of them blocked; empty where ``start`` itself has
    another parent (the same loss given for two tasks) or is blocked. A dict used as a set that
    keeps the order of discovery (the same on every run and every rank)."""
    if indegree.get(start, 0) != 1 or blocked(start):
        return {}
    part = {start: None}
    seen_from_part: dict = {}
    stack = [start]
    while stack:
        node = stack.pop()
        for child, _ in _children(node):
            seen_from_part[child] = seen_from_part.get(child, 0) + 1
            if seen_from_part[child] == indegree.get(child, -1) and not blocked(child):
                part[child] = None
                stack.append(child)
    return part


def _ends(part: dict) -> list[tuple]:
    """The edges from a part to nodes outside it."""
    return [(c, nr) for node in part for c, nr in _children(node) if c not in part]


def _is_cut(nodes: set) -> bool:
    """Whether no node of ``nodes`` lies below another (a walk down from their children)."""
    if len(nodes) < 2:
        return True
    stack = [c for node in nodes for c, _ in _children(node)]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in nodes:
            return False
        if node in seen:
            continue
        seen.add(node)
        stack.extend(c for c, _ in _children(node))
    return True
