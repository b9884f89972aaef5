"""MMoE: shared experts, one softmax gate and one tower per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names

__all__ = ["MMoE"]


class MMoE(MultiTaskModule):
    """Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi, `Modeling task
    relationships in multi-task learning with multi-gate mixture-of-experts
    <https://doi.org/10.1145/3219819.3220007>`_, KDD 2018).

    n shared experts ``f_i``; task k has a gate and a tower (Eq. 5-6)::

        y_k = h^k(f^k(x)),   f^k(x) = Σ_i g^k(x)_i f_i(x),   g^k(x) = softmax(W_gk x)

    with ``W_gk`` an ``n x d`` matrix (a linear map without bias, as in the paper) on the input's
    last dimension ``d = in_features``.

    Partition: the experts are shared; task k's gate and tower are its own.

    Args:
        experts: the n expert networks; each maps x to an output of one shape.
        towers: one module per task, keyed by task name.
        in_features: d, the size of the input's last dimension (the gates' input).
    """

    def __init__(
        self, experts: Sequence[nn.Module], towers: Mapping[str, nn.Module], in_features: int
    ) -> None:
        owner = "MMoE"
        if not isinstance(towers, Mapping):
            raise TypeError(f"{owner}: towers must be a dict {{task name: module}}")
        super().__init__(check_task_names(towers.keys(), owner))
        check_same_tasks(towers.keys(), self.task_names, "towers", owner)
        experts = list(experts)
        if not experts:
            raise ValueError(f"{owner}: no experts")
        for i, expert in enumerate(experts):
            if not isinstance(expert, nn.Module):
                raise TypeError(f"{owner}: experts[{i}] must be an nn.Module")
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{owner}: in_features must be a positive int, got {in_features!r}")
        self.experts = nn.ModuleList(experts)
        self.gates = nn.ModuleDict(
            {name: nn.Linear(in_features, len(experts), bias=False) for name in self.task_names}
        )
        self.towers = nn.ModuleDict({name: towers[name] for name in self.task_names})
        self.in_features = in_features
        self.check_partition()

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: g^k(x)}``, each of shape ``(..., n)`` summing to 1 over the experts."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MMoE: the input's last dimension is {x.shape[-1]}, but the gates take "
                f"in_features={self.in_features}"
            )
        return {name: torch.softmax(self.gates[name](x), dim=-1) for name in self.task_names}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        gates = self.gate_weights(x)
        outputs = [expert(x) for expert in self.experts]
        shapes = [list(o.shape) for o in outputs]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"MMoE: the experts give outputs of different shapes {shapes}")
        stacked = torch.stack(outputs, dim=-1)  # (..., expert output, n)
        if stacked.shape[: x.dim() - 1] != x.shape[:-1]:
            raise ValueError(
                f"MMoE: the expert outputs {shapes[0]} must keep the input's leading dimensions "
                f"{list(x.shape[:-1])} (the gates weigh each sample's experts)"
            )
        extra = stacked.dim() - x.dim()  # the expert output's own dimensions
        result = {}
        for name in self.task_names:
            g = gates[name].reshape(*x.shape[:-1], *([1] * extra), -1).to(stacked.dtype)
            result[name] = self.towers[name]((stacked * g).sum(dim=-1))
        return result

    def _shared_parameter_list(self) -> list[Parameter]:
        return list(self.experts.parameters())

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [*self.gates[name].parameters(), *self.towers[name].parameters()]
