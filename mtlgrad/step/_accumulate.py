"""Gradient accumulation that aggregates once: the per-task gradients of several micro-batches are
summed, and the aggregator sees the sums.

Summing each micro-batch's aggregated update (what ``.grad`` accumulation does when every
micro-batch calls :func:`~mtlgrad.backward` on its own) is not the aggregation of the accumulated
gradients: the weights of a Gram-based method depend on the gradients nonlinearly, and PCGrad's
projections, GradVac's targets and every random draw happen once per micro-batch. A
:class:`GradientAccumulator` holds, for each task, the sum of its gradients of the shared
parameters and of its own parameters, so that the step aggregates as one step on the whole batch
would (up to the order of floating-point additions).

Memory: T times the shared parameters, the cost of the loop engine's per-task gradients kept
across micro-batches. Under torch.distributed, the ranks communicate once, at the aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlgrad.step._differentiate import TaskGradients

__all__ = ["GradientAccumulator"]


class GradientAccumulator:
    """Per-task gradients summed over micro-batches, aggregated once.

    ::

        accumulator = mtlgrad.step.GradientAccumulator()
        for k, batch in enumerate(micro_batches):
            losses = compute_losses(model, batch)                 # already divided by the count
            mtlgrad.backward(losses, shared_params=trunk, aggregator=agg,
                             accumulator=accumulator, aggregate=k == len(micro_batches) - 1)
        optimizer.step()

    With ``aggregate=False`` the step only adds its per-task gradients here (``.grad`` is not
    touched); the call with ``aggregate=True`` adds its own, aggregates the sums, writes
    ``.grad`` and empties the accumulator. :class:`~mtlgrad.optim.MTLOptimizer` holds one:
    ``optimizer.backward(losses, aggregate=False)``.

    Every micro-batch must have the same tasks (names and order) and the same shared
    parameters. ``features=`` and the Gram engine cannot accumulate (a micro-batch's features
    belong to its own graph; the Gram matrix of a sum is not the sum of Gram matrices).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drops what was accumulated."""
        self.count = 0
        self._names: list[str] | None = None
        self._level_ids: list[int] = []
        self._level: list[list[Tensor | None]] = []
        self._heads: list[dict[int, tuple[Tensor, Tensor]]] = []
        self._losses: Tensor | None = None
        self._scale: float | None = None

    def __len__(self) -> int:
        """The number of micro-batches accumulated since the last aggregation."""
        return self.count

    def __repr__(self) -> str:
        return f"GradientAccumulator(micro_batches={self.count}, tasks={self._names})"

    def add(
        self,
        grads: TaskGradients,
        level: Sequence[Tensor],
        losses: Tensor,
        scale: float | None,
    ) -> None:
        """Adds one micro-batch's per-task gradients (and its losses)."""
        heads = grads.heads()  # before anything is kept: the batched engine's graph is alive
        if self.count == 0:
            self._names = list(grads.names)
            self._level_ids = [id(x) for x in level]
            self._level = [list(g) for g in grads.level]
            self._heads = [{id(p): (p, g) for p, g in pairs} for pairs in heads]
            self._losses = losses.clone()
            self._scale = scale
            self.count = 1
            return
        self._check_same(grads.names, level, scale)
        for summed, new in zip(self._level, grads.level):
            for k, g in enumerate(new):
                if g is not None:
                    summed[k] = g if summed[k] is None else summed[k] + g
        for summed_heads, pairs in zip(self._heads, heads):
            for p, g in pairs:
                old = summed_heads.get(id(p))
                summed_heads[id(p)] = (p, g if old is None else old[1] + g)
        assert self._losses is not None
        self._losses = self._losses + losses
        self.count += 1

    def _check_same(
        self, names: Sequence[str], level: Sequence[Tensor], scale: float | None
    ) -> None:
        if list(names) != self._names:
            raise ValueError(
                "mtlgrad.backward: the tasks of this micro-batch are "
                f"{list(names)}, but the accumulated micro-batches had {self._names}; every "
                "micro-batch of one accumulation must have the same tasks, in the same order"
            )
        if [id(x) for x in level] != self._level_ids:
            raise ValueError(
                "mtlgrad.backward: shared_params differ from those of the accumulated "
                f"micro-batches ({len(level)} tensors now, {len(self._level_ids)} before, or "
                "other tensors); pass the same shared parameters for every micro-batch"
            )
        if scale != self._scale:
            raise ValueError(
                f"mtlgrad.backward: the GradScaler's scale changed from {self._scale} to {scale} "
                "within an accumulation; call scaler.update() only after optimizer.step()"
            )

    def take(self) -> tuple[TaskGradients, Tensor, float | None]:
        """The summed gradients, losses and loss scale; empties the accumulator."""
        assert self._names is not None and self._losses is not None
        heads = [list(h.values()) for h in self._heads]
        result = TaskGradients(self._names, self._level, heads)
        losses, scale = self._losses, self._scale
        self.clear()
        return result, losses, scale


def check_accumulation(
    accumulator: GradientAccumulator | None, aggregate: bool, features: object, engine: object
) -> None:
    """Argument checks of :func:`~mtlgrad.backward`'s accumulation."""
    from mtlgrad.step._gram_engine import GramEngine

    if not isinstance(aggregate, bool):
        raise TypeError(f"aggregate must be a bool, got {aggregate!r}")
    if accumulator is None:
        if not aggregate:
            raise ValueError(
                "mtlgrad.backward: aggregate=False needs accumulator= (a "
                "mtlgrad.step.GradientAccumulator that keeps the per-task gradients until the "
                "micro-batch that aggregates); MTLOptimizer.backward(losses, aggregate=False) "
                "holds one for you"
            )
        return
    if not isinstance(accumulator, GradientAccumulator):
        raise TypeError(
            "accumulator must be a mtlgrad.step.GradientAccumulator, got "
            f"{type(accumulator).__name__}"
        )
    if features is not None:
        raise ValueError(
            "mtlgrad.backward: features= cannot accumulate over micro-batches (each "
            "micro-batch's features belong to its own graph); accumulate without features=, or "
            "aggregate every micro-batch"
        )
    if isinstance(engine, GramEngine):
        raise ValueError(
            "mtlgrad.backward: the gram engine cannot accumulate over micro-batches (the Gram "
            "matrix of summed gradients is not the sum of the micro-batches' Gram matrices); use "
            "engine='loop' or 'batched'"
        )
