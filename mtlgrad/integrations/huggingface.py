"""Hugging Face ``transformers.Trainer`` with per-task losses and an mtlgrad aggregator.

::

    trainer = MTLTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                         aggregator=UPGrad(), shared_params="bert")
    trainer.train()

The model returns its per-task losses (``outputs["losses"] = {task: scalar loss}``); the trainer
differentiates each of them, aggregates the task gradients of the shared parameters with the
aggregator and lets the Trainer clip, step, schedule, log and checkpoint as usual. Importing this
module imports ``transformers`` (``import mtlgrad`` does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers.trainer_pt_utils import find_batch_size, nested_detach

from mtlgrad.aggregators import Aggregator
from mtlgrad.nn import MultiTaskModule
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import ENGINES, GramEngine, StepRecord

__all__ = ["MTLTrainer", "SharedParams"]

#: How :class:`MTLTrainer` finds the shared parameters: the name of a submodule of the model
#: (``"bert"``), a callable ``model -> parameters``, or the parameters themselves.
SharedParams = Union[str, Callable[[nn.Module], Iterable[Tensor]], Iterable[Tensor]]

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.FSDP: "FSDP",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.XLA: "XLA",
}


class MTLTrainer(transformers.Trainer):
    """A :class:`transformers.Trainer` whose step aggregates per-task gradients.

    Each training step does what ``Trainer.training_step`` does (the accelerator's autocast and
    ``compute_loss_context_manager``, the division of the losses by the number of accumulated
    micro-batches unless they are normalised by ``num_items_in_batch``), except that the model's
    per-task losses go to :meth:`mtlgrad.optim.MTLOptimizer.backward` instead of one summed
    ``backward``. The Trainer's optimizer (built as usual, or the one passed in ``optimizers=``)
    is wrapped in an :class:`~mtlgrad.optim.MTLOptimizer` by :meth:`create_optimizer`, with the
    accelerator's fp16 ``GradScaler`` when there is one; accelerate wraps that in its
    ``AcceleratedOptimizer``. The Trainer then unscales and clips (``max_grad_norm``), steps,
    schedules and checkpoints it unchanged: ``optimizer.pt`` carries the aggregator's state (GradVac
    targets, random generators), so a run resumed from a checkpoint continues bit-identically.

    **The model's contract.** ``model(**inputs)`` returns a dict (or a ``ModelOutput``) whose
    entry ``losses_key`` (default ``"losses"``) is ``{task name: scalar loss}``, the same tasks in
    every training step; every other entry is a prediction (returned by ``predict`` and passed to
    ``compute_metrics``). For another layout, override :meth:`compute_task_losses`. A missing task,
    a ``None``, non-tensor or non-scalar loss, or (in training) a loss without a gradient raises an
    error naming the task. In evaluation, a model may return no losses at all (no labels): then
    there is no eval loss, as with the Trainer.

    **Metrics.** The eval loss is the sum of the task losses; ``evaluate()`` also reports
    ``eval_<task>_loss`` for each task. At each logging step the training logs get
    ``<task>_loss`` (averaged over the optimizer steps since the last log, as ``loss`` is, whose
    sum it is) and ``<task>_weight``, the aggregation's weight of the task at the last optimizer
    step (absent for elementwise methods such as GradDrop).

    **Gradient accumulation.** With ``gradient_accumulation_steps > 1`` each task's gradients are
    summed over the micro-batches (``MTLOptimizer.backward(losses, aggregate=False)``) and
    aggregated once, on the last micro-batch (``accelerator.sync_gradients``), as one step on the
    whole batch would; ``features_key`` and the Gram engine cannot accumulate and are refused
    then.

    Args:
        *args: the Trainer's arguments (``model``, ``args``, datasets, ``optimizers``, ...).
        aggregator: how to combine the task gradients of the shared parameters.
        shared_params: the shared parameters: the name of a submodule of the model (``"bert"``),
            a callable taking the model and returning its shared parameters, or the parameters.
            By default, a :class:`~mtlgrad.nn.MultiTaskModule` model's exact partition, and for
            other models the optimizer's parameters that more than one task's loss reaches (found
            in the autograd graph at each step).
        features_key: the entry of the model's output holding the shared representation: the
            task gradients are then taken with respect to it and one backward goes through the
            trunk (``features=`` of :func:`mtlgrad.backward`).
        losses_key: the entry of the model's output holding ``{task: loss}``.
        task_names: the tasks, in order. By default a :class:`~mtlgrad.nn.MultiTaskModule`'s,
            else those of the first training step; every later step must return the same ones.
        engine: ``"loop"``, ``"batched"``, ``"gram"`` (with a ``MultiTaskModule`` model) or a
            :class:`~mtlgrad.GramEngine` (see :class:`~mtlgrad.optim.MTLOptimizer`).
        scale_task_params: multiply each head's gradient by its task's weight.
        **kwargs: the Trainer's keyword arguments. ``compute_loss_func`` and
            ``label_smoothing_factor`` apply to one loss and are refused.
    """

    def __init__(
        self,
        *args: Any,
        aggregator: Aggregator,
        shared_params: SharedParams | None = None,
        features_key: str | None = None,
        losses_key: str = "losses",
        task_names: Sequence[str] | None = None,
        engine: str | GramEngine = "loop",
        scale_task_params: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"MTLTrainer: aggregator must be an mtlgrad Aggregator, got "
                f"{type(aggregator).__name__}"
            )
        if isinstance(shared_params, Tensor) or not (
            shared_params is None
            or isinstance(shared_params, str)
            or callable(shared_params)
            or isinstance(shared_params, Iterable)
        ):
            raise TypeError(
                "MTLTrainer: shared_params must be a submodule name, a callable model -> "
                f"parameters, or an iterable of parameters; got {type(shared_params).__name__}"
            )
        if not (isinstance(shared_params, str) or callable(shared_params)) and isinstance(
            shared_params, Iterable
        ):
            shared_params = list(shared_params)  # a generator would be consumed once
        for name, key in (("features_key", features_key), ("losses_key", losses_key)):
            if key is not None and (not isinstance(key, str) or not key):
                raise TypeError(f"MTLTrainer: {name} must be a non-empty string, got {key!r}")
        if not isinstance(engine, GramEngine) and engine not in (*ENGINES, "gram"):
            raise ValueError(
                f"MTLTrainer: engine must be one of {', '.join(map(repr, ENGINES))}, 'gram' or a "
                f"GramEngine; got {engine!r}"
            )
        if not isinstance(scale_task_params, bool):
            raise TypeError(
                f"MTLTrainer: scale_task_params must be a bool, got {scale_task_params!r}"
            )
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is not None:
            raise ValueError(
                "MTLTrainer: compute_loss_func returns one loss; return the per-task losses from "
                "the model or override compute_task_losses"
            )
        if self.label_smoother is not None:
            raise ValueError(
                "MTLTrainer: label_smoothing_factor smooths one loss; smooth each task's loss in "
                "the model (e.g. F.cross_entropy(..., label_smoothing=...))"
            )
        model_tasks = self.model.task_names if isinstance(self.model, MultiTaskModule) else None
        names = task_names if task_names is not None else model_tasks
        if names is not None:
            names = [str(n) for n in names]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"MTLTrainer: task_names must be distinct and non-empty: {names}")
        self.aggregator = aggregator
        self.shared_params = shared_params
        self.features_key = features_key
        self.losses_key = losses_key
        self.task_names: list[str] | None = names
        self.engine = engine
        self.scale_task_params = scale_task_params
        self._last_record: StepRecord | None = None
        self._task_loss_sums: dict[str, Tensor] = {}
        self._optimizer_steps_since_log = 0
        self._eval_task_losses: list[Tensor] | None = None

    # ---- the optimizer ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped in an :class:`~mtlgrad.optim.MTLOptimizer` (once)."""
        self._check_supported()
        optimizer = super().create_optimizer(model)
        if _find_mtl_optimizer(optimizer) is not None:
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(
            optimizer, AcceleratedOptimizer
        ):
            raise TypeError(
                "MTLTrainer: cannot wrap the Trainer's optimizer "
                f"({type(optimizer).__name__}) in an MTLOptimizer; pass a torch.optim optimizer "
                "(or none) in optimizers="
            )
        self._check_accumulation()
        target = self.accelerator.unwrap_model(self.model if model is None else model)
        options: dict[str, Any] = {}
        if self.shared_params is None and isinstance(target, MultiTaskModule):
            options["model"] = target
        else:
            options["shared_params"] = self._resolve_shared_params(target)
        self.optimizer = MTLOptimizer(
            optimizer,
            self.aggregator,
            engine=self.engine,
            scaler=self.accelerator.scaler,
            scale_task_params=self.scale_task_params,
            **options,
        )
        return self.optimizer

    def _resolve_shared_params(self, model: nn.Module) -> list[Tensor] | None:
        spec = self.shared_params
        if spec is None:
            return None
        if isinstance(spec, str):
            try:
                module = model.get_submodule(spec)
            except AttributeError:
                children = [name for name, _ in model.named_children()]
                raise ValueError(
                    f"MTLTrainer: shared_params={spec!r}, but the model has no such submodule "
                    f"(its children: {children})"
                ) from None
            params = list(module.parameters())
        elif callable(spec):
            params = list(spec(model))
        else:
            params = list(spec)
        if not params:
            raise ValueError(f"MTLTrainer: shared_params={spec!r} gave no parameters")
        own = {id(p) for p in model.parameters()}
        for k, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"MTLTrainer: shared_params[{k}] is a {type(p).__name__}, not a parameter"
                )
            if id(p) not in own:
                raise ValueError(
                    f"MTLTrainer: shared_params[{k}] (shape {list(p.shape)}) is not a parameter "
                    "of the trained model"
                )
        return params

    def _mtl_optimizer(self) -> MTLOptimizer:
        found = _find_mtl_optimizer(self.optimizer)
        if found is None:
            raise RuntimeError(
                "MTLTrainer: the Trainer's optimizer does not wrap an MTLOptimizer (an override "
                "of create_optimizer must call MTLTrainer.create_optimizer)"
            )
        return found

    def _check_accumulation(self) -> None:
        steps = self.args.gradient_accumulation_steps
        if steps == 1:
            return
        refused = None
        if self.features_key is not None:
            refused = (
                f"features_key={self.features_key!r} (each micro-batch's features belong to "
                "its own graph)"
            )
        elif self.engine == "gram" or isinstance(self.engine, GramEngine):
            refused = (
                "the gram engine (the Gram matrix of summed gradients is not the sum of the "
                "micro-batches' Gram matrices)"
            )
        if refused is not None:
            raise ValueError(
                f"MTLTrainer: gradient_accumulation_steps={steps} sums each task's gradients "
                f"over the micro-batches and aggregates once, which {refused} cannot do; use "
                "gradient_accumulation_steps=1 (and a larger batch), or engine='loop'/'batched' "
                "without features_key"
            )

    def _check_supported(self) -> None:
        kind = _UNSUPPORTED.get(self.accelerator.distributed_type)
        if kind is not None:
            raise NotImplementedError(
                f"MTLTrainer does not support {kind}: the task gradients are taken with "
                "autograd.grad on the shared parameters, which that engine shards or owns"
            )

    # ---- the per-task losses ------------------------------------------------------------------

    def compute_task_losses(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> tuple[Mapping[str, Tensor] | None, Any]:
        """``({task: loss}, outputs)`` for one batch: by default ``outputs = model(**inputs)``
        and its entry ``losses_key``.

        Override it to compute the losses from the model's outputs and the labels yourself; the
        result is checked (each task present, each loss a scalar tensor) wherever it comes from.
        As in ``Trainer.compute_loss``, ``num_items_in_batch`` is passed to a model whose
        ``forward`` takes ``**kwargs``; losses normalised by it are not divided again by the
        number of accumulated micro-batches.
        """
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"MTLTrainer: the model returned a {type(outputs).__name__}; expected a dict (or "
                f"ModelOutput) with the per-task losses under {self.losses_key!r}, or override "
                "compute_task_losses"
            )
        losses = outputs.get(self.losses_key)
        if (
            isinstance(losses, Mapping)
            and self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            # Trainer.compute_loss: losses normalised by the global token count, times the ranks.
            factor = self.accelerator.num_processes // self.get_tp_size()
            factor = factor if self.args.n_gpu <= 1 else self.args.n_gpu
            losses = {name: loss * factor for name, loss in losses.items()}
        return losses, outputs

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The sum of the task losses (for code that calls the Trainer's ``compute_loss``)."""
        losses, outputs = self.compute_task_losses(model, inputs, num_items_in_batch)
        checked = self._checked_losses(losses, outputs, training=model.training)
        if checked is None:
            raise ValueError(self._no_losses_message(outputs))
        total = sum(checked.values())
        return (total, outputs) if return_outputs else total  # type: ignore[return-value]

    def _checked_losses(
        self, losses: Any, outputs: Any, training: bool
    ) -> dict[str, Tensor] | None:
        """The losses as ``{task: 0-d tensor}`` in the task order, or None (evaluation only)
        when there are none; a clear error naming the task otherwise."""
        if losses is None or (isinstance(losses, Mapping) and not losses and not training):
            if training:
                raise ValueError(self._no_losses_message(outputs))
            return None
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"MTLTrainer: the per-task losses ({self.losses_key!r}) must be a dict "
                f"{{task name: scalar loss}}, got {type(losses).__name__}"
            )
        names = [str(name) for name in losses]
        if self.task_names is None:
            if not names:
                raise ValueError("MTLTrainer: the model returned no task losses (an empty dict)")
            self.task_names = names
        missing = [n for n in self.task_names if n not in names]
        if missing:
            raise ValueError(
                f"MTLTrainer: no loss for task {', '.join(map(repr, missing))} in the model's "
                f"losses (got {names}; the tasks are {self.task_names})"
            )
        extra = [n for n in names if n not in self.task_names]
        if extra:
            raise ValueError(
                f"MTLTrainer: loss for unknown task {', '.join(map(repr, extra))} (the tasks "
                f"are {self.task_names}; pass task_names= to declare them)"
            )
        by_name = {str(name): loss for name, loss in losses.items()}
        checked = {}
        for name in self.task_names:
            loss = by_name[name]
            if loss is None:
                raise ValueError(
                    f"MTLTrainer: the loss of task {name!r} is None (are its labels in the batch?)"
                )
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f"MTLTrainer: the loss of task {name!r} must be a tensor, got "
                    f"{type(loss).__name__}"
                )
            if self.args.n_gpu > 1 and loss.dim() == 1:
                loss = loss.mean()  # nn.DataParallel: one loss per device
            if loss.numel() != 1:
                raise ValueError(
                    f"MTLTrainer: the loss of task {name!r} must be a scalar, got shape "
                    f"{list(loss.shape)}; reduce it (e.g. .mean())"
                )
            if training and not loss.requires_grad:
                raise ValueError(
                    f"MTLTrainer: the loss of task {name!r} does not require grad (detached, or "
                    "computed under torch.no_grad()?)"
                )
            checked[name] = loss.reshape(())
        return checked

    def _no_losses_message(self, outputs: Any) -> str:
        keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
        return (
            f"MTLTrainer: the model's output has no per-task losses under {self.losses_key!r} "
            f"(its entries: {keys}); return {{task name: scalar loss}} there, or override "
            "compute_task_losses"
        )

    def _features(self, outputs: Any) -> Tensor | list[Tensor] | None:
        key = self.features_key
        if key is None:
            return None
        value = outputs.get(key) if isinstance(outputs, Mapping) else None
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
            return list(value)
        keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"MTLTrainer: features_key={key!r}, but the model's output has no tensor under it "
            f"(its entries: {keys})"
        )

    # ---- training -----------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-batch: the per-task losses, their gradients aggregated into ``.grad``
        (on the last micro-batch of an accumulation, see the class docstring); returns the
        summed loss (scaled for accumulation, as the Trainer's), detached, for logging."""
        self._check_supported()
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                losses, outputs = self.compute_task_losses(model, inputs, num_items_in_batch)
            checked = self._checked_losses(losses, outputs, training=True)
            assert checked is not None
            features = self._features(outputs)
            del inputs, outputs, losses
            if (
                self.args.torch_empty_cache_steps is not None
                and self.state.global_step % self.args.torch_empty_cache_steps == 0
            ):
                from accelerate.utils.memory import clear_device_cache

                clear_device_cache()
            if not self._losses_scaled_for_accumulation(num_items_in_batch):
                steps = self.current_gradient_accumulation_steps
                checked = {name: loss / steps for name, loss in checked.items()}
            self._backward(checked, features)
            detached = {name: loss.detach() for name, loss in checked.items()}
            for name, loss in detached.items():
                total = self._task_loss_sums.get(name)
                self._task_loss_sums[name] = loss if total is None else total + loss
            return torch.stack([loss.to(torch.float32) for loss in detached.values()]).sum()

    def _losses_scaled_for_accumulation(self, num_items_in_batch: Tensor | int | None) -> bool:
        """Trainer.training_step's rule: the losses are already divided for the accumulation
        when normalised by ``num_items_in_batch`` (or when ``loss_is_scaled_for_ga`` says so)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)

    def _backward(self, losses: dict[str, Tensor], features: Tensor | list[Tensor] | None) -> None:
        optimizer = self._mtl_optimizer()
        last_micro_batch = self.accelerator.sync_gradients
        record = optimizer.backward(losses, features=features, aggregate=last_micro_batch)
        if last_micro_batch:
            self._optimizer_steps_since_log += 1
            if record is not None:
                self._last_record = record

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs, with ``<task>_loss`` and ``<task>_weight`` added to the training
        logs (those with ``loss`` and ``learning_rate``)."""
        if "loss" in logs and "learning_rate" in logs:
            steps = max(self._optimizer_steps_since_log, 1)
            for name, total in self._task_loss_sums.items():
                logs[f"{name}_loss"] = total.item() / steps
            self._task_loss_sums = {}
            self._optimizer_steps_since_log = 0
            record = self._last_record
            if record is not None and record.weights is not None:
                for name, weight in zip(record.names, record.weights.tolist()):
                    logs[f"{name}_weight"] = weight
        super().log(logs, start_time)

    # ---- evaluation ---------------------------------------------------------------------------

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Any, Any]:
        """The Trainer's ``prediction_step`` with the loss the sum of the task losses (each
        collected for ``eval_<task>_loss``) and the predictions every output entry but the
        losses and the features."""
        has_labels = bool(self.label_names) and all(
            inputs.get(name) is not None for name in self.label_names
        )
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = (
                getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config else []
            )
        labels = None
        if has_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in self.label_names))
            if len(labels) == 1:
                labels = labels[0]
        with torch.no_grad():
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
            cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
            with self.compute_loss_context_manager(), cp_context():
                losses, outputs = self.compute_task_losses(model, inputs, num_items_in_batch)
            checked = self._checked_losses(losses, outputs, training=False)
        loss = None
        if checked is not None:
            values = torch.stack([v.detach().to(torch.float32) for v in checked.values()])
            self._collect_eval_losses(values, inputs)
            loss = values.sum()
        if prediction_loss_only:
            return loss, None, None
        skip = {*ignore_keys, "loss", self.losses_key, self.features_key}
        if isinstance(outputs, Mapping):
            predictions: Any = tuple(v for k, v in outputs.items() if k not in skip)
        elif isinstance(outputs, (tuple, list)):
            predictions = tuple(outputs)
        else:
            predictions = (outputs,)
        predictions = nested_detach(predictions)
        if len(predictions) == 1:
            predictions = predictions[0]
        elif not predictions:
            predictions = None
        return loss, predictions, labels

    def _collect_eval_losses(self, values: Tensor, inputs: dict[str, Any]) -> None:
        if self._eval_task_losses is None:
            return  # prediction_step called outside evaluation_loop
        # The weighting of the Trainer's eval loss (each batch's loss repeated batch_size times,
        # gathered over the ranks), so that the eval loss is the sum of the task losses.
        batch_size = self.args.eval_batch_size or find_batch_size(inputs) or 1
        rows = self.gather_function(values.repeat(batch_size, 1))
        self._eval_task_losses.append(rows.detach().cpu())

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop, with ``<prefix>_<task>_loss`` added to the metrics."""
        self._eval_task_losses = []
        try:
            output = super().evaluation_loop(*args, **kwargs)
            collected = self._eval_task_losses
        finally:
            self._eval_task_losses = None
        if collected and self.task_names is not None:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            rows = torch.cat(collected).to(torch.float64)
            for name, column in zip(self.task_names, rows.unbind(1)):
                finite = column[torch.isfinite(column)]
                if self.args.logging_nan_inf_filter and finite.numel():
                    column = finite
                output.metrics[f"{prefix}_{name}_loss"] = column.mean().item()
        return output


def _find_mtl_optimizer(optimizer: Any) -> MTLOptimizer | None:
    """The MTLOptimizer inside accelerate's ``AcceleratedOptimizer`` wrapping (or itself)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, MTLOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None
