from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import check_positive
from mtlgrad.aggregators._task_state import (
    TaskStateAggregator,
    clone_tensors,
    load_step,
    load_tensors,
    load_vector,
    state_dtype,
)

# AdaGrad's constant under the square root, as in the paper's code, LibMTL and TorchJD.
ADAGRAD_EPS = 1e-7


class ExcessMTL(TaskStateAggregator):
    """ExcessMTL (He, Yu, Zhao & Zhao, ICML 2024, `Robust Multi-Task Learning with Excess Risks
    <https://proceedings.mlr.press/v235/he24n.html>`_).

    The update is ``Σ_t α_t g_t`` with task weights ``α`` on the simplex, moved towards the tasks
    with the largest excess risk. Each step (the paper's Eqs. 6-9):

    - ``S_t ← S_t + g_t²`` (elementwise, the AdaGrad diagonal Hessian estimate of Eq. 7) and
      ``E_t = Σ_p g_{t,p}² / sqrt(S_{t,p} + 1e-7)``, the excess-risk estimate ``g_tᵀ H_t⁻¹ g_t``
      of Eq. 6;
    - scale processing (Sect. 3.2): ``r_t = E_t / E_t⁰`` with the baseline ``E_t⁰`` the first
      step's estimate (or, with ``warmup_steps``, the mean over the warm-up steps, Appendix C.1);
    - the exponentiated-gradient step of Eq. 9, ``α ← softmax(log α + η r)`` (``α`` starts at
      ``1/T``; during warm-up it stays there).

    Conventions: the weights lie on the simplex as in the paper and TorchJD (the official code and
    LibMTL keep them summing to T: their update is T times this one). The official code puts the
    first step's raw estimate ``E_t`` into the exponent and TorchJD divides by ``E_t⁰ + 1e-7``;
    here every step uses the ratio ``E_t / E_t⁰`` (so the first step's is 1 and leaves ``α``
    unchanged), which makes the weights the same for gradients of any common scale above
    ``sqrt(1e-7)``. A task whose baseline is 0 (a zero gradient) gets its baseline at its first
    non-zero estimate and ratio 0 until then. ``S`` is kept as its square root, updated with
    ``hypot``, so squares of large float32 gradients do not overflow.

    Memory: ``S`` holds one tensor per task and gradient tensor, T times the shared parameters
    (float32 for half-precision gradients). Not Gram-based (it reads the gradients elementwise).

    Stateful: the step count, ``α``, the baselines and ``sqrt(S)`` are in :meth:`state_dict`.
    With T = 1 the update is the gradient.

    Args:
        step_size: ``η``, the step size of the exponentiated-gradient update (the paper's
            ``robust_step_size``; default 1.0, as in TorchJD).
        warmup_steps: steps with uniform weights over which the baselines are averaged.
    """

    def __init__(self, step_size: float = 1.0, warmup_steps: int = 0) -> None:
        self.step_size = check_positive("step_size", step_size)
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        super().__init__()

    def _hyperparameters(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "warmup_steps": self.warmup_steps}

    def reset(self) -> None:
        """Forgets the state: the next call starts from uniform weights (and warms up again)."""
        super().reset()
        self._step_count = 0
        self._alpha: Tensor | None = None
        self._baseline: Tensor | None = None
        self._warmup_sum: Tensor | None = None
        self._root_sum_squares: list[Tensor] | None = None

    def _num_tasks_in_state(self) -> int | None:
        return None if self._alpha is None else self._alpha.shape[0]

    def _has_tensor_state(self) -> bool:
        return self._root_sum_squares is not None

    def excess_risks(self, grads: list[Tensor], num_tasks: int, inv_scale: float) -> Tensor:
        """Updates ``sqrt(S)`` and returns the T estimates ``E_t`` (float64, CPU)."""
        if self._root_sum_squares is None:
            self._root_sum_squares = [
                torch.zeros_like(g, dtype=state_dtype(g.dtype)) for g in grads
            ]
        K = len(grads) // num_tasks
        root_eps = ADAGRAD_EPS**0.5
        sums = []
        for g, r in zip(grads, self._root_sum_squares):
            g = g.detach().to(r.dtype)
            if inv_scale != 1.0:
                g = g * inv_scale
            torch.hypot(r, g, out=r)
            h = torch.hypot(r, torch.tensor(root_eps, dtype=r.dtype, device=r.device))
            # g² / h written as g · (g / h), |g / h| <= 1: no overflow for large gradients.
            sums.append((g * (g / h)).sum(dtype=torch.float64))
        if not sums:
            return torch.zeros(num_tasks, dtype=torch.float64)
        per_tensor = torch.stack(sums).cpu().view(num_tasks, K)
        return per_tensor.sum(1)

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
        if self._alpha is None:
            self._alpha = torch.full((T,), 1.0 / T, dtype=torch.float64)
            self._baseline = torch.zeros(T, dtype=torch.float64)
            self._warmup_sum = torch.zeros(T, dtype=torch.float64)
        assert self._baseline is not None and self._warmup_sum is not None
        excess = self.excess_risks(grads, T, inv_scale)
        self._step_count += 1
        if self._step_count <= self.warmup_steps:
            self._warmup_sum += excess
            if self._step_count == self.warmup_steps:
                self._baseline = self._warmup_sum / self.warmup_steps
            return grads, self._alpha.clone()
        unset = self._baseline == 0
        self._baseline = torch.where(unset, excess, self._baseline)
        known = self._baseline > 0
        ratio = torch.where(known, excess / torch.where(known, self._baseline, 1.0), 0.0)
        self._alpha = torch.softmax(torch.log(self._alpha) + self.step_size * ratio, 0)
        return grads, self._alpha.clone()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "weights" (α), "baseline", "warmup_sum"`` (float64 T-vectors, ``None``
        before the first call) ``, "root_sum_squares"`` (``sqrt(S)``, task-major, one tensor per
        task and gradient tensor, on the gradients' device) ``}``."""
        return {
            "step": self._step_count,
            "weights": None if self._alpha is None else self._alpha.clone(),
            "baseline": None if self._baseline is None else self._baseline.clone(),
            "warmup_sum": None if self._warmup_sum is None else self._warmup_sum.clone(),
            "root_sum_squares": clone_tensors(self._root_sum_squares),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = {"step", "weights", "baseline", "warmup_sum", "root_sum_squares"}
        if set(state_dict) != keys:
            raise ValueError(
                f"ExcessMTL state must have keys {sorted(keys)}, got {sorted(state_dict)}"
            )
        step = load_step("ExcessMTL", state_dict["step"])
        alpha = load_vector("ExcessMTL", "weights", state_dict["weights"])
        baseline = load_vector("ExcessMTL", "baseline", state_dict["baseline"])
        warmup_sum = load_vector("ExcessMTL", "warmup_sum", state_dict["warmup_sum"])
        roots = load_tensors("ExcessMTL", "root_sum_squares", state_dict["root_sum_squares"])
        vectors = [v for v in (alpha, baseline, warmup_sum) if v is not None]
        if vectors and (len(vectors) != 3 or len({v.shape for v in vectors}) != 1):
            raise ValueError("ExcessMTL state: weights, baseline and warmup_sum must be T-vectors")
        if alpha is not None and (bool((alpha < 0).any()) or abs(float(alpha.sum()) - 1) > 1e-9):
            raise ValueError(f"ExcessMTL state: weights must lie on the simplex, got {alpha}")
        if roots is not None and alpha is not None and len(roots) % alpha.shape[0]:
            raise ValueError(
                f"ExcessMTL state: {len(roots)} root_sum_squares tensors for {alpha.shape[0]} tasks"
            )
        self.reset()
        self._step_count, self._alpha, self._baseline = step, alpha, baseline
        self._warmup_sum, self._root_sum_squares = warmup_sum, roots
        if roots is not None and alpha is not None:
            K = len(roots) // alpha.shape[0]
            self._layout = [(tuple(r.shape), r.device) for r in roots[:K]]
