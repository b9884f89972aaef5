"""Argument checks of the step: errors that name the task and the parameter."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from mtlgrad.aggregators import Aggregator
from mtlgrad.step._differentiate import ENGINES

__all__ = [
    "check_engine",
    "feature_tensors",
    "named_losses",
    "shared_parameters",
    "task_parameters",
]


def named_losses(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
) -> tuple[list[str], list[Tensor]]:
    """Task names and scalar losses from a sequence, a dict or a 1-D tensor of losses."""
    if isinstance(losses, Mapping):
        names, values = [str(k) for k in losses], list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.dim() == 0:
            raise ValueError(
                "mtlgrad.backward: losses must be a sequence or dict of scalar tensors, or a "
                "tensor of T losses (1-D), or of any shape (each entry a loss: per-sample "
                "losses); got a scalar tensor"
            )
        values = list(losses.reshape(-1).unbind(0))
        if losses.dim() == 1:
            names = [f"task {i}" for i in range(len(values))]
        else:
            names = [
                "losses[" + ", ".join(map(str, index)) + "]"
                for index in itertools.product(*(range(n) for n in losses.shape))
            ]
    else:
        values = list(losses)
        names = [f"task {i}" for i in range(len(values))]
    if not values:
        raise ValueError("mtlgrad.backward: no losses (the task list is empty)")
    if len(set(names)) != len(names):
        raise ValueError(f"mtlgrad.backward: task names must be distinct, got {names}")
    for name, loss in zip(names, values):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"mtlgrad.backward: the loss of {name} must be a scalar, got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                f"mtlgrad.backward: the loss of {name} does not require grad (it is not "
                "differentiable: was it computed under torch.no_grad() or detached?)"
            )
    return names, values


def shared_parameters(shared_params: Iterable[Tensor]) -> list[Tensor]:
    """The shared parameters that require grad (frozen ones are skipped, as torch.optim does)."""
    if isinstance(shared_params, Tensor):
        raise TypeError(
            "shared_params must be an iterable of parameters (e.g. model.trunk.parameters()), "
            "not a single tensor; wrap it in a list"
        )
    params = list(shared_params)
    seen: dict[int, int] = {}
    kept: list[Tensor] = []
    for k, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_params[{k}] is a {type(p).__name__}, not a tensor")
        if id(p) in seen:
            raise ValueError(
                f"shared_params[{k}] is the same tensor as shared_params[{seen[id(p)]}]"
            )
        seen[id(p)] = k
        if not p.is_leaf:
            raise ValueError(
                f"shared_params[{k}] (shape {list(p.shape)}) must be a leaf tensor that requires "
                "grad, like a parameter"
            )
        if not p.requires_grad:
            continue  # frozen
        if kept and p.device != kept[0].device:
            raise ValueError(
                f"shared_params[{k}] is on {p.device} but shared_params[0] is on "
                f"{kept[0].device}; mtlgrad combines gradients on one device"
            )
        kept.append(p)
    return kept


def feature_tensors(
    features: Tensor | Sequence[Tensor] | None, shared: Sequence[Tensor]
) -> list[Tensor] | None:
    if features is None:
        return None
    if not shared:
        raise ValueError(
            "mtlgrad.backward: features were given but shared_params is empty; the features "
            "option backpropagates the combined gradient into the shared parameters"
        )
    feature_list = [features] if isinstance(features, Tensor) else list(features)
    for i, f in enumerate(feature_list):
        if not isinstance(f, Tensor) or not f.requires_grad:
            raise ValueError(f"features[{i}] must be a tensor in the autograd graph")
    return feature_list


def check_engine(engine: Any, aggregator: Aggregator, features: Any) -> None:
    from mtlgrad.aggregators import GramAggregator
    from mtlgrad.step._gram_engine import GramEngine

    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"aggregator must be an mtlgrad Aggregator, got {type(aggregator).__name__}"
        )
    if isinstance(engine, GramEngine):
        if not isinstance(aggregator, GramAggregator):
            raise TypeError(
                f"the gram engine computes the Gram matrix only, and {type(aggregator).__name__} "
                "is not Gram-based: use engine='loop' or engine='batched'"
            )
        if features is not None:
            raise ValueError(
                "features= and the gram engine do not combine: the gram engine already avoids "
                "the per-task gradients of the parameters; pass one or the other"
            )
        return
    if engine == "gram":
        raise ValueError(
            "engine='gram' needs the shared modules hooked before the forward: build "
            "engine = mtlgrad.GramEngine(model) once and pass engine=engine "
            "(MTLOptimizer(..., model=model, engine='gram') does this for you)"
        )
    if engine not in ENGINES:
        raise ValueError(
            f"engine must be one of {', '.join(map(repr, ENGINES))} or a GramEngine; got {engine!r}"
        )


def task_parameters(task_params: Sequence[Iterable[Tensor]], num_tasks: int) -> list[list[Tensor]]:
    if len(task_params) != num_tasks:
        raise ValueError(f"task_params has {len(task_params)} entries for {num_tasks} tasks")
    heads = []
    for t, params in enumerate(task_params):
        own = []
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or not p.is_leaf:
                raise ValueError(f"task_params[{t}][{i}] must be a leaf tensor, like a parameter")
            if p.requires_grad:
                own.append(p)
        heads.append(own)
    return heads
