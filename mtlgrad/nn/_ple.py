"""PLE: stacked CGC extraction levels with a shared gate at the inner levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names
from mtlgrad.nn._experts import (
    check_gate_input,
    check_in_features,
    check_modules,
    mix_experts,
    stack_experts,
)

__all__ = ["PLE"]


class PLE(MultiTaskModule):
    """Progressive Layered Extraction (Tang, Liu, Zhao & Gong, `Progressive Layered Extraction
    (PLE): a novel multi-task learning (MTL) model for personalized recommendations
    <https://doi.org/10.1145/3383313.3412236>`_, RecSys 2020).

    N extraction levels. Level j has shared experts ``E_s^j`` and, for each task k, experts
    ``E_k^j`` of its own. Task k's experts and gate read task k's output of the previous level,
    the shared experts and the shared gate read the shared output (all read x at level 1); task k's
    gate mixes its own and the shared experts, the shared gate mixes every expert of the level::

        g^k,j = softmax(W^k,j g^k,j-1) [E_k^j(g^k,j-1), E_s^j(g^s,j-1)]
        g^s,j = softmax(W^s,j g^s,j-1) [E_1^j(g^1,j-1), ..., E_T^j(g^T,j-1), E_s^j(g^s,j-1)]
        g^k,0 = g^s,0 = x,   y_k = t^k(g^k,N)

    The last level has no shared gate (nothing reads it), as in the paper and LibMTL's ``PLE``;
    with N = 1, PLE is :class:`~mtlgrad.nn.CGC`. The gates are linear maps without bias (the
    paper's ``W``) on the last dimension of their input, of size ``in_features[j]``; their columns
    list the task experts in task order, then the shared experts.

    Partition: more is shared than the names suggest. At an inner level (j < N) task k's experts
    feed the shared gate, so every task depends on them: they are shared parameters, and so is
    task k's gate at a level j when task k has experts at an inner level after j (the gate's
    output feeds them). With experts of its own at every level, task k's own parameters are its
    experts at level N, its gates at levels N - 1 and N, and its tower; everything else (the
    shared experts and gates, the inner task experts and the early task gates) is shared.

    Args:
        shared_experts: ``shared_experts[j]``, the shared experts of level j (at least one per
            level); the number of levels N is its length.
        task_experts: ``{task: [its experts at level 1, ..., at level N]}`` (N lists, each may be
            empty as long as the task's gate has two experts to mix, its own and the shared).
        towers: one module per task, keyed by task name (the task order).
        in_features: the size of the last dimension of each level's input (N ints: x's at level
            1, the previous level's expert outputs' after that).
    """

    def __init__(
        self,
        shared_experts: Sequence[Sequence[nn.Module]],
        task_experts: Mapping[str, Sequence[Sequence[nn.Module]]],
        towers: Mapping[str, nn.Module],
        in_features: Sequence[int],
    ) -> None:
        owner = "PLE"
        if not isinstance(towers, Mapping):
            raise TypeError(f"{owner}: towers must be a dict {{task name: module}}")
        if not isinstance(task_experts, Mapping):
            raise TypeError(
                f"{owner}: task_experts must be a dict {{task name: one list of modules per level}}"
            )
        super().__init__(check_task_names(towers.keys(), owner))
        check_same_tasks(task_experts.keys(), self.task_names, "task_experts", owner)
        levels = list(shared_experts)
        if not levels:
            raise ValueError(f"{owner}: shared_experts must list at least one level")
        num_levels = len(levels)
        shared = [check_modules(e, f"shared_experts[{j}]", owner) for j, e in enumerate(levels)]
        own: dict[str, list[list[nn.Module]]] = {}
        for name in self.task_names:
            per_level = list(task_experts[name])
            if len(per_level) != num_levels:
                raise ValueError(
                    f"{owner}: task_experts[{name!r}] has {len(per_level)} levels, but "
                    f"shared_experts has {num_levels}"
                )
            own[name] = [
                check_modules(e, f"task_experts[{name!r}][{j}]", owner, minimum=0)
                for j, e in enumerate(per_level)
            ]
        sizes = list(in_features) if isinstance(in_features, Sequence) else None
        if sizes is None or len(sizes) != num_levels:
            raise ValueError(
                f"{owner}: in_features must list one int per level ({num_levels}), "
                f"got {in_features!r}"
            )
        self.in_features = [
            check_in_features(s, f"in_features[{j}]", owner) for j, s in enumerate(sizes)
        ]
        for j in range(num_levels):
            for name in self.task_names:
                if len(own[name][j]) + len(shared[j]) < 2:
                    raise ValueError(
                        f"{owner}: task {name!r}'s gate at level {j} has a single expert to mix "
                        f"({len(own[name][j])} own + {len(shared[j])} shared); a gate needs at "
                        "least 2 (with one, it and the gates before it get no gradient)"
                    )
        self.num_levels = num_levels
        self.shared_experts = nn.ModuleList(nn.ModuleList(e) for e in shared)
        self.task_experts = nn.ModuleDict(
            {name: nn.ModuleList(nn.ModuleList(e) for e in own[name]) for name in self.task_names}
        )
        self.task_gates = nn.ModuleDict(
            {
                name: nn.ModuleList(
                    nn.Linear(self.in_features[j], len(own[name][j]) + len(shared[j]), bias=False)
                    for j in range(num_levels)
                )
                for name in self.task_names
            }
        )
        self.shared_gates = nn.ModuleList(
            nn.Linear(
                self.in_features[j],
                sum(len(own[name][j]) for name in self.task_names) + len(shared[j]),
                bias=False,
            )
            for j in range(num_levels - 1)
        )
        self.towers = nn.ModuleDict({name: towers[name] for name in self.task_names})
        self.check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        task_inputs = {name: x for name in self.task_names}
        shared_input = x
        for j in range(self.num_levels):
            for name in self.task_names:
                check_gate_input(
                    task_inputs[name], self.in_features[j], "PLE", f"level {j}'s gates"
                )
            check_gate_input(shared_input, self.in_features[j], "PLE", f"level {j}'s gates")
            shared = [expert(shared_input) for expert in self.shared_experts[j]]
            own = {
                name: [expert(task_inputs[name]) for expert in self.task_experts[name][j]]
                for name in self.task_names
            }
            outputs = {}
            for name in self.task_names:
                h = task_inputs[name]
                stacked = stack_experts(
                    own[name] + shared, h, "PLE", f"level {j}'s experts of task {name!r}"
                )
                weights = torch.softmax(self.task_gates[name][j](h), dim=-1)
                outputs[name] = mix_experts(stacked, weights, h)
            if j < self.num_levels - 1:
                every = [o for name in self.task_names for o in own[name]] + shared
                stacked = stack_experts(every, shared_input, "PLE", f"level {j}'s experts")
                weights = torch.softmax(self.shared_gates[j](shared_input), dim=-1)
                shared_input = mix_experts(stacked, weights, shared_input)
            task_inputs = outputs
        return {name: self.towers[name](task_inputs[name]) for name in self.task_names}

    def _gate_is_shared(self, name: str, level: int) -> bool:
        """Whether task ``name``'s gate at ``level`` reaches the other tasks: its output feeds
        the task's experts and gate of the next level, so it does when the task has experts of
        its own at a later inner level (they feed that level's shared gate)."""
        experts = self.task_experts[name]
        return any(len(experts[j]) > 0 for j in range(level + 1, self.num_levels - 1))

    def _task_modules(self, name: str) -> list[nn.Module]:
        last = self.num_levels - 1
        gates = [
            g for j, g in enumerate(self.task_gates[name]) if not self._gate_is_shared(name, j)
        ]
        return [self.task_experts[name][last], *gates, self.towers[name]]

    def _shared_parameter_list(self) -> list[Parameter]:
        params = [*self.shared_experts.parameters(), *self.shared_gates.parameters()]
        for name in self.task_names:
            for j in range(self.num_levels - 1):  # inner levels' task experts feed the shared gate
                params += self.task_experts[name][j].parameters()
            for j, gate in enumerate(self.task_gates[name]):
                if self._gate_is_shared(name, j):
                    params += gate.parameters()
        return params

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [p for module in self._task_modules(name) for p in module.parameters()]
