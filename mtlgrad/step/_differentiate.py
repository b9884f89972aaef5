"""Per-task gradients: the engines behind :func:`mtlgrad.backward`.

- ``"loop"``: one backward per task (``retain_graph``), with only the shared parameters and that
  task's own parameters as inputs.
- ``"batched"``: one vmapped backward over all tasks (``is_grads_batched=True``), in chunks of
  tasks to bound memory.
- the ``features`` level (MGDA-UB style): the same engines, with the shared representation in
  place of the shared parameters; :func:`mtlgrad.backward` then runs one backward through the
  trunk with the combined gradient.

The per-task gradients are the tensors autograd produces: nothing is copied or concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["leaf_tensors", "task_gradients"]


def leaf_tensors(roots: Sequence[Tensor], stop_at: Sequence[Tensor] = ()) -> list[Tensor]:
    """Leaf tensors that require grad and that ``roots`` depend on, in discovery order.

    The walk does not descend below the tensors of ``stop_at`` (e.g. the shared features, so
    that the trunk's parameters are not found).
    """
    stops = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    seen_nodes: set = set()
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes or node in stops:
            continue
        seen_nodes.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def task_gradients(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    engine: str,
    retain_graph: bool,
    batch_size: int | None = None,
    task_inputs: Sequence[Sequence[Tensor]] | None = None,
) -> tuple[list[list[Tensor | None]], list[list[Tensor | None]]]:
    """Per-task gradients: ``(grads, task_grads)``.

    ``grads[t][k]`` is the gradient of ``losses[t]`` with respect to ``inputs[k]`` (``None`` where
    the loss does not depend on that input). ``task_inputs[t]`` are inputs of task t alone (its
    heads): the loop engine differentiates them in the same backward, at no extra cost, into
    ``task_grads[t]``; the batched engine leaves them to the caller (``task_grads`` is empty).
    """
    if engine == "loop":
        return _loop(losses, inputs, retain_graph, task_inputs)
    if engine == "batched":
        return _batched(losses, inputs, retain_graph, batch_size), []
    raise ValueError(f"engine must be 'loop' or 'batched', got {engine!r}")


def _loop(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    retain_graph: bool,
    task_inputs: Sequence[Sequence[Tensor]] | None,
) -> tuple[list[list[Tensor | None]], list[list[Tensor | None]]]:
    K = len(inputs)
    grads, task_grads = [], []
    for t, loss in enumerate(losses):
        extra = list(task_inputs[t]) if task_inputs is not None else []
        keep = retain_graph or t < len(losses) - 1
        result = torch.autograd.grad(
            loss, list(inputs) + extra, retain_graph=keep, allow_unused=True
        )
        grads.append(list(result[:K]))
        task_grads.append(list(result[K:]))
    return grads, task_grads


def _batched(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], retain_graph: bool, batch_size: int | None
) -> list[list[Tensor | None]]:
    T = len(losses)
    if not inputs:  # nothing to differentiate (e.g. no shared parameters)
        return [[] for _ in range(T)]
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
    step = T if batch_size is None else max(1, batch_size)
    result: list[list[Tensor | None]] = []
    for start in range(0, T, step):
        rows = eye[start : start + step]
        keep = retain_graph or start + step < T
        try:
            grads = torch.autograd.grad(
                stacked,
                inputs,
                grad_outputs=rows,
                retain_graph=keep,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            raise RuntimeError(
                "engine='batched' could not vmap the backward of this model (some operation has "
                f"no batching rule): {error}\nUse engine='loop', which runs one backward per task."
            ) from error
        for i in range(rows.shape[0]):
            result.append([None if g is None else g[i] for g in grads])
    return result
