"""Pytorch-PCGrad's optimizer wrapper, on mtlgrad's PCGrad.

`Pytorch-PCGrad <https://github.com/WeiChengTseng/Pytorch-PCGrad>`_ wraps an optimizer::

    optimizer = PCGrad(optim.Adam(net.parameters()))
    optimizer.zero_grad()
    optimizer.pc_backward(losses)   # a list of scalar losses
    optimizer.step()

Changing its import to ``from mtlgrad.compat.pcgrad import PCGrad`` keeps that loop as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import aggregators
from mtlgrad.step import StepRecord, backward
from mtlgrad.step._checks import named_losses
from mtlgrad.step._differentiate import partition

__all__ = ["PCGrad"]

REDUCTIONS = ("mean", "sum")


class PCGrad:
    """Pytorch-PCGrad's ``PCGrad(optimizer, reduction="mean")``, computed by mtlgrad.

    Pytorch-PCGrad (https://github.com/WeiChengTseng/Pytorch-PCGrad) flattens each task's
    gradient over **all** the optimizer's parameters (a parameter a task does not reach counts as
    zeros), projects every task gradient ``g_i`` against the other tasks' original gradients in a
    random order (when ``g_i^PC · g_j < 0``: ``g_i^PC -= (g_i^PC · g_j) / ||g_j||² g_j``), then
    merges: on the parameters that every task reaches, the ``reduction`` of the projected
    gradients (``"mean"``, its default, or ``"sum"``); on the others, their sum. It writes every
    parameter's ``.grad`` (zeros where no task reaches it), replacing what was there.

    Here the projections are mtlgrad's native :class:`~mtlgrad.aggregators.PCGrad` (Yu et al.
    2020, Algorithm 1, run on the Gram matrix) over the same flattened vector: every parameter
    of the optimizer that requires grad is passed to :func:`mtlgrad.backward` as shared, so the
    dot products and norms include the heads exactly as Pytorch-PCGrad's do, and the projected
    gradients are summed into ``.grad``; the parameters every task reaches (found in the autograd
    graph, as Pytorch-PCGrad finds them by ``.grad is None``) are then divided by T for
    ``"mean"``. Which tasks reach a parameter is decided per parameter, as there.

    Where it matches Pytorch-PCGrad exactly: for the same visiting orders, the update of every
    parameter (the tests compare with a float64 re-implementation over all orders); ``.grad``
    is replaced, not accumulated, and is zeros on a trainable parameter no task reaches (so
    weight decay and momentum act on it as there); ``zero_grad``, ``step`` and ``optimizer``.

    Where it differs:

    - The random visiting orders come from a ``torch.Generator`` (``generator``, or one of this
      object's own, seeded once from torch's global RNG), not from Python's ``random`` module:
      ``torch.manual_seed`` reproduces a run, ``random.seed`` does not, and a run does not draw
      the same orders as Pytorch-PCGrad's. The generator's state is in :meth:`state_dict`.
    - Each task is projected against the *other* tasks (the paper's ``B \\ {g_i}``).
    - A zero gradient ``g_j`` is never projected against (it conflicts with nothing).
    - Parameters with ``requires_grad=False`` are left alone (``.grad`` stays as it is).
    - The task gradients are taken with ``torch.autograd.grad`` (one backward per task, graph
      freed after the last): leaves outside the optimizer receive no ``.grad``.
    - The step runs through :func:`mtlgrad.backward`: a NaN/Inf gradient raises
      :class:`~mtlgrad.ops.NonFiniteGradientError` naming the task and parameter, and
      :meth:`pc_backward` returns the step's :class:`~mtlgrad.StepRecord` (weights, Gram
      matrix, cosines, over the flattened vector; the weights are those of the summed projected
      gradients, before the ``"mean"`` division), where Pytorch-PCGrad returns nothing.

    mtlgrad's own training path (:class:`~mtlgrad.optim.MTLOptimizer` with
    :class:`~mtlgrad.aggregators.PCGrad`) projects the shared parameters' gradients only and
    gives each head its own task's gradient, untouched; use it when you do not need
    Pytorch-PCGrad's numbers.

    Args:
        optimizer: the optimizer to wrap.
        reduction: ``"mean"`` (default) or ``"sum"``, for the parameters every task reaches.
        generator: the source of the random visiting orders (keyword only; not in
            Pytorch-PCGrad).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reduction: str = "mean",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"PCGrad: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"PCGrad: reduction must be one of {', '.join(map(repr, REDUCTIONS))}; "
                f"got {reduction!r}"
            )
        self._optim = optimizer
        self._reduction = reduction
        self.aggregator = aggregators.PCGrad(generator=generator)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer (Pytorch-PCGrad's ``.optimizer``)."""
        return self._optim

    @property
    def reduction(self) -> str:
        return self._reduction

    def zero_grad(self) -> None:
        """Sets every gradient to ``None`` (``optimizer.zero_grad(set_to_none=True)``)."""
        self._optim.zero_grad(set_to_none=True)

    def step(self) -> Any:
        """The wrapped optimizer's step."""
        return self._optim.step()

    def pc_backward(self, objectives: Sequence[Tensor] | Mapping[str, Tensor]) -> StepRecord:
        """Writes the PCGrad update of the task losses ``objectives`` into every ``.grad``.

        ``objectives`` is a list of scalar losses, one per task (a dict works too: its keys
        name the tasks in errors and in the record).
        """
        params = [
            p for group in self._optim.param_groups for p in group["params"] if p.requires_grad
        ]
        if not params:
            raise ValueError("PCGrad.pc_backward: the optimizer has no parameter requiring grad")
        _, values = named_losses(objectives)
        T = len(values)
        # Who reaches which parameter (Pytorch-PCGrad's mask: a .grad that is not None).
        reach = partition(values, shared=params).reach or [[] for _ in params]
        for p in params:
            p.grad = None  # replaced, not accumulated, as Pytorch-PCGrad does
        record = backward(
            objectives,
            shared_params=params,
            aggregator=self.aggregator,
            task_params=[[] for _ in range(T)],
        )
        with torch.no_grad():
            for p, tasks in zip(params, reach):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif self._reduction == "mean" and len(tasks) == T:
                    p.grad.div_(T)
        return record

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and the generator's (the random visiting orders)."""
        return {"optimizer": self._optim.state_dict(), "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a dict returned by :meth:`state_dict`."""
        missing = {"optimizer", "aggregator"} - set(state_dict)
        if missing:
            raise ValueError(f"PCGrad.load_state_dict: missing {sorted(missing)}")
        self._optim.load_state_dict(state_dict["optimizer"])
        self.aggregator.load_state_dict(state_dict["aggregator"])

    def __repr__(self) -> str:
        return f"PCGrad({self._optim!r}, reduction={self._reduction!r})"
