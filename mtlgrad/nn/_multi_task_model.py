"""Hard parameter sharing: one trunk, one head per task."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_task_names

__all__ = ["MultiTaskModel"]


class MultiTaskModel(MultiTaskModule):
    """Hard parameter sharing (Caruana, `Multitask learning: a knowledge-based source of
    inductive bias <https://doi.org/10.1016/B978-1-55860-307-3.50012-5>`_, ICML 1993; Multitask
    Learning, Machine Learning 1997): a shared trunk computes one representation ``z = trunk(x)``
    and each task's head maps it to that task's output.

    ``model(x)`` returns ``{task: head(z)}``; ``model(x, return_features=True)`` also returns
    ``z``, for the cheap ``features`` engine of :func:`mtlgrad.backward` (task gradients taken
    with respect to ``z``, one backward through the trunk)::

        outputs, z = model(x, return_features=True)
        losses = {name: loss_fn[name](outputs[name], y[name]) for name in model.task_names}
        mtlgrad.backward(losses, features=z, shared_params=model.shared_parameters(),
                         aggregator=UPGrad())

    Args:
        trunk: the shared network.
        heads: one module per task, keyed by task name (the order of the keys is the task order).
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        if not isinstance(trunk, nn.Module):
            raise TypeError(
                f"MultiTaskModel: trunk must be an nn.Module, got {type(trunk).__name__}"
            )
        if not isinstance(heads, Mapping):
            raise TypeError(
                f"MultiTaskModel: heads must be a dict {{task name: module}}, got "
                f"{type(heads).__name__}"
            )
        super().__init__(check_task_names(heads.keys(), "MultiTaskModel"))
        for name, head in heads.items():
            if not isinstance(head, nn.Module):
                raise TypeError(
                    f"MultiTaskModel: the head of task {name!r} must be an nn.Module, got "
                    f"{type(head).__name__}"
                )
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.check_partition()

    def forward(
        self, x: Tensor, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
        z = self.trunk(x)
        outputs = {name: self.heads[name](z) for name in self.task_names}
        return (outputs, z) if return_features else outputs

    def _shared_parameter_list(self) -> list[Parameter]:
        return list(self.trunk.parameters())

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return list(self.heads[name].parameters())
