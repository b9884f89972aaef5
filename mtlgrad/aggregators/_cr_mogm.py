from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


def _check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


class CRMOGM(GramAggregator):
    """CR-MOGM, weight smoothing around any Gram-based method (Zhou, Zhang, Tang, Zhang & Wu,
    NeurIPS 2022, `On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
    Beyond
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_).

    With ``λ̂_k`` the weights the wrapped ``aggregator`` computes at step k, the update is
    ``Σ_t λ_k,t g_t`` with the smoothed weights

        ``λ_k = α λ_{k−1} + (1 − α) λ̂_k``,

    where ``λ_0`` is ``initial_weights`` when given, else ``λ̂_1`` (so the first step's weights
    are the wrapped method's, whatever α). ``alpha = 0`` is the wrapped method itself and
    ``alpha = 1`` freezes the weights at ``λ_0``. This is TorchJD 0.18's ``CRMOGMWeighting``
    (default α = 0.9). The paper's Corollary 1 lets α grow towards 1 as the learning rate decays
    (e.g. ``α_k = 1 − lr_k / lr_0``): ``alpha`` may be set between steps.

    The wrapped method runs every step on the step's Gram matrix (and losses, for the methods
    that use them), so its own state moves as it would alone. Smoothing the weights does not keep
    the wrapped method's guarantees (an averaged UPGrad update need not be non-conflicting).

    Stateful: :meth:`state_dict` holds the smoothed weights (float64, CPU; None before the first
    step) and the wrapped aggregator's state, so a resumed run is bit-identical. A call with
    another number of tasks raises; :meth:`reset` forgets both (and restarts from ``λ_0``).

    Args:
        aggregator: the Gram-based method whose weights are smoothed.
        alpha: the weight of the previous weights, in [0, 1] (default 0.9).
        initial_weights: ``λ_0`` (one value per task), or None for ``λ̂_1``.
    """

    def __init__(
        self,
        aggregator: GramAggregator,
        alpha: float = 0.9,
        initial_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        if not isinstance(aggregator, GramAggregator):
            raise TypeError(
                "aggregator must be a GramAggregator (a method whose update is a weighted sum of "
                f"the task gradients, e.g. UPGrad()), got {type(aggregator).__name__}"
            )
        self.aggregator = aggregator
        self.alpha = alpha
        if initial_weights is not None:
            values = torch.as_tensor(initial_weights, dtype=torch.float64).detach().cpu().clone()
            if values.dim() != 1 or values.numel() == 0 or not bool(torch.isfinite(values).all()):
                raise ValueError(
                    "initial_weights must be a non-empty sequence of finite per-task weights, "
                    f"got {values.tolist() if values.dim() <= 1 else tuple(values.shape)}"
                )
            initial_weights = values
        self.initial_weights: Tensor | None = initial_weights
        self._smoothed: Tensor | None = None

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(value)

    def _hyperparameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {"aggregator": self.aggregator, "alpha": self.alpha}
        if self.initial_weights is not None:
            params["initial_weights"] = self.initial_weights.tolist()
        return params

    def _weights(self, G: Tensor) -> Tensor:
        return self._smooth(self.aggregator.weights(G), G.shape[0])

    def _weights_given_losses(self, G: Tensor, losses: Tensor) -> Tensor:
        return self._smooth(self.aggregator.weights(G, losses), G.shape[0])

    def _smooth(self, current: Tensor, T: int) -> Tensor:
        current = current.to(device="cpu", dtype=torch.float64)
        previous = self._smoothed
        if previous is None:
            if self.initial_weights is None:
                previous = current
            elif self.initial_weights.numel() != T:
                raise ValueError(
                    f"CRMOGM has {self.initial_weights.numel()} initial_weights but got {T} tasks"
                )
            else:
                previous = self.initial_weights
        elif previous.shape[0] != T:
            raise ValueError(
                f"CRMOGM keeps smoothed weights for {previous.shape[0]} tasks but got a {T} x {T} "
                "Gram matrix; call reset() to start over with another number of tasks"
            )
        self._smoothed = self._alpha * previous + (1.0 - self._alpha) * current
        return self._smoothed.clone()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"weights": the smoothed weights (T float64 tensor, None before the first step),
        "aggregator": the wrapped aggregator's state}``."""
        return {
            "weights": None if self._smoothed is None else self._smoothed.clone(),
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "weights" not in state or "aggregator" not in state:
            raise ValueError(
                "CRMOGM expects state with keys 'weights' and 'aggregator', got "
                f"{sorted(state_dict)}"
            )
        weights, inner = state.pop("weights"), state.pop("aggregator")
        super().load_state_dict(state)  # rejects unknown keys
        if weights is not None:
            weights = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float64)
            if weights.dim() != 1 or not bool(torch.isfinite(weights).all()):
                raise ValueError(
                    f"CRMOGM state 'weights' must be a vector of finite weights, got {weights}"
                )
            weights = weights.clone()
        self.aggregator.load_state_dict(inner)
        self._smoothed = weights

    _keeps_task_state = True

    def reset(self) -> None:
        """Forgets the smoothed weights and resets the wrapped aggregator."""
        super().reset()
        self.aggregator.reset()
        self._smoothed = None
