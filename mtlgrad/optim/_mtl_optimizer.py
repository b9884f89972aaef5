"""A drop-in optimizer wrapper that aggregates the task gradients before each step."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from mtlgrad.aggregators import Aggregator, GramAggregator
from mtlgrad.step import ENGINES, GradientAccumulator, GramEngine, StepRecord, backward
from mtlgrad.step._checks import named_losses
from mtlgrad.step._differentiate import partition
from mtlgrad.step._distributed import MODES
from mtlgrad.step._fsdp import is_sharded_parameter
from mtlgrad.step._reach import check_features_reached, check_shared_below_features

__all__ = ["MTLOptimizer"]

#: The key, in ``param_groups[0]`` of the state dict, that carries mtlgrad's own state.
STATE_KEY = "mtlgrad"


class MTLOptimizer(torch.optim.Optimizer):
    """Wraps any ``torch.optim`` optimizer; ``backward(losses)`` aggregates the task gradients.

    It is itself a :class:`torch.optim.Optimizer` sharing the wrapped one's ``param_groups`` and
    ``state``, so LR schedulers, ``zero_grad``, ``add_param_group`` and checkpoints work as
    usual::

        optimizer = MTLOptimizer(torch.optim.AdamW(model.parameters()), UPGrad(),
                                 shared_params=model.trunk.parameters())
        for batch in loader:
            optimizer.zero_grad()
            losses = compute_losses(model, batch)        # one scalar per task
            record = optimizer.backward(losses)         # instead of sum(losses).backward()
            optimizer.step()

    With a :mod:`mtlgrad.nn` model, ``MTLOptimizer(opt, UPGrad(), model=model)`` takes the
    model's exact shared/task partition (no graph walk), and ``backward`` accepts the losses as
    a dict keyed by the model's task names. With ``backward(losses, features=z)`` the task
    gradients are taken at the shared representation ``z`` (see :func:`mtlgrad.backward`); with a
    trunk sharded by FSDP2 (``fully_shard``) this is the only option, and ``shared_params`` must
    be given.

    ``state_dict()`` is the wrapped optimizer's, in torch's own layout (``state``,
    ``param_groups``), with the aggregator's state carried in ``param_groups[0]["mtlgrad"]``
    (serialised, see :meth:`state_dict`):
    code that reads ``osd["state"]`` and ``torch.distributed.checkpoint`` keep working, and a
    resumed run continues bit-identically.

    Args:
        optimizer: the optimizer to wrap (SGD, Adam, AdamW, fused or foreach, ...).
        aggregator: how to combine the task gradients of the shared parameters.
        shared_params: the shared parameters. By default, every parameter of the optimizer that
            more than one task's loss depends on, found in the autograd graph at each step (one
            walk of the graph for all tasks).
        engine: ``"loop"``, ``"batched"`` (see :func:`mtlgrad.backward`), a
            :class:`~mtlgrad.GramEngine`, or ``"gram"`` with ``model=``: the optimizer then
            builds the GramEngine on the model (its hooks are in place from the first forward).
        model: a :class:`~mtlgrad.nn.MultiTaskModule` (or a DistributedDataParallel wrapping
            one): its ``shared_parameters()`` and ``task_parameters(name)`` are the partition
            (instead of ``shared_params``).
        scaler: a ``torch.amp.GradScaler`` (see :func:`mtlgrad.backward`).
        task_params: for each task, its own parameters (see :func:`mtlgrad.backward`).
        scale_task_params: multiply each head's gradient by its task's weight.
        batch_size: with ``engine="batched"``, at most this many tasks per vmapped backward.
        process_group: under ``torch.distributed``, the ranks holding replicas (default: the
            world group when it has more than one rank); each task's gradients are averaged over
            them before the aggregation (see :func:`mtlgrad.backward`).
        distributed: with several ranks, ``"replicated"`` or ``"sharded"`` (see
            :func:`mtlgrad.backward`). Sharded mode with a
            ``torch.distributed.optim.ZeroRedundancyOptimizer`` gives each rank the per-task
            gradients of the parameters it owns, and no all-gather: each rank writes its own
            parameters' update, and the optimizer's step broadcasts them.
        check_finite: raise for a NaN or Inf task gradient (default); ``False`` lets them
            propagate into ``.grad`` and removes the step's host-side check (see
            :func:`mtlgrad.backward`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        aggregator: Aggregator,
        shared_params: Iterable[Tensor] | None = None,
        engine: str | GramEngine = "loop",
        *,
        model: torch.nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        task_params: Sequence[Iterable[Tensor]] | None = None,
        scale_task_params: bool = False,
        batch_size: int | None = None,
        process_group: Any = None,
        distributed: str = "replicated",
        check_finite: bool = True,
    ) -> None:
        from mtlgrad.nn import MultiTaskModule

        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"aggregator must be an mtlgrad Aggregator, got {type(aggregator).__name__}"
            )
        if engine == "gram":
            if model is None:
                raise ValueError(
                    "MTLOptimizer: engine='gram' needs model= (the modules to hook before the "
                    "first forward), or pass engine=mtlgrad.GramEngine(your_modules)"
                )
            engine = GramEngine(model)
        elif not isinstance(engine, GramEngine) and engine not in ENGINES:
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINES))}, 'gram' or a GramEngine; "
                f"got {engine!r}"
            )
        if isinstance(engine, GramEngine) and not isinstance(aggregator, GramAggregator):
            raise TypeError(
                f"the gram engine computes the Gram matrix only, and {type(aggregator).__name__} "
                "is not Gram-based: use engine='loop' or engine='batched'"
            )
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the partition is the wrapped model's
        if model is not None:
            if not isinstance(model, MultiTaskModule):
                raise TypeError(
                    "model must be an mtlgrad.nn.MultiTaskModule (it provides the exact "
                    f"shared/task partition), got {type(model).__name__}; pass shared_params "
                    "for other models"
                )
            if shared_params is not None or task_params is not None:
                raise ValueError(
                    "MTLOptimizer: pass either model= or shared_params/task_params, not both"
                )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        if not isinstance(scale_task_params, bool):
            raise TypeError(f"scale_task_params must be a bool, got {scale_task_params!r}")
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        # Deliberately not calling Optimizer.__init__: the groups and state are the wrapped
        # optimizer's own objects, shared, not copies.
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.model = model
        self.shared_params = None if shared_params is None else list(shared_params)
        self.task_params = None if task_params is None else [list(p) for p in task_params]
        self.engine = engine
        self.scaler = scaler
        self.scale_task_params = scale_task_params
        self.batch_size = batch_size
        self.process_group = process_group
        if distributed not in MODES:
            raise ValueError(
                f"distributed must be one of {', '.join(map(repr, MODES))}, got {distributed!r}"
            )
        self.distributed = distributed
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = optimizer._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = optimizer._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = optimizer._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = optimizer._optimizer_load_state_dict_post_hooks
        self.last_record: StepRecord | None = None
        self.accumulator = GradientAccumulator()

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
        """Zeroes ``.grad`` and drops the per-task gradients accumulated with
        ``backward(..., aggregate=False)``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.accumulator.clear()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if len(self.accumulator):
            raise RuntimeError(
                f"MTLOptimizer.step: {len(self.accumulator)} micro-batch(es) were accumulated "
                "with backward(losses, aggregate=False) but never aggregated, so .grad does not "
                "hold them; call backward(losses) (aggregate=True) for the last micro-batch "
                "before step()"
            )
        return self.optimizer.step(closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (``state``, ``param_groups``), with mtlgrad's state
        (the aggregator's, and the task order it follows) serialised in
        ``param_groups[0]["mtlgrad"]``.

        That entry is bytes, not a dict of tensors: an aggregator's state appears with its first
        step (GradVac's T x T targets), and ``torch.distributed.checkpoint`` loads into the
        structure of a freshly built optimizer, which a bytes entry always matches.
        """
        state = self.optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(
            {
                "aggregator": self.aggregator.state_dict(),
                "task_names": getattr(self.aggregator, "_task_order", None),
            },
            buffer,
        )
        state["param_groups"][0][STATE_KEY] = buffer.getvalue()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a dict returned by :meth:`state_dict` (or by an earlier release of
        mtlgrad, ``{"optimizer": ..., "aggregator": ...}``)."""
        if {"optimizer", "aggregator"} <= set(state_dict):
            self.optimizer.load_state_dict(state_dict["optimizer"])
            self.aggregator.load_state_dict(state_dict["aggregator"])
            return
        groups = state_dict.get("param_groups")
        extra = groups[0].get(STATE_KEY) if isinstance(groups, list) and groups else None
        if isinstance(extra, (bytes, bytearray)):
            extra = torch.load(io.BytesIO(extra), weights_only=True)
        if not isinstance(extra, dict) or "aggregator" not in extra:
            raise ValueError(
                "MTLOptimizer.load_state_dict: missing the aggregator's state "
                f"(param_groups[0][{STATE_KEY!r}]); expected the dict returned by "
                "MTLOptimizer.state_dict(), not a plain optimizer's"
            )
        groups = [dict(group) for group in groups]
        groups[0].pop(STATE_KEY)
        self.optimizer.load_state_dict({**state_dict, "param_groups": groups})
        self.aggregator.load_state_dict(extra["aggregator"])
        if extra.get("task_names") is not None:
            self.aggregator._task_order = list(extra["task_names"])

    def __repr__(self) -> str:
        return f"MTLOptimizer({self.optimizer!r}, {self.aggregator!r}, engine={self.engine!r})"

    # ---- the multi-task step ------------------------------------------------------------------

    def _owned_params(self) -> list[Tensor] | None:
        """In sharded mode, the parameters a ``ZeroRedundancyOptimizer`` updates on this rank
        (its local optimizer's)."""
        if self.distributed != "sharded" or not torch.distributed.is_available():
            return None
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if not isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return None
        return [p for group in self.optimizer.optim.param_groups for p in group["params"]]

    def backward(
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        aggregate: bool = True,
    ) -> StepRecord | None:
        """Computes and aggregates the task gradients into ``.grad`` (see
        :func:`mtlgrad.backward`); returns the step's record.

        Gradient accumulation: ``backward(losses, aggregate=False)`` for every micro-batch but
        the last only adds each task's gradients to :attr:`accumulator` (``.grad`` untouched,
        returns None); ``backward(losses)`` for the last adds its own and aggregates the sums,
        once, as one step on the whole batch would. Divide each micro-batch's losses by the
        number of micro-batches for the mean, as in single-task accumulation.
        """
        shared, task_params = self.shared_params, self.task_params
        if self.model is not None:
            shared, task_params = self._model_partition(losses)
        elif shared is None:
            parts = self._partition(losses, features)
            shared, task_params = parts.shared, parts.heads
        record = backward(
            losses,
            shared_params=shared,
            aggregator=self.aggregator,
            features=features,
            engine=self.engine,
            scaler=self.scaler,
            task_params=task_params,
            scale_task_params=self.scale_task_params,
            batch_size=self.batch_size,
            process_group=self.process_group,
            distributed=self.distributed,
            owned_params=self._owned_params(),
            accumulator=self.accumulator if (len(self.accumulator) or not aggregate) else None,
            aggregate=aggregate,
            check_finite=self.check_finite,
        )
        if record is not None:
            self.last_record = record
        return record

    def _model_partition(
        self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        from mtlgrad.nn._base import check_same_tasks

        model = self.model
        assert model is not None
        if isinstance(losses, Mapping):
            check_same_tasks(losses.keys(), model.task_names, "the losses", "MTLOptimizer")
            names = [str(k) for k in losses]
        else:
            count = len(losses)
            if count != len(model.task_names):
                raise ValueError(
                    f"MTLOptimizer: got {count} losses for the model's "
                    f"{len(model.task_names)} tasks {model.task_names}; pass a dict keyed by "
                    "the task names, or one loss per task in that order"
                )
            names = list(model.task_names)
        return list(model.shared_parameters()), [list(model.task_parameters(n)) for n in names]

    def _partition(
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
        features: Tensor | Sequence[Tensor] | None,
    ) -> Any:
        names, values = named_losses(losses)
        feature_list = [features] if isinstance(features, Tensor) else list(features or ())
        candidates = [p for group in self.optimizer.param_groups for p in group["params"]]
        parts = partition(values, shared=None, candidates=candidates, features=feature_list)
        if feature_list:
            check_features_reached(feature_list, parts=parts)
            check_shared_below_features(parts, names)
        if not parts.shared and any(is_sharded_parameter(p) for p in candidates):
            raise ValueError(
                "MTLOptimizer: the optimizer's parameters are sharded DTensors (FSDP2's "
                "fully_shard), which are not in the autograd graph, so the shared ones cannot "
                "be found there; pass shared_params (e.g. model.trunk.parameters()) and "
                "backward(losses, features=z)"
            )
        if not parts.shared:
            raise ValueError(
                "MTLOptimizer: no parameter of the optimizer is shared by two or more task "
                "losses; pass shared_params explicitly"
            )
        return parts

    def _discover_shared(
        self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor
    ) -> list[Tensor]:
        """The shared parameters found in the graph (what ``backward`` uses by default)."""
        return self._partition(losses, None).shared
