"""What the graph says against what the step was told: errors and warnings instead of a step that
leaves parameters without their gradient, without a word.

- a shared parameter that a loss uses above the ``features`` (between them and the loss: BERT's
  pooler with ``features=last_hidden_state``) would get no gradient: an error;
- a feature that no loss reaches (the model compiled with ``torch.compile``, or wrapped in DDP
  with ``find_unused_parameters=True`` or ``static_graph=True``: the features and the outputs
  then leave the model through one autograd node, and no loss passes through the features):
  an error;
- a shared parameter that the walk sees a loss reach but that gets no gradient from any task:
  a warning (an autograd Function may mean it, returning None for it);
- a shared parameter that one task alone reaches (a head passed as shared): a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor

from mtlgrad.step._differentiate import Partition, TaskGradients

__all__ = [
    "check_features_reached",
    "check_shared_below_features",
    "warn_shared_reached_by_one_task",
    "warn_shared_without_gradient",
]


def _describe(p: Tensor, k: int) -> str:
    return f"shared_params[{k}] (shape {list(p.shape)})"


def check_shared_below_features(parts: Partition, names: Sequence[str]) -> None:
    """With ``features``, a shared parameter that a loss reaches without passing through them is
    used above the features, where the combined gradient (sent down from the features) never
    goes."""
    for k, (p, tasks) in enumerate(zip(parts.shared, parts.above_features or [])):
        if tasks:
            users = ", ".join(repr(names[t]) for t in tasks)
            raise ValueError(
                f"mtlgrad.backward: {_describe(p, k)} is used by the loss of {users} above the "
                "features (between the features and the loss, like BERT's pooler with "
                "features=last_hidden_state): the aggregated gradient goes from the features "
                "down into the trunk, so this parameter would get no gradient. Pass as features "
                "a tensor computed after it (e.g. the pooler's output), or pass shared_params "
                "without it (each task then adds its own gradient to it, unweighted)"
            )


def _likely_cause(feature: Tensor) -> str:
    node = type(feature.grad_fn).__name__ if feature.grad_fn is not None else ""
    if "Compiled" in node:
        return (
            " This feature comes out of a torch.compile'd graph (its grad_fn is "
            f"{node}), together with the outputs: autograd sees the losses reach the compiled "
            "graph, not this feature. Compile the trunk and the heads separately (so that the "
            "features leave one compiled module and enter the next), or drop features="
        )
    if "DDPSink" in node:
        return (
            f" This feature leaves a DistributedDataParallel model through {node} together "
            "with the outputs (DDP does this with find_unused_parameters=True or "
            "static_graph=True): no loss passes through it. Return the features from the "
            "trunk and wrap only what is needed, use DDP without those options, or drop "
            "features="
        )
    return (
        " Pass the tensor the heads compute their outputs from (the trunk's output), from the "
        "same forward as the losses"
    )


def check_features_reached(
    features: Sequence[Tensor],
    grads: TaskGradients | None = None,
    parts: Partition | None = None,
) -> None:
    """Every feature tensor must be reached by some task's loss: by the walk (``parts``, before
    the engines run) or by the gradients (``grads``: a compiled graph or DDP's output node
    reaches the walk but passes no gradient to the feature)."""
    for k, feature in enumerate(features):
        if parts is not None and parts.feature_reach is not None:
            unreached = not parts.feature_reach[k]
        else:
            assert grads is not None
            unreached = k not in grads.reached
        if unreached:
            raise ValueError(
                f"mtlgrad.backward: no task's loss depends on features[{k}] (shape "
                f"{list(feature.shape)}), so the shared parameters would get no gradient "
                "through it." + _likely_cause(feature)
            )


def warn_shared_without_gradient(
    parts: Partition, grads: TaskGradients, names: Sequence[str]
) -> None:
    """A shared parameter that the walk sees some loss reach, with no gradient from any task
    (not among the gradients' ``reached`` inputs)."""
    reached = set(grads.reached)
    for k, (p, tasks) in enumerate(zip(parts.shared, parts.reach or [])):
        if tasks and k not in reached:
            users = ", ".join(repr(names[t]) for t in tasks)
            warnings.warn(
                f"mtlgrad.backward: {_describe(p, k)} is used by the loss of {users}, but "
                "autograd gives it no gradient from any task (an autograd Function returning "
                "None for it?); its .grad is left as it was",
                stacklevel=3,
            )
            return


def warn_shared_reached_by_one_task(parts: Partition, names: Sequence[str]) -> None:
    """A shared parameter that one task alone reaches is most likely that task's head passed as
    shared (``shared_params=model.parameters()``): its gradient would be reweighted by the
    aggregation, and it would change the weights, without a word."""
    if len(names) < 2 or not parts.reach:
        return
    for k, (p, tasks) in enumerate(zip(parts.shared, parts.reach)):
        if len(tasks) == 1:
            warnings.warn(
                f"mtlgrad.backward: {_describe(p, k)} is reached by "
                f"the loss of {names[tasks[0]]!r} only: it looks like that task's own parameter "
                "(a head). Its gradient is aggregated with the others' and changes the weights; "
                "pass only the parameters the tasks share (e.g. model.trunk.parameters()), or "
                "task_params",
                stacklevel=3,
            )
            return
