"""The functional training step: differentiate, aggregate, write.

record = mtlgrad.backward(losses, shared_params=model.trunk.parameters(), aggregator=UPGrad())
optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators import Aggregator
from mtlgrad.step._accumulate import GradientAccumulator, check_accumulation
from mtlgrad.step._checks import (
    check_engine,
    feature_tensors,
    named_losses,
    shared_parameters,
    task_parameters,
)
from mtlgrad.step._differentiate import ENGINES, differentiate, partition
from mtlgrad.step._distributed import ranks_of
from mtlgrad.step._fsdp import check_fsdp, write_through_fsdp
from mtlgrad.step._gram_engine import GramEngine
from mtlgrad.step._overlap import OverlappedLevelMean
from mtlgrad.step._reach import (
    check_features_reached,
    check_shared_below_features,
    warn_shared_reached_by_one_task,
    warn_shared_without_gradient,
)
from mtlgrad.step._record import StepRecord

__all__ = ["ENGINES", "backward"]


def backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
    *,
    shared_params: Iterable[Tensor],
    aggregator: Aggregator,
    features: Tensor | Sequence[Tensor] | None = None,
    engine: str | GramEngine = "loop",
    scaler: torch.amp.GradScaler | None = None,
    task_params: Sequence[Iterable[Tensor]] | None = None,
    scale_task_params: bool = False,
    batch_size: int | None = None,
    retain_graph: bool = False,
    process_group: Any = None,
    distributed: str = "replicated",
    owned_params: Iterable[Tensor] | None = None,
    accumulator: GradientAccumulator | None = None,
    aggregate: bool = True,
    check_finite: bool = True,
) -> StepRecord | None:
    """Backpropagates T task losses and writes the aggregated gradient into ``.grad``.

    Args:
        losses: one scalar loss per task: a sequence, a dict (its keys name the tasks in errors
            and in the record) or a 1-D tensor of T losses; a tensor of any other shape makes
            each entry a loss (per-sample losses, or samples x tasks: an m x m Gram matrix).
        shared_params: the parameters shared by the tasks (the trunk). Their per-task gradients
            are combined by ``aggregator`` with the native ``gram`` and ``combine`` ops. Frozen
            parameters (``requires_grad=False``) are skipped, as ``torch.optim`` does. May be
            empty when the tasks share nothing (soft parameter sharing): then every parameter
            is a task's own and gets that task's gradient, and nothing is aggregated (the
            record's weights are ones).
        aggregator: any :class:`~mtlgrad.aggregators.Aggregator`.
        features: the shared representation (a tensor or several). When given, the per-task
            gradients are taken with respect to it (MGDA-UB style), aggregated there, and one
            backward through the trunk with the combined gradient fills the shared parameters'
            ``.grad``. Much cheaper for large trunks; exact for Gram-based methods when the
            trunk's Jacobian is the identity, an approximation otherwise (as in the MGDA-UB paper).
            With a trunk sharded by FSDP2 (``fully_shard``: DTensor shared parameters) it is the
            only option, and the write is one normal backward whose FSDP hooks reduce-scatter the
            trunk's gradients (:mod:`mtlgrad.step._fsdp`).
        engine: ``"loop"`` (one backward per task), ``"batched"`` (one vmapped backward), or a
            :class:`~mtlgrad.GramEngine` (G layer by layer from activations, then one backward
            of the weighted losses: no per-task gradients of the parameters; Gram-based
            aggregators only).
        scaler: a ``torch.amp.GradScaler``. The losses are scaled, the aggregation sees the
            unscaled gradients, ``.grad`` receives scaled ones (``scaler.step`` unscales them),
            and an overflow in any task writes NaN into the shared ``.grad`` so that
            ``scaler.step`` skips the update and ``scaler.update`` lowers the scale.
        task_params: optional, for each task, its own parameters (heads); by default they are
            found in the autograd graph: the leaves each loss depends on that are not shared
            (and, with ``features``, not below the features).
        scale_task_params: multiply each head's gradient by its task's weight. By default heads
            get their own task's gradient unweighted (libraries differ here: TorchJD and LibMTL
            leave heads unweighted, which keeps each head's training independent of the
            aggregation).
        batch_size: with ``engine="batched"``, at most this many tasks per vmapped backward.
        retain_graph: keep the graph after the step.
        process_group: under ``torch.distributed``, the ranks that hold replicas of the model
            (default: the world group, whenever torch.distributed is initialised with more than
            one rank). Each task's gradients, the heads' gradients and the losses are averaged
            over them before the aggregation, so that every rank computes the same update, that
            of one process on the global batch (:mod:`mtlgrad.step._distributed`; each task's
            all-reduces start as soon as its backward returns; the gram engine averages each
            layer's T gradients during its backward). A trunk sharded by FSDP2 needs
            ``features`` (:mod:`mtlgrad.step._fsdp`).
        distributed: with several ranks, ``"replicated"`` (each task's gradients all-reduced,
            every rank aggregates all of them) or ``"sharded"`` (reduce-scattered: each rank
            aggregates one shard, G from one T x T all-reduce, the update all-gathered: T·P + P
            sent instead of an all-reduce of T·P; Gram-based methods; one buffer per dtype). With
            ``features`` both send the T x T Gram matrix only.
        owned_params: in sharded mode, the shared parameters that this rank's optimizer updates
            (a ``torch.distributed.optim.ZeroRedundancyOptimizer``'s partition, which
            :class:`~mtlgrad.optim.MTLOptimizer` passes by itself). Each rank's shard is then its
            own parameters, and it writes their update alone: nothing is all-gathered, and the
            other shared parameters' ``.grad`` is left as it is (their owners step them and
            broadcast them).
        accumulator: a :class:`~mtlgrad.step.GradientAccumulator`: this micro-batch's per-task
            gradients are added to it, and the aggregation (with ``aggregate=True``) is that of
            the sums, as for one step on all the accumulated micro-batches.
        aggregate: with ``False`` (needs ``accumulator``), only accumulate: no aggregation,
            ``.grad`` untouched, no communication between ranks; returns None.
        check_finite: raise :class:`~mtlgrad.ops.NonFiniteGradientError` for a NaN or Inf task
            gradient (the default). ``False`` drops that host-side check: non-finite values
            propagate into ``.grad`` as with ``loss.backward()``, and the step can be compiled
            with ``torch.compile(fullgraph=True)`` (see the README). A GradScaler's overflow
            check stays.

    Returns:
        A :class:`StepRecord` with the weights, Gram matrix, cosines and norms of the step (None
        with ``aggregate=False``).

    ``.grad`` follows PyTorch: the update is added into an existing ``.grad`` in the same pass
    that computes it (gradient accumulation works), and a shared parameter that no task reaches
    keeps ``None``. A non-finite task gradient (without a scaler) raises
    :class:`~mtlgrad.ops.NonFiniteGradientError` naming the task and parameter, and leaves every
    ``.grad`` as it was. A shared parameter that only one task's loss reaches (a head passed as
    shared, e.g. ``model.parameters()``) is warned about.
    """
    names, values = named_losses(losses)
    shared = shared_parameters(shared_params)
    feature_list = feature_tensors(features, shared)
    fsdp = check_fsdp(shared, feature_list)  # FSDP2-sharded trunk: only with features=
    check_engine(engine, aggregator, features)
    check_accumulation(accumulator, aggregate, features, engine)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    parts = None
    if task_params is None:
        parts = partition(values, shared=shared, features=feature_list or ())
        if feature_list is not None:
            check_features_reached(feature_list, parts=parts)
            check_shared_below_features(parts, names)
        warn_shared_reached_by_one_task(parts, names)
        heads = parts.heads
    else:
        heads = task_parameters(task_params, len(values))
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    scaled = values if scale is None else [scaler.scale(v) for v in values]  # type: ignore[union-attr]
    level = shared if feature_list is None else feature_list
    ranks = ranks_of(process_group, distributed)
    owned = None if owned_params is None else list(owned_params)
    if owned is not None and distributed != "sharded":
        raise ValueError(
            "mtlgrad.backward: owned_params= is for distributed='sharded' (each rank's shard is "
            f"then its own parameters), got distributed={distributed!r}"
        )
    if not aggregate:
        ranks = None  # accumulating only: nothing is sent
    if ranks is not None:
        if isinstance(losses, Tensor) and losses.dim() > 1:
            raise NotImplementedError(
                "mtlgrad.backward under torch.distributed (more than one rank): losses of shape "
                f"{list(losses.shape)} make each entry a loss (per-sample losses), and the ranks' "
                "samples are different losses, which averaging over the ranks would mix up; pass "
                "one loss per task (a sequence, a dict or a 1-D tensor)"
            )
        ranks.check_supported(engine, feature_list, aggregator)
        ranks.check_step(names, level, aggregator, scale, features=feature_list is not None)
    gram_engine = isinstance(engine, GramEngine)
    # Replicated mode: each task's all-reduces start as soon as its backward returns. Not with
    # an accumulator (the sums are known at the end only), the features (not sent) nor the gram
    # engine (its own per-layer averages).
    level_mean = None
    if (
        ranks is not None
        and not ranks.sharded
        and feature_list is None
        and accumulator is None
        and not gram_engine
    ):
        level_mean = OverlappedLevelMean(ranks, level)

    # 1. Differentiate: per-task gradients of the shared level and of each task's parameters
    #    (the gram engine: G itself, layer by layer).
    if gram_engine:
        grads = engine.differentiate(
            names, scaled, shared, heads, retain_graph=retain_graph, ranks=ranks
        )
    else:
        grads = differentiate(
            names,
            scaled,
            level,
            [[] for _ in values] if fsdp else heads,  # with FSDP2: from the final backward
            engine=engine,
            retain_graph=retain_graph or feature_list is not None,
            batch_size=batch_size,
            on_tasks=None if level_mean is None else level_mean.add,
        )
    if feature_list is not None:
        check_features_reached(feature_list, grads=grads)
    elif parts is not None and not gram_engine:
        warn_shared_without_gradient(parts, grads, names)
    losses64 = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])
    if accumulator is not None:  # the sums over the micro-batches, aggregated once
        accumulator.add(grads, level, losses64, scale)
        if not aggregate:
            return None
        grads, losses64, scale = accumulator.take()
    if ranks is not None:  # every rank: the gradients and losses of the global batch
        # (not the features', each rank's own; sharded mode's are reduce-scattered at the
        # aggregation; the gram engine's G is already that of the averaged gradients; with the
        # overlap, started during the backward passes)
        average_level = feature_list is None and not ranks.sharded and not gram_engine
        losses64 = ranks.average(
            grads, level, losses64, average_level=average_level, started=level_mean
        )
    # 2. Aggregate: G, the weights and the update, added into the shared .grad in one pass (for
    #    the features, a fresh gradient of the features).
    trunk_mean = None
    if ranks is not None and (feature_list is not None or gram_engine):
        # the one backward of the write stage (through the trunk from the features, or of
        # Σ_t w_t L_t for the gram engine) gives this rank's share: averaged over the ranks
        trunk_mean = lambda trunk: ranks.mean_present(trunk, shared)  # noqa: E731
    if ranks is not None and feature_list is not None:  # the global batch's G: T x T summed
        aggregation = ranks.aggregate_features(
            aggregator, grads, feature_list, losses64, scale, check_finite
        )
    elif ranks is not None and ranks.sharded:  # each rank aggregates its shard of every task
        aggregation = ranks.aggregate_sharded(
            aggregator, grads, shared, losses64, scale, check_finite, owned
        )
    else:
        aggregation = grads.aggregate(
            aggregator,
            level,
            shared if feature_list is None else None,
            losses64,
            scale,
            check_finite,
        )
    # 3. Write: the heads get their own task's gradient; for the features (and the gram
    #    engine), one backward through the trunk (under torch.distributed, averaged; with an
    #    FSDP2-sharded trunk, one normal backward that FSDP's hooks reduce-scatter).
    if fsdp:
        assert feature_list is not None
        write_through_fsdp(
            grads, aggregation, scaled, feature_list, shared, scale_task_params, retain_graph, ranks
        )
    else:
        grads.write(aggregation, shared, feature_list, scale_task_params, retain_graph, trunk_mean)
    losses_record = aggregation.losses if aggregation.losses is not None else losses64
    return StepRecord(
        names, aggregation.weights, aggregation.gram, aggregation.skipped, losses_record
    )
