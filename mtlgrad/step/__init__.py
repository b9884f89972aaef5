"""The training step: differentiate, aggregate, write.

``mtlgrad.backward(losses, shared_params=..., aggregator=...)`` runs the three stages:

- differentiate (:mod:`mtlgrad.step._differentiate`): one walk of the autograd graph, then the
  per-task gradients of the shared level (parameters, or the ``features``) and of each task's own
  parameters, from the ``loop`` or ``batched`` engine, as one :class:`TaskGradients` object;
- aggregate: the aggregator's :meth:`~mtlgrad.aggregators.Aggregator.aggregate` (G, weights, the
  GradScaler's overflow check) into the shared ``.grad`` in one pass;
- write (:mod:`mtlgrad.step._write`): the heads' own gradients, and for ``features`` one backward
  of the combined gradient through the trunk.
"""

from mtlgrad.step._accumulate import GradientAccumulator
from mtlgrad.step._backward import ENGINES, backward
from mtlgrad.step._distributed import DistributedMismatchError
from mtlgrad.step._gram_engine import GramEngine
from mtlgrad.step._record import StepRecord

__all__ = [
    "ENGINES",
    "DistributedMismatchError",
    "GradientAccumulator",
    "GramEngine",
    "StepRecord",
    "backward",
]
