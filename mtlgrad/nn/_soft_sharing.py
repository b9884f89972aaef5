"""Soft parameter sharing: one network per task, coupled by a penalty."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_task_names, task_inputs
from mtlgrad.regularizers import l2_coupling, trace_norm

__all__ = ["SoftSharing"]

PENALTIES = ("l2", "trace")


class SoftSharing(MultiTaskModule):
    """Soft parameter sharing: each task has its own network (one architecture), and a penalty
    pulls corresponding parameters of the networks together.

    - ``penalty="l2"``: ``strength * Σ_params Σ_{s<t} ||θ_s - θ_t||_F²`` (Duong et al., ACL 2015,
      `Low resource dependency parsing: cross-lingual parameter sharing in a neural network parser
      <https://aclanthology.org/P15-2139/>`_; their two-task term, over all pairs for T > 2, see
      :func:`mtlgrad.regularizers.l2_coupling`).
    - ``penalty="trace"``: ``strength * Σ_params ||[vec θ_1, ..., vec θ_T]||_*`` (Yang &
      Hospedales, `Trace norm regularised deep multi-task learning
      <https://arxiv.org/abs/1606.04038>`_, ICLR 2017 workshop; last-axis flattening, see
      :func:`mtlgrad.regularizers.trace_norm`).

    ``model(x)`` returns ``{task: network(x)}`` (``x`` may also be a dict with one batch per
    task); add :meth:`coupling_penalty` to the loss. No parameter is shared: every parameter
    belongs to one task, so ``shared_parameters()`` is empty and there is nothing to aggregate.
    With :func:`mtlgrad.backward` (or ``MTLOptimizer(..., shared_params=[])``) each task's
    network gets its own task's gradient, and the penalty's gradient is added by a plain
    backward (``.grad`` accumulates)::

        model.coupling_penalty().backward()
        mtlgrad.backward(losses, shared_params=model.shared_parameters(), aggregator=UPGrad())

    Args:
        networks: one module per task, keyed by task name, all with the same parameter names
            and shapes.
        penalty: ``"l2"`` or ``"trace"``.
        strength: the multiplier λ >= 0 of the penalty.
    """

    def __init__(
        self, networks: Mapping[str, nn.Module], penalty: str = "l2", strength: float = 1e-2
    ) -> None:
        if not isinstance(networks, Mapping):
            raise TypeError(
                f"SoftSharing: networks must be a dict {{task name: module}}, got "
                f"{type(networks).__name__}"
            )
        super().__init__(check_task_names(networks.keys(), "SoftSharing"))
        if penalty not in PENALTIES:
            raise ValueError(f"SoftSharing: penalty must be one of {PENALTIES}, got {penalty!r}")
        strength = float(strength)
        if not strength >= 0:
            raise ValueError(f"SoftSharing: strength must be >= 0, got {strength}")
        for name, net in networks.items():
            if not isinstance(net, nn.Module):
                raise TypeError(
                    f"SoftSharing: the network of task {name!r} must be an nn.Module, got "
                    f"{type(net).__name__}"
                )
        self.networks = nn.ModuleDict(dict(networks))
        self.penalty = penalty
        self.strength = strength
        first = self.task_names[0]
        reference = {k: p.shape for k, p in self.networks[first].named_parameters()}
        for name in self.task_names:
            own = dict(self.networks[name].named_parameters())
            if set(own) != set(reference) or any(own[k].shape != reference[k] for k in own):
                described = {k: list(p.shape) for k, p in own.items()}
                raise ValueError(
                    f"SoftSharing: the network of task {name!r} has parameters {described}, but "
                    f"task {first!r} has { ({k: list(s) for k, s in reference.items()}) }; the "
                    "networks must have one architecture"
                )
        self._parameter_names = list(reference)
        self.check_partition()

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = task_inputs(x, self.task_names, "SoftSharing")
        return {name: self.networks[name](inputs[name]) for name in self.task_names}

    def coupling_penalty(self) -> Tensor:
        """``strength`` times the coupling of every parameter across the task networks (a
        differentiable scalar to add to the loss)."""
        coupling = l2_coupling if self.penalty == "l2" else trace_norm
        per_task = [dict(self.networks[name].named_parameters()) for name in self.task_names]
        terms = [coupling([own[k] for own in per_task]) for k in self._parameter_names]
        if not terms:
            return torch.zeros(())
        return self.strength * torch.stack(terms).sum()

    def _shared_parameter_list(self) -> list[Parameter]:
        return []

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return list(self.networks[name].parameters())

    def extra_repr(self) -> str:
        return f"task_names={self.task_names}, penalty={self.penalty!r}, strength={self.strength}"
