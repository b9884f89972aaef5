"""Training one method on the demo problem, with what the table and the figure need."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from mtlgrad.demo._methods import Method
from mtlgrad.demo._metrics import evaluate
from mtlgrad.demo._problem import DemoModel, DemoProblem, task_loss
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import StepRecord
from mtlgrad.weighting import LossWeighting

__all__ = ["MethodResult", "TrainConfig", "epoch_length", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """The budget, the same for every method."""

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    evaluations: int = 40
    seed: int = 0


@dataclass
class MethodResult:
    """What one method's run produced.

    Attributes:
        losses / metrics: final test loss and metric per task.
        eval_steps: the steps after which the test set was evaluated.
        curves: test metric per evaluation (rows) and task (columns).
        cosines: per evaluation, the mean T x T task-gradient cosines over the steps since the
            previous one (from each step's record; ``None`` for the loss weightings).
        conflicts: mean fraction of conflicting task pairs over all steps (``None`` when the
            method does not compute the Gram matrix: the loss weightings).
        ms_per_step: mean wall time of a training step (forward, backward, aggregation or
            weighting with its hooks, optimizer step), evaluations excluded.
        weights: the task weights of the last step (the aggregator's, or the weighting's).
    """

    method: Method
    losses: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)
    cosines: list[Tensor] | None = None
    conflicts: float | None = None
    ms_per_step: float = 0.0
    weights: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method.label,
            "test_losses": self.losses,
            "test_metrics": self.metrics,
            "conflicts": self.conflicts,
            "ms_per_step": self.ms_per_step,
            "final_weights": self.weights,
            "eval_steps": self.eval_steps,
            "curves": self.curves,
        }


def epoch_length(size: int, batch_size: int) -> int:
    """Steps per epoch (one pass over the training set): :func:`_batches` drops the last partial
    batch."""
    if not 0 < batch_size <= size:
        raise ValueError(f"batch_size must be in [1, {size}] (the training set), got {batch_size}")
    return size // batch_size


def _batches(size: int, batch_size: int, seed: int):
    """An endless stream of index batches: shuffled epochs, the same order for every method."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(size, generator=gen)
        for start in range(0, epoch_length(size, batch_size) * batch_size, batch_size):
            yield order[start : start + batch_size]


def _optimizer(
    method: Method, model: DemoModel, weighting: LossWeighting | None, lr: float
) -> torch.optim.Optimizer:
    """Adam on the model, plus a parameter group for the weighting's own parameters (at
    ``method.weighting_lr`` when set)."""
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    weighting_params = [] if weighting is None else list(weighting.parameters())
    if weighting_params:
        group: dict[str, Any] = {"params": weighting_params}
        if method.weighting_lr is not None:
            group["lr"] = method.weighting_lr
        groups.append(group)
    return torch.optim.Adam(groups, lr=lr)


def train(
    method: Method,
    problem: DemoProblem,
    init_state: dict[str, Tensor],
    config: TrainConfig,
    on_step: Callable[[], None] | None = None,
) -> MethodResult:
    """Trains the demo model from ``init_state`` with ``method`` and Adam, for ``config.steps``.

    Gradient methods run through :class:`~mtlgrad.optim.MTLOptimizer` with the trunk as the
    shared parameters (each head gets its own task's gradient). Loss weightings backpropagate
    ``weighting(losses)``; their parameters (UW's log-variances, GradNorm's weights) are a
    parameter group of Adam, and the loop calls the hooks a weighting has:

    - ``update(new_losses)`` after each ``optimizer.step()``, with the losses of the same batch
      at the new parameters (one extra forward without gradient; FAMO), counted in ms/step;
    - ``end_epoch()`` after the last step of each epoch, one pass over the training set
      (``train_size // batch_size`` steps; DWA).
    """
    model = DemoModel(problem)
    model.load_state_dict(init_state)
    tasks = problem.tasks
    names = [task.name for task in tasks]
    weighting: LossWeighting | None = None
    update: Callable[[dict[str, Tensor]], None] | None = None
    end_epoch: Callable[[], Any] | None = None
    if method.make_weighting is not None:
        weighting = method.make_weighting(model, list(tasks), config.seed)
        update = getattr(weighting, "update", None)
        end_epoch = getattr(weighting, "end_epoch", None)
        optimizer: torch.optim.Optimizer | MTLOptimizer = _optimizer(
            method, model, weighting, config.lr
        )
    else:
        assert method.make is not None
        optimizer = MTLOptimizer(
            _optimizer(method, model, None, config.lr),
            method.make(config.seed),
            shared_params=model.trunk.parameters(),
        )

    def batch_losses(index: Tensor) -> dict[str, Tensor]:
        predictions = model(problem.train_inputs[index])
        return {
            name: task_loss(task, prediction, target[index])
            for name, task, prediction, target in zip(
                names, tasks, predictions, problem.train_targets
            )
        }

    def step_losses(index: Tensor) -> dict[str, Tensor]:
        """The batch's losses; for a double-sampling method, every task's loss on each of its
        sub-batches, sample-major (``name/1``, ..., then ``name/2``, ...)."""
        if method.samples == 1:
            return batch_losses(index)
        return {
            f"{name}/{s}": loss
            for s, part in enumerate(index.chunk(method.samples), start=1)
            for name, loss in batch_losses(part).items()
        }

    result = MethodResult(method)
    every = max(1, config.steps // max(1, config.evaluations))
    eval_at = set(range(every, config.steps + 1, every)) | {config.steps}
    cosine_sum: Tensor | None = None
    cosine_count = 0
    conflict_sum, conflict_count = 0.0, 0
    cosines: list[Tensor] = []
    elapsed = 0.0
    size = problem.train_inputs.shape[0]
    per_epoch = epoch_length(size, config.batch_size)
    batches = _batches(size, config.batch_size, config.seed)
    record = None
    final_weights = torch.empty(0)
    for step in range(1, config.steps + 1):
        index = next(batches)
        start = time.perf_counter()
        losses = step_losses(index)
        optimizer.zero_grad()
        if weighting is not None:
            weighting(losses).backward()
            if step == config.steps:
                final_weights = weighting.weights
        else:
            record = optimizer.backward(losses)
        optimizer.step()
        if update is not None:
            with torch.no_grad():
                update(batch_losses(index))
        if end_epoch is not None and step % per_epoch == 0:
            end_epoch()
        elapsed += time.perf_counter() - start

        # The record's own statistics (StepRecord.cosines / .conflicts: None without a Gram
        # matrix); for a double-sampling method, those of the first sub-batch's T tasks.
        stats = record
        if record is not None and method.samples > 1 and record.gram is not None:
            T = len(names)
            stats = StepRecord(names, None, record.gram[:T, :T].clone())
        step_cosines = None if stats is None else stats.cosines
        if stats is not None and step_cosines is not None:
            conflict_sum += stats.conflicts
            conflict_count += 1
            cosine_sum = step_cosines if cosine_sum is None else cosine_sum + step_cosines
            cosine_count += 1
        if step in eval_at:
            _, metrics = evaluate(model, problem)
            result.eval_steps.append(step)
            result.curves.append(metrics)
            if cosine_sum is not None:
                cosines.append(cosine_sum / cosine_count)
                cosine_sum, cosine_count = None, 0
        if on_step is not None:
            on_step()

    result.losses, result.metrics = evaluate(model, problem)
    result.ms_per_step = 1e3 * elapsed / config.steps
    if conflict_count:
        result.conflicts = conflict_sum / conflict_count
        result.cosines = cosines
    if weighting is not None:
        result.weights = final_weights.tolist()
    elif record is not None and record.weights is not None:
        # A double-sampling method's weights are per sub-batch: a task's weight is their sum.
        result.weights = record.weights.view(method.samples, -1).sum(0).tolist()
    return result
