"""The write stage for a trunk sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a sharded ``DTensor``; its forward computes with unsharded copies
(the autograd graph's leaves), and its backward hooks reduce-scatter their gradients into the
sharded parameters' ``.grad``, averaged over the mesh, during a normal backward only. The
sharded parameters themselves are not in the graph, so ``autograd.grad`` towards them (what the
``loop``, ``batched`` and gram engines do) gets nothing: those are refused with an error
(:func:`check_fsdp`).

With ``features=z`` the task gradients are taken at ``z`` only, the weights come from G as
anywhere else (under torch.distributed, from one T x T all-reduce), and the write is one normal
backward (:func:`write_through_fsdp`), of the roots ``[sum_t c_t L_t, z]`` with the gradients
``[1, d - sum_t c_t g_t]``, where ``g_t`` is task t's gradient at ``z``, ``d = sum_t w_t g_t``
the aggregated one and ``c_t`` 1 (or ``w_t`` with ``scale_task_params``). ``z`` then receives
``d`` in all, and the trunk ``J^T d``; each head, reached by its own task only, receives
``c_t`` times its task's gradient, as the other engines give it. FSDP's hooks fire as for
``loss.backward()``: they reduce-scatter (average) the sharded parameters' gradients, the
trunk's and those of heads sharded by ``fully_shard`` alike. The parameters that FSDP does not
manage (plain heads) keep their gradient of this rank's batch after the backward: one
all-reduce averages them over the ranks, as DDP would.

The only inexactness against the other engines is the rounding of ``d - sum_t c_t g_t`` plus the
engine's own ``sum_t c_t g_t`` at ``z`` (a few units in the last place of the task gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlgrad.step._differentiate import TaskGradients, all_leaves
from mtlgrad.step._write import accumulate_grad

__all__ = ["check_fsdp", "is_sharded_parameter", "write_through_fsdp"]


def is_sharded_parameter(p: Tensor) -> bool:
    """A ``DTensor`` parameter: FSDP2's sharded parameters are (so is any DTensor-based
    parallelism's, which this step treats the same way)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def check_fsdp(shared: Sequence[Tensor], features: Sequence[Tensor] | None) -> bool:
    """Whether the shared parameters are FSDP2-sharded; without ``features`` that is an error
    (raised alike on every rank, before any communication)."""
    sharded = [k for k, p in enumerate(shared) if is_sharded_parameter(p)]
    if not sharded:
        return False
    if features is None:
        k = sharded[0]
        raise NotImplementedError(
            f"mtlgrad.backward: shared_params[{k}] (shape {list(shared[k].shape)}) is a sharded "
            "DTensor, as FSDP2 (torch.distributed.fsdp.fully_shard) makes them. FSDP2 computes "
            "with unsharded copies and reduce-scatters their gradients in its own backward "
            "hooks, so the per-task gradients of the sharded parameters (engine='loop', "
            "'batched', the gram engine, distributed='sharded') cannot be taken. Pass "
            "features=z (the trunk's output, with a Gram-based method under torch.distributed): "
            "the task gradients are taken at z and the trunk gets its gradient from one normal "
            "backward, through FSDP's hooks; or wrap the model in DDP instead of fully_shard"
        )
    return True


def write_through_fsdp(
    grads: TaskGradients,
    aggregation: Any,
    losses: Sequence[Tensor],
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    scale_task_params: bool,
    retain_graph: bool,
    ranks: Any,
) -> None:
    """Stage 3 with FSDP2: one normal backward writes the trunk's and the heads' ``.grad``
    (FSDP averages the sharded ones); the parameters it does not manage are averaged here."""
    if aggregation.skipped:  # a GradScaler overflow on some rank: every rank skips the step
        for p in shared:
            accumulate_grad(p, torch.full_like(p, float("nan")))
        return
    weights = aggregation.weights if scale_task_params else None
    coefficients = [1.0] * len(losses) if weights is None else weights.tolist()
    # Every leaf this backward reaches, except FSDP's sharded parameters (not in the graph):
    # FSDP's unsharded copies, whose gradient its hooks take away, and plain parameters, whose
    # gradient stays. Their .grad is set aside so that this step's part alone is averaged.
    leaves = [p for p in all_leaves(losses) if not is_sharded_parameter(p)]
    kept = [p.grad for p in leaves]
    for p in leaves:
        p.grad = None
    roots: list[Tensor] = [sum(c * loss.reshape(()) for c, loss in zip(coefficients, losses))]
    seeds: list[Tensor] = [torch.ones_like(roots[0])]
    for position, k in enumerate(grads.reached):
        residual = aggregation.out[position].clone()
        for c, per_task in zip(coefficients, grads.level):
            g = per_task[k]
            if g is not None:
                residual.sub_(g, alpha=c)
        roots.append(features[k])
        seeds.append(residual)
    try:
        torch.autograd.backward(roots, grad_tensors=seeds, retain_graph=retain_graph)
    finally:
        fresh = [p.grad for p in leaves]
        for p, g in zip(leaves, kept):
            p.grad = g
    if ranks is not None:
        fresh = _averaged_over_ranks(leaves, fresh, ranks)
    for p, g in zip(leaves, fresh):
        if g is not None:
            accumulate_grad(p, g)


def _averaged_over_ranks(
    leaves: list[Tensor], fresh: list[Tensor | None], ranks: Any
) -> list[Tensor | None]:
    """The gradients left on parameters FSDP does not manage, averaged over the ranks (a rank
    without one contributes zeros); inputs that require grad keep their own, as with DDP."""
    layout = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in leaves)
    ranks.check_same("the parameters reached by the backward", {"leaves": layout})
    parameters = [
        g if isinstance(p, nn.Parameter) else None for p, g in zip(leaves, fresh, strict=True)
    ]
    averaged = ranks.mean_present(parameters, leaves)
    return [
        a if isinstance(p, nn.Parameter) else g
        for p, g, a in zip(leaves, fresh, averaged, strict=True)
    ]
