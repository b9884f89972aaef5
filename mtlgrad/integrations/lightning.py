"""PyTorch Lightning: one multi-task step in manual optimisation, and the aggregator in checkpoints.

Needs the ``lightning`` package (``pip install lightning``); importing this module imports it.

- :func:`mtl_step`, called from ``training_step`` with ``self.automatic_optimization = False``,
  runs the whole step on the :class:`~mtlgrad.optim.MTLOptimizer` that ``configure_optimizers``
  returned: the aggregated backward (with the precision plugin's GradScaler under
  ``"16-mixed"``), optional clipping, the optimizer step through Lightning (step counting,
  ``on_before_optimizer_step``, the scaler's unscale, step and update), ``zero_grad``, the LR
  schedulers at their configured interval, and the step's record logged with ``log_dict``;
  with ``accumulate_grad_batches=K``, the task gradients of K micro-batches are summed and
  aggregated once.
  The aggregator's state rides in the MTLOptimizer's ``state_dict``, so it is in Lightning's
  checkpoint with nothing more to do.
- :class:`AggregatorCheckpoint`, a callback for the functional :func:`mtlgrad.backward` with a
  bare aggregator: it puts the aggregator's state (GradVac's targets, the generator of the
  randomised methods, the task order) in Lightning's checkpoint and restores it on resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor

from mtlgrad.aggregators import Aggregator
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import StepRecord

__all__ = ["AggregatorCheckpoint", "mtl_step"]


def mtl_step(
    module: pl.LightningModule,
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
    *,
    optimizer: MTLOptimizer | LightningOptimizer | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str = "norm",
    step_schedulers: bool = True,
    log: bool = True,
    log_cosines: bool = True,
    log_prefix: str = "mtl",
    accumulate_grad_batches: int = 1,
) -> StepRecord | None:
    """One multi-task optimisation step from a LightningModule's ``training_step``.

    In order: the :class:`~mtlgrad.optim.MTLOptimizer`'s ``backward(losses, features=...)``
    (per-task gradients, aggregated into ``.grad``), clipping with Lightning's
    ``module.clip_gradients``, the optimizer step through Lightning's optimizer wrapper,
    ``zero_grad()``, the LR schedulers of this optimizer whose interval has come, and
    ``module.log_dict`` of the step's :class:`~mtlgrad.StepRecord`::

        class Model(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                ...

            def configure_optimizers(self):
                opt = MTLOptimizer(torch.optim.AdamW(self.parameters()), UPGrad(),
                                   shared_params=self.trunk.parameters())
                return {"optimizer": opt, "lr_scheduler": StepLR(opt, step_size=10)}

            def training_step(self, batch, batch_idx):
                losses = ...  # a dict of task losses
                mtl_step(self, losses, gradient_clip_val=1.0)

    Gradients already in ``.grad`` when it is called (an auxiliary loss's
    ``self.manual_backward``) are added to, as :func:`mtlgrad.backward` does; the step leaves
    ``.grad`` at ``None``.

    Gradient accumulation (``accumulate_grad_batches=K``): each call is a micro-batch; its task
    gradients are summed with ``MTLOptimizer.backward(losses, aggregate=False)`` and the K-th
    call (or the last batch of the epoch) aggregates the sums once and steps, as one step on the
    K micro-batches together would. As in Lightning's automatic accumulation, each micro-batch's
    losses are divided by K (also in a shorter last cycle of an epoch).

    Mixed precision: under a precision plugin with a GradScaler (``"16-mixed"``), the scaler is
    handed to the MTLOptimizer (which scales the losses and writes the scaled update, see
    :func:`mtlgrad.backward`); Lightning's step unscales, skips the update when a task gradient
    overflowed, and updates the scale. ``"bf16-mixed"`` needs no scaler.

    Args:
        module: the LightningModule (``self``), attached to a Trainer, with
            ``automatic_optimization = False``.
        losses: the task losses, as for :func:`mtlgrad.backward` (a dict names the tasks in the
            logged keys).
        optimizer: the MTLOptimizer to step (its Lightning wrapper from ``self.optimizers()``,
            or the MTLOptimizer that ``configure_optimizers`` returned). By default the one
            MTLOptimizer among ``self.optimizers()``.
        features: the shared representation, for the cheap features mode (see
            :func:`mtlgrad.backward`).
        gradient_clip_val: clip the gradients before the step (``None`` or 0: no clipping).
            Under a GradScaler the gradients are still scaled at this point, so the threshold
            is multiplied by the scale: the clip coefficient is the one of the unscaled
            gradients (up to ``clip_grad_norm_``'s 1e-6 in its denominator).
        gradient_clip_algorithm: ``"norm"`` (of all the optimizer's gradients together) or
            ``"value"``, as in Lightning.
        step_schedulers: step this optimizer's LR schedulers from ``configure_optimizers`` at
            their ``interval`` (``"step"``: every ``frequency`` optimizer steps; ``"epoch"``:
            after the last batch of every ``frequency``-th epoch). ``ReduceLROnPlateau`` needs a
            metric: pass ``False`` and step it yourself.
        log: log the step's record with ``module.log_dict`` (on step): ``{prefix}/loss/{task}``,
            ``{prefix}/weight/{task}`` (when the method has weights and the step was not
            skipped), ``{prefix}/conflicts`` (fraction of task pairs whose gradients conflict)
            and, under a GradScaler, ``{prefix}/skipped`` (1.0 for an overflow).
        log_cosines: also log the cosine of every pair of task gradients,
            ``{prefix}/cosine/{task_a}/{task_b}`` (T (T - 1) / 2 keys).
        log_prefix: the first part of the logged keys.
        accumulate_grad_batches: step every K calls (and at the end of each epoch), aggregating
            the task gradients summed over the micro-batches. Lightning's own
            ``Trainer(accumulate_grad_batches=...)`` is for automatic optimisation only.

    Returns:
        The step's :class:`~mtlgrad.StepRecord`, or ``None`` for a micro-batch that only
        accumulated.
    """
    _check_accumulation(accumulate_grad_batches)
    if gradient_clip_val is not None and (
        not isinstance(gradient_clip_val, (int, float))
        or isinstance(gradient_clip_val, bool)
        or not gradient_clip_val >= 0
        or math.isinf(gradient_clip_val)
    ):
        raise ValueError(
            f"mtl_step: gradient_clip_val must be a non-negative finite number or None, got "
            f"{gradient_clip_val!r}"
        )
    if not isinstance(log_prefix, str):
        raise TypeError(f"mtl_step: log_prefix must be a str, got {type(log_prefix).__name__}")
    trainer = _check_module(module)
    wrapper, mtl = _find_optimizer(module, optimizer)
    _hand_over_scaler(trainer, mtl)

    if accumulate_grad_batches > 1:
        losses = _divided(losses, accumulate_grad_batches)
        aggregate = len(mtl.accumulator) + 1 >= accumulate_grad_batches or _epoch_ends(trainer)
        record = mtl.backward(losses, features=features, aggregate=aggregate)
        if record is None:
            return None
    else:
        record = mtl.backward(losses, features=features)
    if gradient_clip_val:
        scaler = mtl.scaler
        # Lightning unscales inside the step below (a second unscale_ would fail), so the
        # scaled gradients are clipped at the scaled threshold: with a power-of-two scale, the
        # norms and the clip coefficient are those of the unscaled gradients.
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        module.clip_gradients(mtl, gradient_clip_val * scale, gradient_clip_algorithm)
    wrapper.step()
    mtl.zero_grad()
    if step_schedulers:
        _step_schedulers(trainer, mtl)
    if log:
        _log_record(module, record, log_prefix, log_cosines, mtl.scaler)
    return record


class AggregatorCheckpoint(pl.Callback):
    """Keeps a bare aggregator's state in Lightning's checkpoints (for :func:`mtlgrad.backward`).

    With an :class:`~mtlgrad.optim.MTLOptimizer` this is not needed: its ``state_dict`` already
    carries the aggregator's state. With the functional step and an aggregator of one's own,
    pass this callback to the Trainer (or return it from the module's ``configure_callbacks``)::

        def configure_callbacks(self):
            return [AggregatorCheckpoint(self.aggregator)]

    It saves ``aggregator.state_dict()`` (running quantities such as GradVac's targets, the
    generator state of RLW, PCGrad, GradDrop, ...) and the task order of a named step, and
    restores them when ``trainer.fit(ckpt_path=...)`` resumes, so the resumed run draws the
    same numbers and continues bit-identically. A checkpoint without this state (saved without
    the callback) is warned about: the aggregator then starts afresh.

    Args:
        aggregator: the aggregator passed to :func:`mtlgrad.backward`.
        name: distinguishes several aggregators' entries in one checkpoint (default
            ``"aggregator"``).
    """

    def __init__(self, aggregator: Aggregator, name: str = "aggregator") -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                "AggregatorCheckpoint: aggregator must be an mtlgrad Aggregator, got "
                f"{type(aggregator).__name__}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"AggregatorCheckpoint: name must be a non-empty str, got {name!r}")
        self.aggregator = aggregator
        self.name = name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "aggregator": self.aggregator.state_dict(),
            "task_names": getattr(self.aggregator, "_task_order", None),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state_dict["aggregator"])
        task_names = state_dict.get("task_names")
        self.aggregator._task_order = None if task_names is None else list(task_names)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            warnings.warn(
                f"AggregatorCheckpoint: the checkpoint holds no state for {self.state_key} "
                f"({self.aggregator!r}); it was saved without this callback, or with another "
                "name=, and the aggregator starts afresh (the resumed run will not continue "
                "the interrupted one exactly)",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        return f"AggregatorCheckpoint({self.aggregator!r}, name={self.name!r})"


# ---- the pieces of mtl_step ------------------------------------------------------------------


def _check_accumulation(accumulate_grad_batches: int) -> None:
    if (
        not isinstance(accumulate_grad_batches, int)
        or isinstance(accumulate_grad_batches, bool)
        or accumulate_grad_batches < 1
    ):
        raise ValueError(
            "mtl_step: accumulate_grad_batches must be a positive int, got "
            f"{accumulate_grad_batches!r}"
        )


def _divided(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor, count: int
) -> Sequence[Tensor] | Mapping[str, Tensor] | Tensor:
    """Each micro-batch's losses divided by the number of micro-batches (their mean, as in
    Lightning's automatic accumulation)."""
    if isinstance(losses, Tensor):
        return losses / count
    if isinstance(losses, Mapping):
        return {name: loss / count for name, loss in losses.items()}
    return [loss / count for loss in losses]


def _epoch_ends(trainer: pl.Trainer) -> bool:
    """Whether this is the epoch's last batch: the condition on which Lightning's automatic
    optimisation steps epoch schedulers and ends an accumulation."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.current.ready == trainer.num_training_batches or progress.is_last_batch


def _check_module(module: pl.LightningModule) -> pl.Trainer:
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            f"mtl_step: module must be a lightning.pytorch.LightningModule (self in "
            f"training_step), got {type(module).__name__}"
        )
    if module.automatic_optimization:
        raise RuntimeError(
            f"mtl_step runs the optimizer step itself, and {type(module).__name__} uses "
            "Lightning's automatic optimisation, which would run another: set "
            "self.automatic_optimization = False in its __init__"
        )
    # Under a DDP strategy (several processes) the MTLOptimizer's step averages each task's
    # gradients over the world group itself (replicated mode): DDP's own synchronisation is
    # never triggered, and the replicas stay one model.
    return module.trainer  # raises when not attached to a Trainer


def _find_optimizer(
    module: pl.LightningModule, optimizer: MTLOptimizer | LightningOptimizer | None
) -> tuple[LightningOptimizer, MTLOptimizer]:
    """The Lightning wrapper (what steps, and counts the step) and the MTLOptimizer in it."""
    found = module.optimizers()
    wrappers = list(found) if isinstance(found, list) else [found]
    if optimizer is None:
        candidates = [w for w in wrappers if isinstance(_unwrapped(w), MTLOptimizer)]
        if len(candidates) == 1:
            return candidates[0], _unwrapped(candidates[0])
        returned = ", ".join(type(_unwrapped(w)).__name__ for w in wrappers) or "nothing"
        if not candidates:
            raise TypeError(
                f"mtl_step needs an mtlgrad.optim.MTLOptimizer from configure_optimizers, which "
                f"returned {returned}: wrap the optimizer, e.g. "
                "MTLOptimizer(torch.optim.AdamW(self.parameters()), UPGrad(), "
                "shared_params=self.trunk.parameters()) (its state_dict carries the "
                "aggregator's state into Lightning's checkpoint)"
            )
        raise ValueError(
            f"mtl_step: configure_optimizers returned {len(candidates)} MTLOptimizers "
            f"({returned}); pass optimizer= to say which one to step"
        )
    target = _unwrapped(optimizer)
    for wrapper in wrappers:
        if _unwrapped(wrapper) is target:
            if not isinstance(target, MTLOptimizer):
                raise TypeError(
                    f"mtl_step: optimizer must be an mtlgrad.optim.MTLOptimizer, got "
                    f"{type(target).__name__}"
                )
            return wrapper, target
    raise ValueError(
        f"mtl_step: the optimizer {type(target).__name__} is not one that configure_optimizers "
        "returned; Lightning would neither count its steps nor checkpoint its state"
    )


def _unwrapped(optimizer: Any) -> Any:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _hand_over_scaler(trainer: pl.Trainer, mtl: MTLOptimizer) -> None:
    """Gives the MTLOptimizer the precision plugin's GradScaler (the one Lightning's step
    unscales with), and refuses a scaler of its own that Lightning would not unscale."""
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    if mtl.scaler is scaler:
        return
    if mtl.scaler is None:
        mtl.scaler = scaler
        return
    if scaler is None:
        raise ValueError(
            f"mtl_step: the MTLOptimizer has a GradScaler but the Trainer's precision plugin "
            f"({type(plugin).__name__}, precision={trainer.precision!r}) has none, so nothing "
            "would unscale the gradients before the step: build the MTLOptimizer without "
            "scaler= (under precision='16-mixed' mtl_step hands it the Trainer's)"
        )
    raise ValueError(
        "mtl_step: the MTLOptimizer's GradScaler is not the one of the Trainer's precision "
        f"plugin ({type(plugin).__name__}), which unscales the gradients in the step: they "
        "would be scaled by one and unscaled by the other. Build the MTLOptimizer without "
        "scaler= (mtl_step hands it the Trainer's), or pass your scaler to the plugin: "
        "Trainer(plugins=[MixedPrecision('16-mixed', device, scaler=scaler)])"
    )


def _step_schedulers(trainer: pl.Trainer, mtl: MTLOptimizer) -> None:
    epoch_ends = _epoch_ends(trainer)
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) not in (mtl, mtl.optimizer):
            continue
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "mtl_step cannot step ReduceLROnPlateau, which needs the monitored metric: pass "
                "step_schedulers=False and call scheduler.step(metric) yourself (e.g. in "
                "on_validation_epoch_end)"
            )
        if config.interval == "step":
            due = trainer.global_step % config.frequency == 0
        elif config.interval == "epoch":
            due = epoch_ends and (trainer.current_epoch + 1) % config.frequency == 0
        else:
            raise ValueError(
                f"mtl_step: the LR scheduler {type(scheduler).__name__} has interval "
                f"{config.interval!r}; expected 'step' or 'epoch'"
            )
        if due:
            scheduler.step()


def _log_record(
    module: pl.LightningModule,
    record: StepRecord,
    prefix: str,
    cosines: bool,
    scaler: torch.amp.GradScaler | None,
) -> None:
    names = record.names
    metrics: dict[str, float] = {}
    if record.losses is not None:
        metrics.update({f"{prefix}/loss/{n}": float(v) for n, v in zip(names, record.losses)})
    if record.weights is not None:
        metrics.update({f"{prefix}/weight/{n}": float(v) for n, v in zip(names, record.weights)})
    if record.conflicts is not None:
        metrics[f"{prefix}/conflicts"] = record.conflicts
    if cosines and record.cosines is not None:
        values = record.cosines.tolist()
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                metrics[f"{prefix}/cosine/{a}/{names[j]}"] = values[i][j]
    if scaler is not None and scaler.is_enabled():
        metrics[f"{prefix}/skipped"] = float(record.skipped)
    if metrics:
        module.log_dict(metrics, on_step=True, on_epoch=False)
