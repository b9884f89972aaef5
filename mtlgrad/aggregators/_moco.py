from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators._base import check_choice, check_nonnegative, check_positive
from mtlgrad.aggregators._simplex import project_onto_simplex
from mtlgrad.aggregators._task_state import (
    TaskStateAggregator,
    clone_tensors,
    load_step,
    load_tensors,
    load_vector,
    state_dtype,
    step_sizes,
    task_label,
)


class MoCo(TaskStateAggregator):
    """MoCo, stochastic multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury,
    Murugesan & Chen, ICLR 2023, `Mitigating Gradient Bias in Multi-objective Learning: A
    Provably Convergent Approach <https://openreview.net/forum?id=dLAYGdKTi2>`_).

    Algorithm 1 of the paper, with LibMTL's step-size schedules. At step ``k`` (from 1), with
    ``β_k = beta / k^beta_decay`` and ``γ_k = gamma / k^gamma_decay``:

    - tracked gradients ``y_t ← y_t − β_k (y_t − h_t)`` (Eq. 6; ``y_t`` starts at 0, as in
      LibMTL), with ``h_t = g_t``, or ``h_t = L_t g_t / ||g_t||`` with ``normalize=True``
      (LibMTL's ``MoCo``: each gradient rescaled to its loss);
    - weights ``λ ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ)`` (Eq. 7; ``λ`` starts at ``1/T``); with
      ``weight_update="softmax"``, ``λ ← softmax(λ − γ_k (Y Yᵀ + ρ I) λ)`` as in LibMTL;
    - the update ``d = Σ_t λ_t y_t`` (Eq. 8): a combination of the **tracked** gradients, not of
      this step's. The record's weights are ``λ``.

    ``MoCo()`` is the paper's algorithm; ``MoCo(normalize=True, weight_update="softmax")`` is
    LibMTL's (its defaults: ``beta=0.5, beta_decay=0.5, gamma=0.1, gamma_decay=0.5, rho=0``, the
    defaults here too). ``Y Yᵀ`` comes from one pass of the native ``gram`` over the tracked
    gradients and the update from one pass of ``combine``.

    Memory: the tracked gradients ``y_t`` are the method: one tensor per task and gradient tensor,
    T times the shared parameters (float32 for half-precision gradients), on their device.
    ``γ_k Y Yᵀ`` is not scale-free: gradients of norm far from 1 move ``λ`` to a vertex at once
    (``Π_Δ``) or not at all; ``normalize=True`` fixes the scale to the losses'.

    Stateful: the step count, ``λ`` and the tracked gradients are in :meth:`state_dict`.

    Args:
        beta, beta_decay: the tracking rate ``β_k`` (in (0, 1] at every step).
        gamma, gamma_decay: the step size ``γ_k`` of the weights.
        rho: ``ρ``, the weights' ℓ2 regularisation.
        normalize: rescale each gradient to its loss (needs the losses, as
            :func:`mtlgrad.backward` and :class:`~mtlgrad.optim.MTLOptimizer` pass them).
        weight_update: ``"projection"`` (the paper) or ``"softmax"`` (LibMTL).
    """

    def __init__(
        self,
        beta: float = 0.5,
        beta_decay: float = 0.5,
        gamma: float = 0.1,
        gamma_decay: float = 0.5,
        rho: float = 0.0,
        normalize: bool = False,
        weight_update: str = "projection",
    ) -> None:
        self.beta = check_positive("beta", beta)
        if self.beta > 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        self.beta_decay = check_nonnegative("beta_decay", beta_decay)
        self.gamma = check_positive("gamma", gamma)
        self.gamma_decay = check_nonnegative("gamma_decay", gamma_decay)
        self.rho = check_nonnegative("rho", rho)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.weight_update = check_choice("weight_update", weight_update, ("projection", "softmax"))
        super().__init__()

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "beta_decay": self.beta_decay,
            "gamma": self.gamma,
            "gamma_decay": self.gamma_decay,
            "rho": self.rho,
            "normalize": self.normalize,
            "weight_update": self.weight_update,
        }

    def reset(self) -> None:
        """Forgets the state: the next call starts from ``y = 0`` and uniform ``λ``."""
        super().reset()
        self._step_count = 0
        self._lambda: Tensor | None = None
        self._tracked: list[Tensor] | None = None

    def _num_tasks_in_state(self) -> int | None:
        return None if self._lambda is None else self._lambda.shape[0]

    def _has_tensor_state(self) -> bool:
        return self._tracked is not None

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
        factors = torch.full((T,), inv_scale, dtype=torch.float64)
        if self.normalize:
            if losses is None:
                raise ValueError(
                    "MoCo(normalize=True) rescales each gradient to its loss and needs the task "
                    "losses: pass aggregate(..., losses=...) (mtlgrad.backward and MTLOptimizer "
                    "pass them)"
                )
            norms = G.diagonal().clamp_min(0).sqrt()
            for t in range(T):
                if not bool(torch.isfinite(losses[t])):
                    raise ValueError(f"MoCo: the loss of {task_label(t, task_names)} is not finite")
            # A zero gradient stays zero (LibMTL divides by ||g|| + 1e-8).
            safe = torch.where(norms > 0, norms, 1.0)
            factors = torch.where(norms > 0, losses / safe, 0.0) * inv_scale
        if self._tracked is None:
            self._tracked = [torch.zeros_like(g, dtype=state_dtype(g.dtype)) for g in grads]
            self._lambda = torch.full((T,), 1.0 / T, dtype=torch.float64)
        assert self._lambda is not None
        self._step_count += 1
        beta = step_sizes(self.beta, self.beta_decay, self._step_count)
        gamma = step_sizes(self.gamma, self.gamma_decay, self._step_count)
        K = len(grads) // T
        for i, (y, g) in enumerate(zip(self._tracked, grads)):
            y.mul_(1 - beta).add_(g.detach(), alpha=beta * float(factors[i // K]))
        YY = (
            ops.gram(self._tracked, T, check_finite=False).to("cpu", torch.float64)
            if grads
            else (torch.zeros(T, T, dtype=torch.float64))
        )
        step = self._lambda - gamma * (YY @ self._lambda + self.rho * self._lambda)
        if not bool(torch.isfinite(step).all()):
            raise ValueError(
                f"MoCo: the weight step overflowed (tracked gradients' Gram matrix {YY.tolist()}); "
                "the gradients are too large for gamma, try normalize=True or a smaller gamma"
            )
        if self.weight_update == "projection":
            self._lambda = project_onto_simplex(step)
        else:
            self._lambda = torch.softmax(step, 0)
        return self._tracked, self._lambda.clone()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "weights"`` (``λ``, float64, ``None`` before the first call) ``,
        "tracked"`` (the ``y_t``, task-major, on the gradients' device) ``}``."""
        return {
            "step": self._step_count,
            "weights": None if self._lambda is None else self._lambda.clone(),
            "tracked": clone_tensors(self._tracked),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = {"step", "weights", "tracked"}
        if set(state_dict) != keys:
            raise ValueError(f"MoCo state must have keys {sorted(keys)}, got {sorted(state_dict)}")
        step = load_step("MoCo", state_dict["step"])
        weights = load_vector("MoCo", "weights", state_dict["weights"])
        tracked = load_tensors("MoCo", "tracked", state_dict["tracked"])
        if (weights is None) != (tracked is None):
            raise ValueError("MoCo state: weights and tracked must both be set or both None")
        if weights is not None and tracked is not None and len(tracked) % weights.shape[0]:
            raise ValueError(
                f"MoCo state: {len(tracked)} tracked tensors for {weights.shape[0]} tasks"
            )
        self.reset()
        self._step_count, self._lambda, self._tracked = step, weights, tracked
        if weights is not None and tracked is not None:
            K = len(tracked) // weights.shape[0]
            self._layout = [(tuple(y.shape), y.device) for y in tracked[:K]]
