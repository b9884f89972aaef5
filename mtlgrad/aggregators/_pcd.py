from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


class PCD(GramAggregator):
    """PCD, priority-constrained descent (Varam et al., TMLR 2026, `Not All Objectives Are Born
    Equal: Priority-Constrained Descent for Hierarchical Multi-Objective Optimization
    <https://openreview.net/forum?id=HT01yGHLEt>`_; reference code:
    `DaraVaram/priority-constrained-descent
    <https://github.com/DaraVaram/priority-constrained-descent>`_).

    **Task 0 is the primary objective**, the others secondary. PCD follows the primary gradient
    as closely as possible while every secondary task j gets at least a fraction ``τ_j`` of the
    first-order progress a step along its own normalised gradient would give:

        ``d̃ = argmin_d ½ ||d − g̃_0||²  subject to  g̃_jᵀ d >= τ_j ||g̃_j||²  for j >= 1``,

    with ``g̃_i = s_i g_i`` and ``s_i = 1 / √(v̂_i + ε)``, where ``v̂_i`` is the bias-corrected
    exponential moving average (decay ``beta``) of ``||g_i||²`` over the calls. The update is
    ``d̃`` rescaled to the norm of ``g_0``; its weights are ``w_0 = s_0 c`` and ``w_j = μ_j s_j c``
    with ``μ`` the KKT multipliers and ``c = ||g_0|| / ||d̃||``. The program is solved exactly on
    the Gram matrix by a native float64 dual active-set method (Goldfarb & Idnani, 1983, as in
    TorchJD 0.18's ``PCD``; the reference code enumerates the working sets, exponential in T; the
    minimiser is the same).

    Special cases (TorchJD's conventions): ``g_0 = 0`` gives 0; incompatible constraints (only
    possible with T >= 3, e.g. two anti-parallel secondary gradients) are dropped and the update
    is ``g_0``; a ``d̃`` that is zero to the rounding of G gives 0. That rounding is taken at
    float32's level (10 ε₃₂, also the threshold under which a secondary gradient counts as a
    combination of the active ones), since G usually comes from float32 gradients; TorchJD takes
    its Gram matrix's own dtype. A non-finite G raises (TorchJD returns NaN).

    Not permutation invariant (the first task is the primary one); invariant under a permutation
    of the secondary tasks, and linear under scaling up to the effect of ``eps``.

    Stateful: the moving average of the squared norms (float64, CPU) and the number of calls are
    in :meth:`state_dict`. A call with another number of tasks raises; call :meth:`reset` to
    start over.

    Args:
        tau: ``τ`` in [0, 1], one value for all secondary tasks or one per secondary task
            (T − 1 values). Default 0.02, as in TorchJD.
        beta: decay of the moving average, in [0, 1) (default 0.999).
        eps: non-negative constant added to the moving average (default 1e-8).
    """

    def __init__(
        self, tau: float | Sequence[float] | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8
    ) -> None:
        if isinstance(tau, (int, float)) and not isinstance(tau, bool):
            if not 0 <= tau <= 1:
                raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
            self.tau: float | Tensor = float(tau)
        else:
            values = torch.as_tensor(tau, dtype=torch.float64).detach().cpu().clone()
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(
                    "tau must be a number or a non-empty sequence with one value per secondary "
                    f"task, got shape {tuple(values.shape)}"
                )
            if not bool(((values >= 0) & (values <= 1)).all()):
                raise ValueError(f"tau values must lie in [0, 1], got {values.tolist()}")
            self.tau = values
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self._sq_norm_average: Tensor | None = None
        self._steps = 0

    def _hyperparameters(self) -> dict[str, Any]:
        tau = self.tau if isinstance(self.tau, float) else self.tau.tolist()
        return {"tau": tau, "beta": self.beta, "eps": self.eps}

    def _taus(self, T: int) -> Tensor:
        if isinstance(self.tau, float):
            return torch.full((T - 1,), self.tau, dtype=torch.float64)
        if self.tau.numel() != T - 1:
            raise ValueError(
                f"PCD has {self.tau.numel()} tau values (one per secondary task) but got {T} "
                f"tasks, i.e. {T - 1} secondary tasks"
            )
        return self.tau

    def _weights(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        taus = self._taus(T)
        if not bool(torch.isfinite(G).all()):
            raise ValueError("PCD: the Gram matrix holds NaN or Inf")
        average = self._sq_norm_average
        if average is None:
            average = torch.zeros(T, dtype=torch.float64)
        elif average.shape[0] != T:
            raise ValueError(
                f"PCD keeps a moving average of the squared norms of {average.shape[0]} tasks but "
                f"got a {T} x {T} Gram matrix; call reset() to start over with another number "
                "of tasks"
            )
        steps = self._steps + 1
        average = self.beta * average + (1.0 - self.beta) * G.diagonal()
        denominators = (average / (1.0 - self.beta**steps) + self.eps).sqrt()
        # A zero average: the gradient has always been zero and its scale does not matter.
        scales = torch.where(denominators > 0, 1.0 / denominators, 0.0)
        w = torch.ops.mtlgrad.pcd_weights(G, scales, taus)
        self._sq_norm_average, self._steps = average, steps
        return w

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"sq_norm_average": T float64 tensor (None before the first call), "steps": the
        number of calls averaged}``."""
        average = self._sq_norm_average
        return {
            "sq_norm_average": None if average is None else average.clone(),
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "sq_norm_average" not in state or "steps" not in state:
            raise ValueError(
                "PCD expects state with keys 'sq_norm_average' and 'steps', got "
                f"{sorted(state_dict)}"
            )
        average, steps = state.pop("sq_norm_average"), state.pop("steps")
        super().load_state_dict(state)  # rejects unknown keys
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"PCD state 'steps' must be a non-negative int, got {steps!r}")
        if average is None:
            if steps:
                raise ValueError("PCD state has steps but no 'sq_norm_average'")
            self._sq_norm_average, self._steps = None, 0
            return
        average = torch.as_tensor(average).detach().to(device="cpu", dtype=torch.float64)
        if average.dim() != 1 or not bool(((average >= 0) & torch.isfinite(average)).all()):
            raise ValueError(
                "PCD state 'sq_norm_average' must be a vector of non-negative finite squared "
                f"norms, got {average.tolist()}"
            )
        if steps < 1:
            raise ValueError("PCD state 'steps' must be at least 1 when it holds an average")
        self._sq_norm_average, self._steps = average.clone(), steps

    _keeps_task_state = True

    def reset(self) -> None:
        """Forgets the moving average of the squared norms."""
        super().reset()
        self._sq_norm_average = None
        self._steps = 0
