from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, check_nonnegative, check_positive_int


class NashMTL(GramAggregator):
    """Nash-MTL (Navon et al., ICML 2022, `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_).

    The update is the Nash bargaining solution between the tasks, ``d = Σ_i α_i g_i`` with
    ``α > 0`` solving ``G α = 1/α`` (the paper's ``GᵀG α = 1/α``, i.e. ``α_i · g_iᵀd = 1``),
    found as in the step of Algorithm 1 and the official code: ``optim_niter`` iterations of the
    concave-convex procedure, each the convex problem
    ``min_α Σ_i β_i(α) + ∇φ(α_k)ᵀ(α − α_k)  s.t.  log α_i + log β_i(α) >= 0`` with ``β = G α`` and
    ``φ(α) = Σ_i (log α_i + log β_i)``. The official code hands each problem to cvxpy/ECOS; here a
    native float64 solver solves it exactly (it certifies the fixed point by the problem's KKT
    conditions, or runs an interior-point method; see ``csrc/solvers/nash_mtl.cpp``), and stops
    when ``max_i |α_i (Gα)_i − 1| < 1e-9`` or the iterate stops moving.

    Args:
        max_norm: when positive, the weights are scaled down so that ``||Σ_i w_i g_i|| <= max_norm``
            (the official code clips the shared parameters' gradient norm to this value). At the
            fixed point ``||Σ_i α_i g_i||² = T``, so with the default ``1.0`` and ``T >= 2`` the
            update has norm 1. ``0`` disables the clipping.
        update_weights_every: α is recomputed every this many calls and reused (with the clipping
            recomputed on the current gradients) in between.
        optim_niter: the maximum number of concave-convex iterations per recomputation.

    Conventions (where this differs from the official code, and why):

    * The iterations run on ``G / (trace G / T)`` and α is rescaled back, so the result is the same
      for gradients of any scale: ``agg(c J) = agg(J)`` for ``c > 0`` (the bargaining solution is
      scale-invariant, even per task). The official code divides ``G`` by its Frobenius norm only
      for conditioning; its iterates still depend on the gradients' scale, its fixed point does
      not.
    * The first call starts from ``α = 1`` in these normalised units, later calls from the previous
      α (the official warm start); a start where some ``(Gα)_i <= 0`` (no valid linearisation)
      is replaced by the fixed point itself.
    * Tasks with a zero gradient get weight 0 and take no part in the bargaining (the official
      problem is then infeasible). If the other gradients are Pareto-stationary (0 in their convex
      hull, e.g. two opposite gradients), no update improves every task: the problem has no
      solution and the update is zero, the disagreement point.

    Stateful: the call counter and the last α are in :meth:`state_dict`. With T = 1 the update is
    the unit gradient ``g / ||g||``.
    """

    def __init__(
        self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        self.max_norm = check_nonnegative("max_norm", max_norm)
        self.update_weights_every = check_positive_int("update_weights_every", update_weights_every)
        self.optim_niter = check_positive_int("optim_niter", optim_niter)
        self.reset()

    _keeps_task_state = True

    def reset(self) -> None:
        super().reset()
        self._step = 0
        self._alpha: Tensor | None = None

    def _weights(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        if self._alpha is not None and self._alpha.shape[0] != T:
            raise ValueError(
                f"NashMTL: got {T} tasks but its state holds weights for {self._alpha.shape[0]}; "
                "call reset() before changing the number of tasks"
            )
        recompute = self._alpha is None or self._step % self.update_weights_every == 0
        niter = self.optim_niter if recompute else 0
        alpha, weights = torch.ops.mtlgrad.nash_mtl_weights(G, self._alpha, niter, self.max_norm)
        self._alpha = alpha
        self._step += 1
        return weights

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self._alpha is None else self._alpha.clone()
        return {"step": self._step, "alpha": alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"step", "alpha"}:
            raise ValueError(
                f"NashMTL state must have keys 'step' and 'alpha', got {sorted(state_dict)}"
            )
        step, alpha = state_dict["step"], state_dict["alpha"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"NashMTL state: step must be a non-negative int, got {step!r}")
        if alpha is not None:
            alpha = torch.as_tensor(alpha).detach().to(device="cpu", dtype=torch.float64).clone()
            if alpha.dim() != 1:
                raise ValueError(
                    f"NashMTL state: alpha must be a vector, got shape {tuple(alpha.shape)}"
                )
        self._step = step
        self._alpha = alpha

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
            "optim_niter": self.optim_niter,
        }
