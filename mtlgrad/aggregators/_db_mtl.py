from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators._base import check_nonnegative
from mtlgrad.aggregators._task_state import (
    TaskStateAggregator,
    clone_tensors,
    load_step,
    load_tensors,
    state_dtype,
    step_sizes,
    task_label,
)


class DBMTL(TaskStateAggregator):
    """DB-MTL, dual-balancing multi-task learning (Lin, Ye, Xu, Shi, Kwok, 2023, `Dual-Balancing
    for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_).

    Algorithm 1 of the paper, as in LibMTL's ``DB_MTL``. At step ``k`` (from 1), with
    ``β_k = beta / k^beta_decay``:

    - loss-scale balancing: the gradient of ``log L_t`` is ``h_t = g_t / L_t``;
    - an EMA of it, ``ĝ_t ← β_k ĝ_t + (1 − β_k) h_t`` (``ĝ_t`` starts at 0, as in LibMTL);
    - gradient-magnitude balancing to the largest norm: ``d = Σ_t (max_s ||ĝ_s|| / ||ĝ_t||) ĝ_t``,
      every task's EMA rescaled to the largest EMA norm. The record's weights are these factors.

    The aggregator receives the losses from :func:`mtlgrad.backward` and
    :class:`~mtlgrad.optim.MTLOptimizer` (``aggregate(..., losses=...)``) and divides the
    gradients itself: no log-transformed losses to build, the training loop is the same as for any
    aggregator. Every loss must be positive (its log is taken); a loss <= 0 raises naming the task.

    Conventions: LibMTL takes ``log(L_t + 1e-8)`` and divides by ``||ĝ_t|| + 1e-8``; here
    ``h_t = g_t / L_t`` exactly and a zero EMA gets factor 0, so the update is linear in the
    gradients' scale and independent of the losses' common scale. The norms come from one pass of
    the native ``gram`` over the EMAs, the update from one pass of ``combine``.

    Memory: the EMAs are one tensor per task and gradient tensor, T times the shared parameters
    (float32 for half-precision gradients), on their device.

    Stateful: the step count and the EMAs are in :meth:`state_dict`.

    Args:
        beta: ``β``, the EMA coefficient of the past (LibMTL's ``DB_beta``, default 0.9).
        beta_decay: ``β_k = beta / k^beta_decay`` (LibMTL's ``DB_beta_sigma``, default 0: a
            constant coefficient).
    """

    def __init__(self, beta: float = 0.9, beta_decay: float = 0.0) -> None:
        self.beta = check_nonnegative("beta", beta)
        if self.beta >= 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta_decay = check_nonnegative("beta_decay", beta_decay)
        super().__init__()

    def _hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_decay": self.beta_decay}

    def reset(self) -> None:
        """Forgets the EMAs: the next call starts from zero."""
        super().reset()
        self._step_count = 0
        self._ema: list[Tensor] | None = None
        self._num_tasks: int | None = None

    def _num_tasks_in_state(self) -> int | None:
        return self._num_tasks

    def _has_tensor_state(self) -> bool:
        return self._ema is not None

    def _step(
        self,
        grads: list[Tensor],
        num_tasks: int,
        G: Tensor,
        losses: Tensor | None,
        inv_scale: float,
        task_names: Sequence[str] | None,
    ) -> tuple[list[Tensor], Tensor]:
        T = num_tasks
        if losses is None:
            raise ValueError(
                "DBMTL balances the gradients of the log-losses and needs the task losses: pass "
                "aggregate(..., losses=...) (mtlgrad.backward and MTLOptimizer pass them)"
            )
        for t in range(T):
            loss = float(losses[t])
            if not loss > 0 or loss == float("inf"):
                raise ValueError(
                    f"DBMTL takes the log of each loss, and the loss of "
                    f"{task_label(t, task_names)} is {loss}; it must be positive and finite"
                )
        if self._ema is None:
            self._ema = [torch.zeros_like(g, dtype=state_dtype(g.dtype)) for g in grads]
            self._num_tasks = T
        self._step_count += 1
        beta = step_sizes(self.beta, self.beta_decay, self._step_count)
        K = len(grads) // T
        for i, (e, g) in enumerate(zip(self._ema, grads)):
            e.mul_(beta).add_(g.detach(), alpha=(1 - beta) * inv_scale / float(losses[i // K]))
        if not grads:
            return self._ema, torch.zeros(T, dtype=torch.float64)
        norms = ops.gram(self._ema, T, check_finite=False).diagonal().to("cpu").clamp_min(0).sqrt()
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(
                f"DBMTL: the norms of the log-loss gradients' EMAs overflowed ({norms.tolist()})"
            )
        largest = norms.max()
        w = torch.where(norms > 0, largest / torch.where(norms > 0, norms, 1.0), 0.0)
        return self._ema, w

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "ema"`` (the ``ĝ_t``, task-major, on the gradients' device; ``None`` before
        the first call) ``, "num_tasks"}``."""
        return {
            "step": self._step_count,
            "ema": clone_tensors(self._ema),
            "num_tasks": self._num_tasks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = {"step", "ema", "num_tasks"}
        if set(state_dict) != keys:
            raise ValueError(f"DBMTL state must have keys {sorted(keys)}, got {sorted(state_dict)}")
        step = load_step("DBMTL", state_dict["step"])
        ema = load_tensors("DBMTL", "ema", state_dict["ema"])
        T = state_dict["num_tasks"]
        if ema is None:
            if T is not None:
                raise ValueError("DBMTL state: num_tasks must be None when ema is None")
        elif not isinstance(T, int) or isinstance(T, bool) or T < 1 or len(ema) % T:
            raise ValueError(f"DBMTL state: num_tasks={T!r} does not fit {len(ema)} ema tensors")
        self.reset()
        self._step_count, self._ema, self._num_tasks = step, ema, T
        if ema is not None:
            K = len(ema) // T
            self._layout = [(tuple(e.shape), e.device) for e in ema[:K]]
