"""The functional training step: per-task gradients, aggregation, ``.grad``.

record = mtlgrad.backward(losses, shared_params=model.trunk.parameters(), aggregator=UPGrad())
optimizer.step()
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators import Aggregator
from mtlgrad.step._differentiate import leaf_tensors, task_gradients
from mtlgrad.step._record import StepRecord

__all__ = ["StepRecord", "backward"]

ENGINES = ("loop", "batched")


def _named_losses(
    losses: Sequence[Tensor] | Mapping[str, Tensor],
) -> tuple[list[str], list[Tensor]]:
    if isinstance(losses, Mapping):
        names, values = [str(k) for k in losses], list(losses.values())
    elif isinstance(losses, Tensor):
        raise TypeError("losses must be a sequence or dict of scalar tensors, one per task")
    else:
        values = list(losses)
        names = [f"task {i}" for i in range(len(values))]
    if not values:
        raise ValueError("mtlgrad.backward: no losses (the task list is empty)")
    for name, loss in zip(names, values):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"mtlgrad.backward: the loss of {name} must be a scalar, got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                f"mtlgrad.backward: the loss of {name} does not require grad (it is not "
                "differentiable: was it computed under torch.no_grad() or detached?)"
            )
    return names, values


def _shared(shared_params: Iterable[Tensor]) -> list[Tensor]:
    params = list(shared_params)
    seen: dict[int, int] = {}
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_params[{k}] is a {type(p).__name__}, not a tensor")
        if id(p) in seen:
            raise ValueError(
                f"shared_params[{k}] is the same tensor as shared_params[{seen[id(p)]}]"
            )
        seen[id(p)] = k
        if not p.is_leaf or not p.requires_grad:
            raise ValueError(
                f"shared_params[{k}] (shape {list(p.shape)}) must be a leaf tensor that requires "
                "grad, like a parameter"
            )
        if p.device != params[0].device:
            raise ValueError(
                f"shared_params[{k}] is on {p.device} but shared_params[0] is on "
                f"{params[0].device}; mtlgrad combines gradients on one device"
            )
    return params


def _accumulate(param: Tensor, grad: Tensor) -> None:
    """``.grad`` semantics of PyTorch: set when absent, accumulate when present."""
    if param.grad is None:
        param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
    else:
        param.grad.add_(grad)


_warned_constant: set[str] = set()


def backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    shared_params: Iterable[Tensor],
    aggregator: Aggregator,
    features: Tensor | Sequence[Tensor] | None = None,
    engine: str = "loop",
    scaler: torch.amp.GradScaler | None = None,
    task_params: Sequence[Iterable[Tensor]] | None = None,
    scale_task_params: bool = False,
    batch_size: int | None = None,
    retain_graph: bool = False,
) -> StepRecord:
    """Backpropagates T task losses and writes the aggregated gradient into ``.grad``.

    Args:
        losses: one scalar loss per task, as a sequence or a dict (its keys name the tasks in
            errors and in the record).
        shared_params: the parameters shared by the tasks (the trunk). Their per-task gradients
            are combined by ``aggregator`` with the native ``gram`` and ``combine`` ops. May be
            empty when the tasks share nothing (soft parameter sharing): then every parameter
            is a task's own and gets that task's gradient, and nothing is aggregated (the
            record's weights are ones).
        aggregator: any :class:`~mtlgrad.aggregators.Aggregator`.
        features: the shared representation (a tensor or several). When given, the per-task
            gradients are taken with respect to it (MGDA-UB style), aggregated there, and one
            backward through the trunk with the combined gradient fills the shared parameters'
            ``.grad``. Much cheaper for large trunks; exact for Gram-based methods when the
            trunk's Jacobian is the identity, an approximation otherwise (as in the MGDA-UB paper).
        engine: ``"loop"`` (one backward per task) or ``"batched"`` (one vmapped backward).
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

    Returns:
        A :class:`StepRecord` with the weights, Gram matrix, cosines and norms of the step.

    ``.grad`` follows PyTorch: accumulated when it exists (gradient accumulation works), left
    ``None`` on a shared parameter that no task reaches. A non-finite task gradient (without a
    scaler) raises :class:`~mtlgrad.ops.NonFiniteGradientError` naming the task and parameter,
    and leaves every ``.grad`` as it was.
    """
    names, values = _named_losses(losses)
    shared = _shared(shared_params)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}; got {engine!r}")
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be an mtlgrad Aggregator, got {type(aggregator).__name__}"
        )
    T = len(values)
    feature_list = None
    if features is not None and not shared:
        raise ValueError(
            "mtlgrad.backward: features were given but shared_params is empty; the features "
            "engine backpropagates the combined gradient into the shared parameters"
        )
    if features is not None:
        feature_list = [features] if isinstance(features, Tensor) else list(features)
        for i, f in enumerate(feature_list):
            if not isinstance(f, Tensor) or not f.requires_grad:
                raise ValueError(f"features[{i}] must be a tensor in the autograd graph")

    scale = None
    if scaler is not None and scaler.is_enabled():
        scale = scaler.get_scale()
        values_for_grad = [scaler.scale(v) for v in values]
    else:
        values_for_grad = values
    loss_values = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values])

    shared_ids = {id(p) for p in shared}
    if task_params is None:
        stop = feature_list or []
        heads = [[p for p in leaf_tensors([v], stop) if id(p) not in shared_ids] for v in values]
    else:
        if len(task_params) != T:
            raise ValueError(f"task_params has {len(task_params)} entries for {T} tasks")
        heads = [list(ps) for ps in task_params]

    level = feature_list if feature_list is not None else shared
    K = len(level)
    all_heads: list[Tensor] = []
    seen_heads: set[int] = set()
    for hs in heads:
        for h in hs:
            if id(h) not in seen_heads:
                seen_heads.add(id(h))
                all_heads.append(h)

    # Per-task gradients of the shared level (and, for the loop engine, of the heads: free).
    keep_graph = (
        retain_graph or feature_list is not None or (engine == "batched" and bool(all_heads))
    )
    per_task, head_grads = task_gradients(
        values_for_grad,
        level,
        engine=engine,
        retain_graph=keep_graph,
        batch_size=batch_size,
        task_inputs=heads,
    )

    # Inputs no task reaches keep .grad None; an input some tasks miss counts as zero for them.
    used = [k for k in range(K) if any(per_task[t][k] is not None for t in range(T))]
    for t in range(T):
        constant = used and all(per_task[t][k] is None for k in used)
        if constant and names[t] not in _warned_constant:
            _warned_constant.add(names[t])
            warnings.warn(
                f"mtlgrad.backward: the loss of {names[t]} does not depend on the shared "
                "parameters; its shared gradient is zero",
                stacklevel=2,
            )
    flat: list[Tensor] = []
    for t in range(T):
        for k in used:
            g = per_task[t][k]
            flat.append(torch.zeros_like(level[k]) if g is None else g)
    level_names = (
        [f"features[{k}]" for k in used]
        if feature_list is not None
        else [f"shared_params[{k}] (shape {list(shared[k].shape)})" for k in used]
    )

    record = StepRecord(names, None, None, losses=loss_values)
    if not used:
        weights = torch.ones(T, dtype=torch.float64)
        combined: list[Tensor] = []
    else:
        if scale is None:
            aggregation = aggregator.aggregate(flat, T, names=level_names, losses=loss_values)
            combined, weights, record.gram = aggregation.out, aggregation.weights, aggregation.gram
        else:
            combined, weights = _aggregate_scaled(aggregator, flat, T, scale, loss_values, record)
    record.weights = weights

    # Shared parameters.
    if feature_list is None:
        for k, d in zip(used, combined):
            _accumulate(shared[k], d)
    elif record.skipped:
        for p in shared:
            _accumulate(p, torch.full_like(p, float("nan")))
    elif used:
        torch.autograd.backward(
            [feature_list[k] for k in used],
            grad_tensors=combined,
            inputs=shared,
            retain_graph=retain_graph,
        )

    # Heads: their own task's gradient, unweighted unless asked (the weights are read on the host
    # only then).
    scaled = scale_task_params and weights is not None
    w = weights.tolist() if scaled else [1.0] * T
    if engine == "loop":
        for t in range(T):
            for h, g in zip(heads[t], head_grads[t]):
                if g is not None:
                    _accumulate(h, g * w[t] if scaled else g)
    elif all_heads:
        coefficients = w
        total = sum(c * v for c, v in zip(coefficients, values_for_grad))
        grads = torch.autograd.grad(total, all_heads, retain_graph=retain_graph, allow_unused=True)
        for h, g in zip(all_heads, grads):
            if g is not None:
                _accumulate(h, g)
    return record


def _aggregate_scaled(
    aggregator: Aggregator,
    flat: list[Tensor],
    T: int,
    scale: float,
    loss_values: Tensor,
    record: StepRecord,
) -> tuple[list[Tensor], Tensor | None]:
    """Aggregation under a GradScaler: weights from the unscaled Gram matrix, applied to the
    scaled gradients (so ``.grad`` is scaled, as ``scaler.step`` expects)."""
    from mtlgrad.aggregators import GramAggregator

    if not isinstance(aggregator, GramAggregator):
        inverse = 1.0 / scale
        unscaled = [g * inverse for g in flat]
        aggregation = aggregator.aggregate(unscaled, T, losses=loss_values)
        if not all(torch.isfinite(o).all() for o in aggregation.out):
            record.skipped = True
        return [o * scale for o in aggregation.out], aggregation.weights
    G_scaled, nonfinite = torch.ops.mtlgrad.gram(flat, T)
    if bool((nonfinite >= 0).any()):
        record.skipped = True
        return [torch.full_like(g, float("nan")) for g in flat[: len(flat) // T]], None
    G = G_scaled / (scale * scale)
    record.gram = G
    weights = aggregator.weights(G, loss_values)
    return ops.combine(flat, T, weights.to(flat[0].device)), weights
