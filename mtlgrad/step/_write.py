"""Stages 2 and 3 of the step: aggregate the shared level's gradients, write ``.grad``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtlgrad.aggregators import Aggregation, Aggregator
from mtlgrad.ops import NonFiniteGradientError
from mtlgrad.step._differentiate import TaskGradients

__all__ = ["accumulate_grad", "aggregate", "write"]


def aggregate(
    aggregator: Aggregator,
    grads: TaskGradients,
    level: Sequence[Tensor],
    shared: Sequence[Tensor] | None,
    losses: Tensor,
    scale: float | None,
    check_finite: bool = True,
) -> Aggregation:
    """The aggregator on the reached inputs of the shared level; with ``shared`` (the shared
    parameters are the level), the update is added into their ``.grad`` in the same pass."""
    T = len(grads.names)
    for t in grads.unreached_tasks():
        warnings.warn(
            f"mtlgrad.backward: the loss of {grads.names[t]} does not depend on the shared "
            "parameters; its shared gradient is zero",
            stacklevel=3,
        )
    if not grads.reached:
        return Aggregation([], torch.ones(T, dtype=torch.float64), None)
    reached = grads.reached
    if shared is None:
        names = [f"features[{k}]" for k in reached]
        out = None
    else:
        names = [f"shared_params[{k}] (shape {list(shared[k].shape)})" for k in reached]
        out = [shared[k].grad for k in reached]
    try:
        return aggregator.aggregate(
            grads.task_major(level),
            T,
            out,
            names=names,
            losses=losses,
            task_names=grads.names,
            scale=scale,
            accumulate=out is not None,
            check_finite=check_finite,
        )
    except NonFiniteGradientError as error:
        raise _blame(error, grads, level) from None


def _blame(
    error: NonFiniteGradientError, grads: TaskGradients, level: Sequence[Tensor]
) -> NonFiniteGradientError:
    """The batched engine's shared backward carries a NaN or Inf met in one task's part of the
    graph into every task (0 * Inf is NaN): recompute the flagged tasks one at a time to name
    the tasks it came from."""
    if grads.one_task is None or len(error.tasks) < 2:
        return error
    tasks, indices = [], []
    for t in error.tasks:
        own = grads.one_task(t)
        for position, k in enumerate(grads.reached):
            g = own[k]
            if g is not None and not bool(torch.isfinite(g).all()):
                tasks.append(t)
                indices.append(position)
                break
    if not tasks:
        return error
    names = None if error.names is None else _names_of(error, indices)
    return NonFiniteGradientError(tasks, indices, names, [grads.names[t] for t in tasks])


def _names_of(error: NonFiniteGradientError, indices: list[int]) -> list[str] | None:
    known = dict(zip(error.tensor_indices, error.names or []))
    return [known.get(i, f"tensor {i}") for i in indices]


def write(
    grads: TaskGradients,
    aggregation: Aggregation,
    shared: Sequence[Tensor],
    features: Sequence[Tensor] | None,
    scale_task_params: bool,
    retain_graph: bool,
    trunk_mean: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None,
) -> None:
    """The heads, then the shared ``.grad`` (the aggregation added into the existing tensors;
    here the parameters that had none get theirs, or the features' update goes through the
    trunk, last, as it may free the graph)."""
    weights = aggregation.weights if scale_task_params else None
    coefficients = None if weights is None else weights.tolist()
    for t, pairs in enumerate(grads.heads()):
        for p, g in pairs:
            accumulate_grad(p, g if coefficients is None else g * coefficients[t])
    if features is None:  # (None: a parameter another rank writes, in sharded mode)
        for k, d in zip(grads.reached, aggregation.out):
            if d is not None and shared[k].grad is None:
                shared[k].grad = d
    elif aggregation.skipped:
        for p in shared:
            accumulate_grad(p, torch.full_like(p, float("nan")))
    elif grads.reached and trunk_mean is None:
        torch.autograd.backward(
            [features[k] for k in grads.reached],
            grad_tensors=aggregation.out,
            inputs=list(shared),
            retain_graph=retain_graph,
        )
    elif grads.reached:  # this rank's share of the trunk's gradient, averaged over the ranks
        trunk = torch.autograd.grad(
            [features[k] for k in grads.reached],
            list(shared),
            grad_outputs=aggregation.out,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        for p, g in zip(shared, trunk_mean(list(trunk))):
            if g is not None:
                accumulate_grad(p, g)


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """``.grad`` semantics of PyTorch: set when absent, accumulate when present."""
    if param.grad is None:
        param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)
    else:
        param.grad.add_(grad)
