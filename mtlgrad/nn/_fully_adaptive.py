"""Fully-adaptive feature sharing: a thin network widened layer by layer, top-down, by
grouping the tasks whose outcomes agree."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names

__all__ = ["FullyAdaptiveNetwork"]


class FullyAdaptiveNetwork(MultiTaskModule):
    """Fully-adaptive feature sharing (Lu, Kumar, Zhai, Cheng, Javidi & Feris, `Fully-adaptive
    feature sharing in multi-task networks with applications in person attribute classification
    <https://arxiv.org/abs/1611.05377>`_, CVPR 2017).

    A tree of branches. It starts thin: every layer has one branch, shared by all tasks, and each
    task's head reads the last layer. :meth:`widen` splits one branch of a layer into copies, one
    per group of the tasks below it, and re-attaches the branches (or heads) of the layer above
    to their group's copy; every copy starts as the original (a deep copy), so the network
    computes the same function right after widening and the copies then train apart. The paper
    widens top-down: the last layer first, then the one below, and so on, each round after some
    training.

    The paper groups the tasks by their affinity: with ``e_i(n) = 1`` when sample n is easy for
    task i, ``A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0)`` (:meth:`task_affinity`), the
    tasks that are easy and hard on the same samples being the ones that share well. The paper
    chooses the grouping (and the number of groups) with a loss that trades the number of new
    branches against the affinity within them; :meth:`propose_groups` is a simpler choice, a
    greedy average-linkage merge to a given number of groups; :meth:`widen` takes any grouping.

    Widening creates parameters: build the optimizer (and :class:`~mtlgrad.optim.MTLOptimizer`,
    whose partition is taken when it is built) again after it. The tree is in ``state_dict`` (an
    extra state); loading checks it against the model's and names the difference (replay the
    same :meth:`widen` calls on a fresh model before loading).

    Partition: the branches below two tasks or more are shared; a branch below a single task and
    that task's head are its own. After widening, a shared branch may serve some of the tasks
    only; the others' gradients there are zero (their rows of J vanish on it).

    Args:
        layers: the thin network's layers, applied in order; each becomes one branch.
        heads: one module per task, keyed by task name (the task order).
    """

    def __init__(self, layers: Sequence[nn.Module], heads: Mapping[str, nn.Module]) -> None:
        owner = "FullyAdaptiveNetwork"
        if not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: heads must be a dict {{task name: module}}")
        super().__init__(check_task_names(heads.keys(), owner))
        check_same_tasks(heads.keys(), self.task_names, "heads", owner)
        layers = list(layers)
        if not layers:
            raise ValueError(f"{owner}: layers must list at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"{owner}: layers[{i}] must be an nn.Module")
        self.branches = nn.ModuleList(nn.ModuleList([layer]) for layer in layers)
        # parents[l][b]: the branch of layer l - 1 that branch b of layer l reads (layer 0: x).
        self.parents: list[list[int]] = [[0] for _ in layers]
        # The branch of the last layer each task's head reads.
        self.head_branch: dict[str, int] = {name: 0 for name in self.task_names}
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        self.check_partition()

    @property
    def num_layers(self) -> int:
        return len(self.branches)

    def tasks_of(self, layer: int, branch: int) -> list[str]:
        """The tasks whose outputs depend on branch ``branch`` of ``layer`` (in task order)."""
        self._check_layer(layer)
        if not 0 <= branch < len(self.branches[layer]):
            raise IndexError(
                f"FullyAdaptiveNetwork: layer {layer} has {len(self.branches[layer])} "
                f"branches, got branch {branch}"
            )
        current = {branch}
        for above in range(layer + 1, self.num_layers):
            current = {b for b, p in enumerate(self.parents[above]) if p in current}
        return [name for name in self.task_names if self.head_branch[name] in current]

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"FullyAdaptiveNetwork: layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"FullyAdaptiveNetwork: layer must be in [0, {self.num_layers}), got {layer}"
            )

    def _children(self, layer: int, branch: int) -> list[tuple[str, Any]]:
        """What reads the branch: ("branch", index in layer + 1) or ("head", task name)."""
        if layer == self.num_layers - 1:
            return [("head", n) for n in self.task_names if self.head_branch[n] == branch]
        return [("branch", b) for b, p in enumerate(self.parents[layer + 1]) if p == branch]

    def _child_tasks(self, layer: int, child: tuple[str, Any]) -> list[str]:
        kind, key = child
        return [key] if kind == "head" else self.tasks_of(layer + 1, key)

    def widen(self, layer: int, groups: Sequence[Sequence[str]]) -> None:
        """Splits the branch of ``layer`` above the tasks of ``groups`` into one copy per group.

        ``groups`` partitions the tasks below one branch of the layer, each group a union of
        what reads that branch (a branch of the layer above cannot be split by this layer's
        widening: widen it first, top-down as in the paper). The first group keeps the original
        branch; the others get deep copies, appended to the layer.
        """
        owner = "FullyAdaptiveNetwork.widen"
        self._check_layer(layer)
        groups = [list(g) for g in groups]
        if len(groups) < 2 or any(not g for g in groups):
            raise ValueError(f"{owner}: groups must be two or more non-empty lists of task names")
        flat = [name for g in groups for name in g]
        for name in flat:
            self.check_task(name)
        if len(set(flat)) != len(flat):
            raise ValueError(f"{owner}: a task appears in two groups: {groups}")
        owners = {
            b for b in range(len(self.branches[layer])) if set(self.tasks_of(layer, b)) & set(flat)
        }
        if len(owners) != 1:
            raise ValueError(
                f"{owner}: the tasks {flat} lie below {len(owners)} branches of layer {layer}; "
                "groups must partition the tasks of one branch"
            )
        (branch,) = owners
        below = self.tasks_of(layer, branch)
        if sorted(below) != sorted(flat):
            raise ValueError(
                f"{owner}: branch {branch} of layer {layer} is below the tasks {below}; the "
                f"groups hold {flat}, and must hold each of them once"
            )
        group_of = {name: k for k, g in enumerate(groups) for name in g}
        assignment = []
        for child in self._children(layer, branch):
            tasks = self._child_tasks(layer, child)
            ks = {group_of[name] for name in tasks}
            if len(ks) != 1:
                raise ValueError(
                    f"{owner}: the tasks {tasks} share a branch of layer {layer + 1}, but the "
                    f"groups split them; widen layer {layer + 1} first (top-down)"
                )
            assignment.append((child, ks.pop()))
        original = self.branches[layer][branch]
        new_index = {0: branch}
        for k in range(1, len(groups)):
            self.branches[layer].append(copy.deepcopy(original))
            self.parents[layer].append(self.parents[layer][branch])
            new_index[k] = len(self.branches[layer]) - 1
        for (kind, key), k in assignment:
            if kind == "head":
                self.head_branch[key] = new_index[k]
            else:
                self.parents[layer + 1][key] = new_index[k]
        self.check_partition()

    @staticmethod
    def task_affinity(easy: Tensor) -> Tensor:
        """``A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0)`` from ``easy``, an
        ``(N, T)`` tensor of 0/1 (sample n easy for task i), the probabilities the frequencies
        over the N samples. Symmetric, 1 on the diagonal, in [0, 1]."""
        if easy.dim() != 2 or easy.shape[0] == 0:
            raise ValueError(
                f"FullyAdaptiveNetwork.task_affinity: easy must be (samples, tasks), got "
                f"{list(easy.shape)}"
            )
        e = easy.to(torch.float64)
        if not torch.all((e == 0) | (e == 1)):
            raise ValueError("FullyAdaptiveNetwork.task_affinity: easy must hold 0s and 1s")
        n = e.shape[0]
        return (e.T @ e + (1 - e).T @ (1 - e)) / n

    def propose_groups(self, layer: int, branch: int, affinity: Tensor, num_groups: int):
        """A grouping of what reads branch ``branch`` of ``layer`` into ``num_groups`` groups,
        as lists of task names (ready for :meth:`widen`): starting from one group per reader,
        the two groups of largest average task affinity (``affinity``: T x T, tasks in
        ``task_names`` order) merge until ``num_groups`` remain."""
        owner = "FullyAdaptiveNetwork.propose_groups"
        T = len(self.task_names)
        if affinity.shape != (T, T):
            raise ValueError(f"{owner}: affinity must be {T} x {T}, got {list(affinity.shape)}")
        groups = [self._child_tasks(layer, c) for c in self._children(layer, branch)]
        if not 1 <= num_groups <= len(groups):
            raise ValueError(
                f"{owner}: num_groups must be between 1 and the {len(groups)} readers of "
                f"branch {branch} of layer {layer}, got {num_groups}"
            )
        index = {name: i for i, name in enumerate(self.task_names)}

        def linkage(a: list[str], b: list[str]) -> float:
            return float(affinity[[index[n] for n in a]][:, [index[n] for n in b]].mean())

        while len(groups) > num_groups:
            pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))]
            i, j = max(pairs, key=lambda p: linkage(groups[p[0]], groups[p[1]]))
            groups[i] = groups[i] + groups.pop(j)
        order = {name: i for i, name in enumerate(self.task_names)}
        return [sorted(g, key=order.__getitem__) for g in groups]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = [branch(x) for branch in self.branches[0]]
        for layer in range(1, self.num_layers):
            outputs = [
                branch(outputs[p])
                for branch, p in zip(self.branches[layer], self.parents[layer], strict=True)
            ]
        return {name: self.heads[name](outputs[self.head_branch[name]]) for name in self.task_names}

    def get_extra_state(self) -> dict[str, Any]:
        return {"parents": [list(p) for p in self.parents], "head_branch": dict(self.head_branch)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(
                "FullyAdaptiveNetwork: the state_dict's tree "
                f"{state} differs from this model's {mine}; replay the same widen() calls on "
                "this model before loading"
            )

    def extra_repr(self) -> str:
        widths = [len(layer) for layer in self.branches]
        return f"task_names={self.task_names}, branches per layer={widths}"

    def _branch_params(self, single: bool, name: str | None = None) -> list[Parameter]:
        params = []
        for layer in range(self.num_layers):
            for b, branch in enumerate(self.branches[layer]):
                tasks = self.tasks_of(layer, b)
                if (len(tasks) > 1 and not single) or (single and tasks == [name]):
                    params += branch.parameters()
        return params

    def _shared_parameter_list(self) -> list[Parameter]:
        return self._branch_params(single=False)

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [*self._branch_params(single=True, name=name), *self.heads[name].parameters()]
