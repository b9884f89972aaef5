"""CGC: shared experts, task-specific experts, one softmax gate and one tower per task."""

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

__all__ = ["CGC"]


class CGC(MultiTaskModule):
    """Customized Gate Control (Tang, Liu, Zhao & Gong, `Progressive Layered Extraction (PLE): a
    novel multi-task learning (MTL) model for personalized recommendations
    <https://doi.org/10.1145/3383313.3412236>`_, RecSys 2020), the one-level form of PLE.

    ``m_s`` shared experts ``E_s,i`` and, for each task k, ``m_k`` experts ``E_k,i`` of its own;
    task k's gate mixes its own experts and the shared ones::

        y_k = t^k(g^k(x)),   g^k(x) = w^k(x) S^k(x),   w^k(x) = softmax(W_g^k x),
        S^k(x) = [E_k,1(x), ..., E_k,m_k(x), E_s,1(x), ..., E_s,m_s(x)]

    ``W_g^k`` is an ``(m_k + m_s) x d`` matrix (a linear map without bias, as in the paper) on the
    input's last dimension ``d = in_features``; the gate's columns follow the paper's order, the
    task's own experts first (LibMTL's ``CGC`` puts the shared ones first and gives its gates a
    bias). With no task-specific experts CGC is :class:`~mtlgrad.nn.MMoE`.

    Partition: the shared experts are shared; task k's experts, gate and tower are its own.

    Args:
        shared_experts: the ``m_s >= 1`` shared experts.
        task_experts: ``{task: its m_k >= 0 experts}`` (``m_k + m_s >= 2``: a gate mixes two
            experts or more); every expert (shared or not) maps x to an
            output of one shape that keeps x's leading dimensions.
        towers: one module per task, keyed by task name (the task order).
        in_features: d, the size of the input's last dimension (the gates' input).
    """

    def __init__(
        self,
        shared_experts: Sequence[nn.Module],
        task_experts: Mapping[str, Sequence[nn.Module]],
        towers: Mapping[str, nn.Module],
        in_features: int,
    ) -> None:
        owner = "CGC"
        if not isinstance(towers, Mapping):
            raise TypeError(f"{owner}: towers must be a dict {{task name: module}}")
        if not isinstance(task_experts, Mapping):
            raise TypeError(f"{owner}: task_experts must be a dict {{task name: list of modules}}")
        super().__init__(check_task_names(towers.keys(), owner))
        check_same_tasks(task_experts.keys(), self.task_names, "task_experts", owner)
        shared = check_modules(shared_experts, "shared_experts", owner)
        own = {
            name: check_modules(task_experts[name], f"task_experts[{name!r}]", owner, minimum=0)
            for name in self.task_names
        }
        for name in self.task_names:
            if len(own[name]) + len(shared) < 2:
                raise ValueError(
                    f"{owner}: task {name!r}'s gate has a single expert to mix (0 own + 1 shared); "
                    "a gate needs at least 2 (with one, it gets no gradient)"
                )
        self.in_features = check_in_features(in_features, "in_features", owner)
        self.shared_experts = nn.ModuleList(shared)
        self.task_experts = nn.ModuleDict({name: nn.ModuleList(own[name]) for name in own})
        self.gates = nn.ModuleDict(
            {
                name: nn.Linear(in_features, len(own[name]) + len(shared), bias=False)
                for name in self.task_names
            }
        )
        self.towers = nn.ModuleDict({name: towers[name] for name in self.task_names})
        self.check_partition()

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: w^k(x)}``, each of shape ``(..., m_k + m_s)`` (the task's experts first)
        summing to 1."""
        check_gate_input(x, self.in_features, "CGC")
        return {name: torch.softmax(self.gates[name](x), dim=-1) for name in self.task_names}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        gates = self.gate_weights(x)
        shared = [expert(x) for expert in self.shared_experts]
        result = {}
        for name in self.task_names:
            outputs = [expert(x) for expert in self.task_experts[name]] + shared
            stacked = stack_experts(outputs, x, "CGC", f"task {name!r}'s and the shared experts")
            result[name] = self.towers[name](mix_experts(stacked, gates[name], x))
        return result

    def _shared_parameter_list(self) -> list[Parameter]:
        return list(self.shared_experts.parameters())

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [
            *self.task_experts[name].parameters(),
            *self.gates[name].parameters(),
            *self.towers[name].parameters(),
        ]
