"""A drop-in optimizer wrapper that aggregates the task gradients before each step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from mtlgrad.aggregators import Aggregator
from mtlgrad.step import ENGINES, StepRecord, backward

__all__ = ["MTLOptimizer"]


class MTLOptimizer(torch.optim.Optimizer):
    """Wraps any ``torch.optim`` optimizer; ``backward(losses)`` aggregates the task gradients.

    It is itself a :class:`torch.optim.Optimizer` sharing the wrapped one's ``param_groups`` and
    ``state``, so LR schedulers, ``zero_grad``, ``add_param_group`` and checkpoints work as
    usual; ``state_dict()`` also carries the aggregator's state::

        optimizer = MTLOptimizer(torch.optim.AdamW(model.parameters()), UPGrad(),
                                 shared_params=model.trunk.parameters())
        for batch in loader:
            optimizer.zero_grad()
            losses = compute_losses(model, batch)        # one scalar per task
            record = optimizer.backward(losses)         # instead of sum(losses).backward()
            optimizer.step()

    Args:
        optimizer: the optimizer to wrap (SGD, Adam, AdamW, fused or foreach, ...).
        aggregator: how to combine the task gradients of the shared parameters.
        shared_params: the shared parameters. By default, every parameter of the optimizer that
            more than one task's loss depends on (found in the autograd graph at each step).
        engine: ``"loop"`` or ``"batched"`` (see :func:`mtlgrad.backward`).
        **backward_options: further keyword arguments of :func:`mtlgrad.backward`
            (``scaler``, ``scale_task_params``, ``batch_size``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        aggregator: Aggregator,
        shared_params: Iterable[Tensor] | None = None,
        engine: str = "loop",
        **backward_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"aggregator must be an mtlgrad Aggregator, got {type(aggregator).__name__}"
            )
        if engine not in ENGINES:
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINES))}; got {engine!r}"
            )
        # Deliberately not calling Optimizer.__init__: the groups and state are the wrapped
        # optimizer's own objects, shared, not copies.
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.shared_params = None if shared_params is None else list(shared_params)
        self.engine = engine
        self.backward_options = backward_options
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = optimizer._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = optimizer._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = optimizer._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = optimizer._optimizer_load_state_dict_post_hooks
        self.last_record: StepRecord | None = None

    # ---- the wrapped optimizer's surface ------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return self.optimizer.step(closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"optimizer", "aggregator"} - set(state_dict)
        if missing:
            raise ValueError(
                f"MTLOptimizer.load_state_dict: missing {sorted(missing)}; expected the dict "
                "returned by MTLOptimizer.state_dict()"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.aggregator.load_state_dict(state_dict["aggregator"])

    def __repr__(self) -> str:
        return f"MTLOptimizer({self.optimizer!r}, {self.aggregator!r}, engine={self.engine!r})"

    # ---- the multi-task step ------------------------------------------------------------------

    def backward(
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor],
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> StepRecord:
        """Computes and aggregates the task gradients into ``.grad`` (see
        :func:`mtlgrad.backward`); returns the step's record."""
        shared = self.shared_params
        if shared is None:
            shared = self._discover_shared(losses)
        self.last_record = backward(
            losses,
            shared_params=shared,
            aggregator=self.aggregator,
            features=features,
            engine=self.engine,
            **self.backward_options,
        )
        return self.last_record

    def _discover_shared(self, losses: Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
        from mtlgrad.step._differentiate import leaf_tensors

        values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
        counts: dict[int, int] = {}
        for v in values:
            if isinstance(v, Tensor) and v.grad_fn is not None:
                for leaf in leaf_tensors([v]):
                    counts[id(leaf)] = counts.get(id(leaf), 0) + 1
        shared = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if counts.get(id(p), 0) > 1 or len(values) == 1 and counts.get(id(p), 0) == 1
        ]
        if not shared:
            raise ValueError(
                "MTLOptimizer: no parameter of the optimizer is shared by two or more task "
                "losses; pass shared_params explicitly"
            )
        return shared
