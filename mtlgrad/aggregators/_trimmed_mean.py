from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators._base import Aggregation, Aggregator, fill_nan
from mtlgrad.ops._checks import check_outputs, check_task_grads

# At most this many values (T x a slice of one tensor) are sorted at once: the sort's values and
# indices stay a few tens of MB whatever the model's size.
_CHUNK_VALUES = 1 << 21


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, ICML 2018,
    `Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates
    <https://proceedings.mlr.press/v80/yin18a.html>`_, Definition 2).

    For every coordinate of the shared parameters, the T tasks' values are sorted, the
    ``trim_number`` largest and the ``trim_number`` smallest are removed, and the update is the
    mean of the ``T − 2 trim_number`` values left. The paper trims a fraction β of the values on
    each side; like TorchJD's ``TrimmedMean``, this class takes the count ``trim_number`` = βT,
    and needs ``T >= 2 trim_number + 1``. With ``trim_number = 0`` it is the mean.

    Elementwise, not Gram-based (no ``weights``): every coordinate keeps its own tasks. It works
    tensor by tensor on the task-major lists, sorting the T values of a slice of at most ~2M
    values at a time (``torch.sort`` over the task dimension), so memory stays bounded and
    nothing is concatenated across parameters. Half-precision gradients are averaged in float32;
    the update has the gradients' dtype. Gradients holding NaN or Inf raise
    :class:`~mtlgrad.ops.NonFiniteGradientError` before anything is written (with
    ``check_finite=False``, they are sorted as ``torch.sort`` does, NaN last, and may be trimmed
    away or reach the update).

    Permutation invariant (exactly) and linear under positive scaling, so under a GradScaler the
    scaled gradients give the scaled update. Meant for robustness to outlying task gradients:
    it is not a conflict-resolution method.

    Args:
        trim_number: the number of values removed on each side of every coordinate (>= 0).
    """

    def __init__(self, trim_number: int) -> None:
        if not isinstance(trim_number, int) or isinstance(trim_number, bool) or trim_number < 0:
            raise ValueError(f"trim_number must be a non-negative int, got {trim_number!r}")
        self.trim_number = trim_number

    def _hyperparameters(self) -> dict[str, Any]:
        return {"trim_number": self.trim_number}

    def aggregate(
        self,
        grads: Sequence[Tensor],
        num_tasks: int,
        out: Sequence[Tensor | None] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
        *,
        task_names: Sequence[str] | None = None,
        scale: float | None = None,
        accumulate: bool = False,
        check_finite: bool = True,
    ) -> Aggregation:
        grads = [g.detach() for g in grads]
        K = check_task_grads("TrimmedMean", grads, num_tasks, per_tensor_dtypes=True)
        if num_tasks < 2 * self.trim_number + 1:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) needs at least 2 * trim_number + 1 "
                f"= {2 * self.trim_number + 1} tasks, got {num_tasks}"
            )
        if task_names is not None and len(task_names) != num_tasks:
            raise ValueError(f"TrimmedMean: got {len(task_names)} task names for {num_tasks} tasks")
        if out is not None:
            out = list(out)
            # A None entry is allocated: check the others against the gradients' tensors.
            check_outputs(
                "TrimmedMean", grads, K, [grads[k] if o is None else o for k, o in enumerate(out)]
            )
        if check_finite or scale is not None:
            nonfinite = _first_nonfinite(grads, num_tasks, K)
            if bool((nonfinite >= 0).any()):
                if scale is None:
                    ops._raise_nonfinite(nonfinite, names, task_names)
                return Aggregation(fill_nan(grads, num_tasks, out), None, None, skipped=True)
        result: list[Tensor] = []
        for k in range(K):
            update = self._trimmed_mean([grads[t * K + k] for t in range(num_tasks)])
            target = None if out is None else out[k]
            if target is None:
                result.append(update)
            elif accumulate:
                result.append(target.add_(update))
            else:
                result.append(target.copy_(update))
        return Aggregation(result, None, None)

    def _trimmed_mean(self, column: list[Tensor]) -> Tensor:
        """The trimmed mean over the tasks of one tensor (the T tasks' versions of it)."""
        T, b = len(column), self.trim_number
        first = column[0]
        flats = [g.reshape(-1) for g in column]
        n = flats[0].numel()
        accumulator = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else None
        update = torch.empty(n, dtype=first.dtype, device=first.device)
        step = max(1, _CHUNK_VALUES // T)
        for start in range(0, n, step):
            stop = min(n, start + step)
            values = torch.stack([f[start:stop] for f in flats])
            if b > 0:
                values = values.sort(dim=0).values[b : T - b]
            kept = values if accumulator is None else values.to(accumulator)
            update[start:stop] = kept.sum(dim=0) / (T - 2 * b)
        return update.view(first.shape)


def _first_nonfinite(grads: list[Tensor], num_tasks: int, K: int) -> Tensor:
    """Per task, the index of its first tensor holding NaN or Inf, or -1 (one host transfer)."""
    if not grads:
        return torch.full((num_tasks,), -1, dtype=torch.int64)
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).view(num_tasks, K).cpu()
    index = torch.arange(K).expand(num_tasks, K)
    first = torch.where(bad, index, K).min(dim=1).values
    return torch.where(first < K, first, -1)
