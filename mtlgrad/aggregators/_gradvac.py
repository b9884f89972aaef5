from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator, draw_seed, own_generator


class GradVac(GramAggregator):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, `Gradient Vaccine: Investigating
    and Improving Multi-task Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_).

    Algorithm 1 of the paper. Each task keeps, for every other task, an EMA target ``φ̂_ij`` of
    the cosine similarity of their gradients (initialised to 0). For each task i, starting from
    ``g_i' = g_i``, for every other task j in random order: with ``φ_ij = cos(g_i', g_j)``, if
    ``φ_ij < φ̂_ij`` the paper's closed form raises the cosine exactly to the target,
    ``g_i' ← g_i' + ||g_i'|| (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (||g_j|| √(1 − φ̂_ij²)) g_j``;
    then ``φ̂_ij ← (1 − β) φ̂_ij + β φ_ij`` (with the cosine measured before the adjustment, as in
    the paper's algorithm and the reference implementations). The update is the **sum** of the
    adjusted gradients.

    Conventions:

    - The paper applies the procedure separately to groups of parameters (layers, or encoder and
      decoder), with targets per group. Here it runs once on the whole shared gradient, since the
      method only sees the Gram matrix of the flattened gradients; for per-group behaviour, use one
      aggregator per group.
    - A zero gradient has no cosine: pairs involving one are neither adjusted nor averaged into
      the targets. A target of exactly 1 cannot be reached by adding a multiple of ``g_j``
      (unless ``g_i'`` is already parallel to it) and is skipped.
    - With ``beta = 0`` the targets stay 0 and the adjustment is PCGrad's projection; with the
      same generator seed the result equals :class:`~mtlgrad.aggregators.PCGrad`'s.

    The recursion runs natively on coefficient vectors (every ``g_i'`` is a combination of the
    original gradients), so it needs only the Gram matrix. The visiting orders are drawn per call
    from ``generator`` (by default one of its own, seeded once from torch's global RNG). Linear
    under scaling; with T = 1 the update is the one gradient.

    Stateful: the T x T targets (float64, CPU) and the generator's state are in
    :meth:`state_dict`. A call with another
    number of tasks than the targets' raises; call :meth:`reset` to start over.

    Args:
        beta: EMA rate of the targets, in [0, 1] (default 0.5, as in LibMTL and TorchJD).
        generator: source of the random visiting orders.
    """

    def __init__(self, beta: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta <= 1:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self.generator = own_generator(generator)
        self._targets: Tensor | None = None

    def _hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def _weights(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        targets = self._targets
        if targets is None:
            targets = torch.zeros(T, T, dtype=torch.float64)
        elif targets.shape[0] != T:
            raise ValueError(
                f"GradVac has cosine targets for {targets.shape[0]} tasks but got a {T} x {T} "
                "Gram matrix; call reset() to start over with another number of tasks"
            )
        seed = draw_seed(self.generator)
        w, self._targets = torch.ops.mtlgrad.gradvac_weights(G, targets, self.beta, seed)
        return w

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"targets": T x T float64 tensor (None before the first call), "generator": its
        state}``."""
        state = super().state_dict()
        state["targets"] = None if self._targets is None else self._targets.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "targets" not in state:
            raise ValueError(f"GradVac expects state with key 'targets', got {sorted(state_dict)}")
        targets = state.pop("targets")
        super().load_state_dict(state)  # the generator's state; rejects unknown keys
        if targets is None:
            self._targets = None
            return
        targets = torch.as_tensor(targets).detach().to(device="cpu", dtype=torch.float64)
        if targets.dim() != 2 or targets.shape[0] != targets.shape[1]:
            raise ValueError(f"GradVac targets must be a T x T matrix, got {tuple(targets.shape)}")
        if not bool(((targets >= -1) & (targets <= 1)).all()):
            raise ValueError("GradVac targets are cosines and must lie in [-1, 1]")
        self._targets = targets.clone()

    _keeps_task_state = True

    def reset(self) -> None:
        """Forgets the targets: the next call starts from zero targets."""
        super().reset()
        self._targets = None
