from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlgrad.weighting._base import LossWeighting, check_positive

EPSILON = 1e-20  # added inside the logs, as in the official code


class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, ICML 2024, `Smooth
    Tchebycheff Scalarization for Multi-Objective Optimization
    <https://arxiv.org/abs/2402.19078>`_).

    The paper's smooth Tchebycheff function (its Eq. 5) of objectives ``f_t``, preference ``λ``
    and ideal point ``z``::

        g_μ(f | λ) = μ log Σ_t exp(λ_t (f_t - z_t) / μ)

    a smooth upper bound of ``max_t λ_t (f_t - z_t)`` (within ``μ log T``; the max as μ → 0).
    Its gradient is ``Σ_t λ_t s_t ∇f_t`` with ``s = softmax(λ (f - z) / μ)``: the task furthest
    above its ideal value, relative to its preference, gets the most weight.

    For multi-task learning this follows the official code (its LibMTL weighting), which fills in
    what the equation leaves open:

    - the objectives are the log-losses, ``f_t = log(L_t + ε)``, and the ideal point is the log
      of a reference loss per task, so ``f_t - z_t = log(L_t / r_t + ε)``, ``ε = 1e-20``;
    - the reference ``r_t`` (the official code's "nadir vector") is task t's average loss over
      one epoch of training, recorded after ``warmup_epochs`` epochs: during epochs
      ``0 .. warmup_epochs`` (counted from 0, as the official code counts them) the objective
      is ``Σ_t log(L_t + ε)``, and the losses of epoch ``warmup_epochs`` are averaged into
      ``r``; from the next epoch on, the objective is ``T g_μ``:

          T μ log Σ_t exp(λ_t log(L_t / r_t + ε) / μ)

    - ``λ_t = 1`` for every task and the factor T, where the paper takes ``λ`` on the simplex:
      the coefficients of the log-losses are then ``T s_t``, summing to T as in the warm-up's
      sum. A ``preference`` given here replaces the ones as they are (not normalised), so
      ``preference=[1/T] * T`` is the paper's uniform preference;
    - the official code subtracts the largest term inside the exponentials, which shifts the
      value by a constant and leaves the gradient unchanged; here ``torch.logsumexp`` keeps the
      computation finite for any μ and the value is exactly ``T g_μ``.

    The model's update direction is ``Σ_t w_t ∇L_t`` with ``w_t = T λ_t s_t / (L_t + ε r_t)``
    (during the warm-up, ``1 / (L_t + ε)``): those coefficients are ``weights``. Defaults
    ``μ = 1`` and 4 warm-up epochs, as the official code's.

    Per step: call the weighting on the training losses. In training mode during the recording
    epoch it also adds the detached losses to the epoch's sum; in eval mode it only weights them.
    Per epoch: call :meth:`end_epoch` after the epoch's last step. The epoch count, the running
    sum and the reference losses are in ``state_dict()`` (buffers), so a run resumed at any step
    continues identically.

    .. code-block:: python

        weighting = STCH(num_tasks=3)
        for epoch in range(epochs):
            for x, y in loader:
                weighting(task_losses(model(x), y)).backward()
                ...
            weighting.end_epoch()

    A negative or non-finite loss (whose log is NaN) raises a ``ValueError`` naming the task,
    before any state changes.

    Args:
        num_tasks: T.
        mu: μ > 0, the smoothing: small μ approaches the Tchebycheff max, large μ the mean of
            ``λ_t (f_t - z_t)`` (plus ``μ log T``).
        warmup_epochs: epochs of plain log-loss training before the reference epoch.
        preference: ``λ``, one non-negative weight per task with a positive sum (default: 1 for
            every task, as the official code).
    """

    def __init__(
        self,
        num_tasks: int,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        preference: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(num_tasks)
        self.mu = check_positive("mu", mu)
        if (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, int)
            or warmup_epochs < 0
        ):
            raise ValueError(f"warmup_epochs must be a non-negative int, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self._given_preference = preference is not None
        if preference is None:
            lam = torch.ones(num_tasks, dtype=torch.float64)
        else:
            lam = torch.as_tensor(preference, dtype=torch.float64).detach().cpu().clone()
            if lam.shape != (num_tasks,):
                raise ValueError(
                    f"preference must hold {num_tasks} values (one per task), got shape "
                    f"{tuple(lam.shape)}"
                )
            if not bool((torch.isfinite(lam) & (lam >= 0)).all()):
                raise ValueError(f"preference must be finite and non-negative, got {lam.tolist()}")
            if not float(lam.sum()) > 0:
                raise ValueError(f"preference must have a positive sum, got {lam.tolist()}")
        f64 = torch.float64
        self.register_buffer("preference", lam, persistent=False)
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.int64))
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("reference_losses", torch.ones(num_tasks, dtype=f64))
        self._names = [f"task {t}" for t in range(num_tasks)]

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        names, stacked = self._stack(losses)
        values = stacked.detach()
        valid = (values >= 0) & (values < math.inf)  # NaN fails both
        if not bool(valid.all()):
            i = int((~valid).nonzero()[0])
            raise ValueError(
                f"STCH: the loss of {names[i]!r} must be non-negative and finite, got "
                f"{float(values[i])!r} (STCH takes the log of the losses)"
            )
        self._names = names
        epoch = int(self.num_epochs)
        if epoch <= self.warmup_epochs:
            if self.training and epoch == self.warmup_epochs:
                self.loss_sum.add_(values.to(self.loss_sum.dtype))
                self.num_steps.add_(1)
            shifted = stacked + EPSILON
            self.weights = 1 / shifted.detach()
            return shifted.log().sum()
        reference = self.reference_losses.to(stacked)
        lam = self.preference.to(stacked)
        scaled = lam * (stacked / reference + EPSILON).log() / self.mu
        share = torch.softmax(scaled.detach(), dim=0)
        T = self.num_tasks
        self.weights = T * lam * share / (values + EPSILON * reference)
        return T * self.mu * torch.logsumexp(scaled, dim=0)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Closes the epoch; after the reference epoch (``warmup_epochs``, counted from 0), sets
        the reference losses to that epoch's averages.

        Raises a ``ValueError`` when no loss was recorded in the reference epoch, or when an
        average is not positive and finite (it divides the losses), without changing the state.
        """
        if int(self.num_epochs) == self.warmup_epochs:
            steps = int(self.num_steps)
            if steps == 0:
                raise ValueError(
                    f"STCH.end_epoch: no losses were recorded in epoch {self.warmup_epochs}, the "
                    "reference epoch; call the weighting on the training losses (in training "
                    "mode) before ending the epoch"
                )
            average = self.loss_sum / steps
            for name, value in zip(self._names, average.tolist()):
                if not 0 < value < math.inf:
                    raise ValueError(
                        f"STCH: the reference (epoch-average) loss of {name!r} must be positive "
                        f"and finite, got {value!r}"
                    )
            self.reference_losses.copy_(average)
            self.loss_sum.zero_()
            self.num_steps.zero_()
        self.num_epochs.add_(1)

    def extra_repr(self) -> str:
        text = f"num_tasks={self.num_tasks}, mu={self.mu}, warmup_epochs={self.warmup_epochs}"
        if self._given_preference:
            text += f", preference={self.preference.tolist()}"
        return text
