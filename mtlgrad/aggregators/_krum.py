from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlgrad.aggregators._base import GramAggregator


def _check_count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    return value


class Krum(GramAggregator):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017, `Machine
    Learning with Adversaries: Byzantine Tolerant Gradient Descent
    <https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html>`_).

    Of the T gradients, up to ``n_byzantine`` (the paper's f) may be arbitrary. The score of
    gradient i is the sum of its **squared** distances to its ``T − f − 2`` closest other
    gradients, ``s(i) = Σ_{i→j} ||g_i − g_j||²`` (section 4); Multi-Krum (section 5) averages the
    ``n_selected`` (m) gradients of lowest score, and ``m = 1`` is Krum, the single best one. The
    weights are ``1/m`` on the selected tasks and 0 elsewhere; the distances come from the Gram
    matrix, ``||g_i − g_j||² = G_ii + G_jj − 2 G_ij``, in a native float64 solver.

    Conventions:

    - The paper's scores sum squared distances; TorchJD's ``Krum`` sums the distances themselves.
      The closest neighbours are the same, but the scores, and so the selection, can differ; this
      class follows the paper.
    - Equal scores go to the lower task index, so the weights are a function of G alone
      (gradients tied at distance 0 are equal, and the update does not depend on which is taken).
    - The score needs at least one neighbour: ``T >= n_byzantine + 3``. The paper's resilience
      guarantee needs more, ``T > 2 n_byzantine + 2``; fewer tasks are accepted, as in TorchJD.

    Permutation invariant when no two distinct gradients tie; linear under scaling. Meant for
    robustness to outlying (e.g. corrupted) task gradients, not for conflict resolution: the
    update is one gradient, or the mean of a few.

    Args:
        n_byzantine: f, the number of gradients that may be adversarial (>= 0).
        n_selected: m, the number of gradients averaged (>= 1; 1 is Krum).
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        self.n_byzantine = _check_count("n_byzantine", n_byzantine, 0)
        self.n_selected = _check_count("n_selected", n_selected, 1)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"n_byzantine": self.n_byzantine, "n_selected": self.n_selected}

    def _weights(self, G: Tensor) -> Tensor:
        T = G.shape[0]
        if self.n_byzantine + 3 > T:
            raise ValueError(
                f"Krum(n_byzantine={self.n_byzantine}) needs at least n_byzantine + 3 = "
                f"{self.n_byzantine + 3} tasks (each score sums over T - n_byzantine - 2 >= 1 "
                f"neighbours), got {T}"
            )
        if self.n_selected > T:
            raise ValueError(
                f"Krum(n_selected={self.n_selected}) averages n_selected gradients but got only "
                f"{T} tasks"
            )
        return torch.ops.mtlgrad.krum_weights(G, self.n_byzantine, self.n_selected)
