from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.weighting._base import LossWeighting, check_nonnegative, check_positive, task_losses

RULES = ("adam", "sgd")
EPSILON = 1e-8  # added to L - b before the log, as in the official code
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu, NeurIPS 2023, `FAMO:
    Fast Adaptive Multitask Optimization <https://arxiv.org/abs/2306.03792>`_).

    Task logits ``ξ`` (``logits``, initialised to 0) give weights ``z = softmax(ξ)``; the
    backpropagated objective is::

        c Σ_i z_i log(L_i - b_i + ε),   c = (Σ_i z_i / (L_i - b_i + ε))^{-1}

    with ``z`` and ``c`` held constant, so the model's update direction is
    ``Σ_i (c z_i / (L_i - b_i + ε)) ∇L_i``, a convex combination of the task gradients (those
    coefficients are ``weights``). ``b`` are the ``min_losses`` (lower bounds of the losses, 0 by
    default) and ``ε = 1e-8``, as in the official code.

    After the model's step, the logits move to favour the tasks whose log-loss fell least
    (paper, Algorithm 1)::

        δ = J_z(ξ)ᵀ (log(L(t) - b + ε) - log(L(t+1) - b + ε))    (J_z: Jacobian of softmax)
        ξ ← ξ - β (δ + γ ξ)                                       (rule="sgd", Algorithm 1)

    ``rule="adam"`` (default) instead gives ``δ + γ ξ`` to an Adam step of learning rate β
    (β₁, β₂ = 0.9, 0.999, eps 1e-8), as the paper's practical version (Algorithm 2, in the
    appendix), the official code and LibMTL do. Defaults ``β = 0.025``, ``γ = 1e-3`` (Algorithm 2,
    LibMTL and the official experiment scripts; the official standalone example uses γ = 0.01).

    Per step (FAMO needs the losses of the same batch after the step):

    .. code-block:: python

        weighting = FAMO(num_tasks=2)
        optimizer.zero_grad()
        weighting(losses).backward()          # records L(t)
        optimizer.step()
        with torch.no_grad():
            weighting.update(task_losses(model(x), y))   # L(t+1): updates the logits

    A loss below its bound ``b`` (or not finite) raises a ``ValueError`` naming the task and the
    value, in the call and in ``update``, before any state changes (its log would turn the
    logits NaN for good).

    ``update`` owns the logits' update (they are a buffer, not a parameter: FAMO has nothing for
    the model's optimizer). The logits, the optimizer state of ``rule="adam"`` and the recorded
    losses are in ``state_dict()``. In eval mode the call only weights the losses and records
    nothing.

    Args:
        num_tasks: T.
        lr: β, the logits' learning rate.
        weight_decay: γ, the logits' regularisation.
        min_losses: ``b``, one lower bound per task (default 0 for all).
        rule: ``"adam"`` or ``"sgd"`` (see above).
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Sequence[float] | Tensor | None = None,
        rule: str = "adam",
    ) -> None:
        super().__init__(num_tasks)
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}; got {rule!r}")
        self.rule = rule
        if min_losses is None:
            bounds = torch.zeros(num_tasks, dtype=torch.float64)
        else:
            bounds = torch.as_tensor(min_losses, dtype=torch.float64).detach().cpu()
            if bounds.shape != (num_tasks,):
                raise ValueError(
                    f"min_losses must hold {num_tasks} values (one per task), got shape "
                    f"{tuple(bounds.shape)}"
                )
            if not torch.isfinite(bounds).all():
                raise ValueError(f"min_losses must be finite, got {bounds.tolist()}")
        f64 = torch.float64
        self.register_buffer("logits", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("min_losses", bounds)
        self.register_buffer("previous_losses", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("exp_avg", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._pending = False

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        names, stacked = self._stack(losses)
        self._check_bounds("FAMO", names, stacked)
        shifted = stacked - self.min_losses.to(stacked) + EPSILON
        z = torch.softmax(self.logits, dim=0).to(stacked)
        scaled = z / shifted.detach()
        c = 1 / scaled.sum()
        self.weights = (c * scaled).detach()
        if self.training:
            self.previous_losses.copy_(stacked.detach())
            self._pending = True
        return c * (z * shifted.log()).sum()

    @torch.no_grad()
    def update(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> None:
        """Updates the logits from the losses of the same batch after the model's step.

        Call it once after each ``optimizer.step()`` that followed a training-mode call.
        """
        if not self._pending:
            raise RuntimeError(
                "FAMO.update: no losses were recorded since the last update; call the weighting "
                "on the training losses (in training mode) before the model's step"
            )
        names, stacked = task_losses(losses, self.num_tasks, "FAMO.update")
        self._check_bounds("FAMO.update", names, stacked)
        bounds = self.min_losses
        after = (stacked.detach().to(bounds) - bounds + EPSILON).log()
        before = (self.previous_losses.to(bounds) - bounds + EPSILON).log()
        decrease = before - after
        z = torch.softmax(self.logits, dim=0)
        # Vector-Jacobian product of the softmax: J_zᵀ v = z ⊙ (v - zᵀv).
        delta = z * (decrease - (z * decrease).sum())
        grad = delta + self.weight_decay * self.logits
        if self.rule == "sgd":
            self.logits.sub_(self.lr * grad)
        else:
            self._adam_step(grad)
        self._pending = False

    def _check_bounds(self, owner: str, names: list[str], stacked: Tensor) -> None:
        """Every loss finite and at least its lower bound: FAMO takes log(L − b + ε), and a NaN
        there would reach the logits for good. Raises (naming the task) before any change."""
        values = stacked.detach().to(self.min_losses)
        valid = torch.isfinite(values) & (values >= self.min_losses)
        if bool(valid.all()):
            return
        i = int((~valid).nonzero()[0])
        value, bound = float(values[i]), float(self.min_losses[i])
        if not math.isfinite(value):
            raise ValueError(f"{owner}: the loss of {names[i]!r} must be finite, got {value!r}")
        raise ValueError(
            f"{owner}: the loss of {names[i]!r} is {value!r}, below its lower bound "
            f"min_losses[{i}] = {bound!r} (FAMO takes log(loss - bound + {EPSILON}))"
        )

    def _adam_step(self, grad: Tensor) -> None:
        beta1, beta2 = ADAM_BETAS
        self.num_updates.add_(1)
        step = self.num_updates.to(grad.dtype)  # bias corrections on the device: no host sync
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq / (1 - beta2**step)).sqrt().add_(ADAM_EPS)
        self.logits.sub_(self.lr * self.exp_avg / (1 - beta1**step) / denom)

    def get_extra_state(self) -> dict[str, Any]:
        return {"pending": self._pending}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = bool(state.get("pending", False))

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, lr={self.lr}, weight_decay={self.weight_decay}, "
            f"rule={self.rule!r}"
        )
