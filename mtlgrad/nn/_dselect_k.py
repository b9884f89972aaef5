"""DSelect-k: shared experts mixed by differentiable top-k selection gates, one per task."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names
from mtlgrad.nn._experts import (
    check_gate_input,
    check_in_features,
    check_modules,
    mix_experts,
    stack_experts,
)

__all__ = ["DSelectK", "smooth_step"]


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step function of DSelect-k (Hazimeh et al. 2021): 0 for
    ``t <= -gamma/2``, 1 for ``t >= gamma/2``, ``-2 t³/gamma³ + 3 t/(2 gamma) + 1/2`` between
    (continuously differentiable, with exact zeros and ones outside the interval)."""
    cubic = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic)).to(t.dtype)


class DSelectK(MultiTaskModule):
    """Shared experts mixed by DSelect-k gates (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen,
    Mazumder, Hong & Chi, `DSelect-k: differentiable selection in the mixture of experts with
    applications to multi-task learning <https://arxiv.org/abs/2106.03760>`_, NeurIPS 2021).

    n shared experts ``f_1..f_n`` and ``m = ceil(log2 n)``. Task t's gate holds k single-expert
    selectors, each a binary code ``z^(i) in R^m`` passed through the smooth step ``S``
    (:func:`smooth_step`), and selector weights ``α in R^k``::

        r(z)_j = Π_{l=1..m} (S(z_l) if bit l of j is 1 else 1 - S(z_l)),   j = 0..n-1
        q(α, Z) = Σ_{i=1..k} softmax(α)_i r(z^(i)),   y_t = h^t(Σ_j q_j f_j(x))

    The bits of j are read most significant first (LibMTL's and the official implementation's
    ``binary_repr`` order). With ``in_features`` the gates depend on the input (the paper's
    per-example gating): ``Z = W_z x + b_z`` and ``α = W_α x + b_α``; with
    ``in_features=None`` ``Z`` and ``α`` are parameters of the gate (static gating). With
    k = 1 there is no ``α`` (the one selector has weight 1). The
    initialisation follows LibMTL's ``DSelect_k``: ``Z``'s parameters uniform in
    ``(-gamma/100, gamma/100)`` (every selector starts near the middle of the smooth step, so
    every expert gets weight), ``α``'s uniform in ``(-0.05, 0.05)``.

    The regularisers are methods, to add to the loss: :meth:`entropy_penalty` (the paper's
    entropy of each single-expert selector, which pushes them to binary choices) and, when n is
    not a power of 2, :meth:`reachability_penalty` (codes ``>= n`` name no expert; the official
    implementation penalises the selectors' mass on the n real experts falling below 1).

    Partition: the experts are shared; task t's gate and tower are its own.

    Args:
        experts: the ``n >= 2`` shared experts; each maps x to an output of one shape that keeps
            x's leading dimensions.
        towers: one module per task, keyed by task name (the task order).
        num_nonzeros: k, the number of experts each gate selects (``1 <= k <= n``).
        in_features: d, the size of the input's last dimension for per-example gates, or None
            for static gates.
        gamma: the width of the smooth step's transition (positive; 1 in the paper).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        towers: Mapping[str, nn.Module],
        num_nonzeros: int,
        in_features: int | None = None,
        gamma: float = 1.0,
    ) -> None:
        owner = "DSelectK"
        if not isinstance(towers, Mapping):
            raise TypeError(f"{owner}: towers must be a dict {{task name: module}}")
        super().__init__(check_task_names(towers.keys(), owner))
        check_same_tasks(towers.keys(), self.task_names, "towers", owner)
        expert_list = check_modules(experts, "experts", owner, minimum=2)
        n = len(expert_list)
        if isinstance(num_nonzeros, bool) or not isinstance(num_nonzeros, int):
            raise TypeError(f"{owner}: num_nonzeros must be an int, got {num_nonzeros!r}")
        if not 1 <= num_nonzeros <= n:
            raise ValueError(
                f"{owner}: num_nonzeros (k) must be between 1 and the number of experts {n}, "
                f"got {num_nonzeros}"
            )
        if in_features is not None:
            check_in_features(in_features, "in_features", owner)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"{owner}: gamma must be a positive number, got {gamma!r}")
        self.num_experts = n
        self.num_nonzeros = num_nonzeros
        self.num_binary = math.ceil(math.log2(n))
        self.in_features = in_features
        self.gamma = float(gamma)
        codes = [
            [(j >> (self.num_binary - 1 - b)) & 1 for b in range(self.num_binary)] for j in range(n)
        ]
        # (n, m): bit l of expert j, most significant first; not saved (a function of n).
        self.register_buffer(
            "binary_codes", torch.tensor(codes, dtype=torch.bool), persistent=False
        )
        self.experts = nn.ModuleList(expert_list)
        k, m = num_nonzeros, self.num_binary
        if in_features is None:
            self.z_logits = nn.ParameterDict(
                {name: Parameter(torch.empty(k, m)) for name in self.task_names}
            )
            self.w_logits = nn.ParameterDict(
                {name: Parameter(torch.empty(k)) for name in self.task_names} if k > 1 else {}
            )
        else:
            self.z_logits = nn.ModuleDict(
                {name: nn.Linear(in_features, k * m) for name in self.task_names}
            )
            self.w_logits = nn.ModuleDict(
                {name: nn.Linear(in_features, k) for name in self.task_names} if k > 1 else {}
            )
        with torch.no_grad():
            for p in self.z_logits.parameters():
                p.uniform_(-self.gamma / 100, self.gamma / 100)
            for p in self.w_logits.parameters():
                p.uniform_(-0.05, 0.05)
        self.towers = nn.ModuleDict({name: towers[name] for name in self.task_names})
        self.check_partition()

    def _z_logits(self, name: str, x: Tensor) -> Tensor:
        """``Z`` of task ``name``'s gate, ``(..., k, m)``: the leading dimensions x's for
        per-example gates, none for static gates."""
        if self.in_features is None:
            return self.z_logits[name]
        check_gate_input(x, self.in_features, "DSelectK")
        z = self.z_logits[name](x)
        return z.reshape(*z.shape[:-1], self.num_nonzeros, self.num_binary)

    def _selector_weights(self, name: str, x: Tensor) -> Tensor | None:
        """``softmax(α)`` of task ``name``'s gate, ``(..., k)``; None when k = 1 (the single
        selector has weight 1, and no α is kept: it would get no gradient)."""
        if self.num_nonzeros == 1:
            return None
        w = self.w_logits[name] if self.in_features is None else self.w_logits[name](x)
        return torch.softmax(w, dim=-1)

    def selector_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: [r(z^(1)), ..., r(z^(k))]}``, each of shape ``(..., k, n)``: the
        single-expert selectors' weights over the n experts."""
        result = {}
        for name in self.task_names:
            z = self._z_logits(name, x)
            s = smooth_step(z, self.gamma).unsqueeze(-2)  # (..., k, 1, m)
            result[name] = torch.where(self.binary_codes, s, 1 - s).prod(dim=-1)
        return result

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: q(α, Z)}``, each of shape ``(..., n)`` for per-example gates, ``(n,)`` for
        static ones: the weights of the n experts; they sum to 1 when n is a power of 2,
        to at most 1 otherwise."""
        selectors = self.selector_outputs(x)
        result = {}
        for name in self.task_names:
            weights = self._selector_weights(name, x)
            r = selectors[name]
            result[name] = r[..., 0, :] if weights is None else (weights.unsqueeze(-1) * r).sum(-2)
        return result

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        gates = self.gate_weights(x)
        stacked = stack_experts(
            [expert(x) for expert in self.experts], x, "DSelectK", "the experts"
        )
        return {
            name: self.towers[name](mix_experts(stacked, gates[name], x))
            for name in self.task_names
        }

    def entropy_penalty(self, x: Tensor | None = None, eps: float = 1e-6) -> Tensor:
        """The entropy regulariser of the paper: ``Σ_t mean_i H(r(z_t^(i)))`` with
        ``H(r) = -Σ_j r_j log(r_j + eps)``, the mean over the k selectors (and the samples, for
        per-example gates), summed over the tasks; multiply by the paper's λ and add it to the
        loss. Zero once every selector picks one expert. ``x`` is the input (None with static
        gates). Each task's term depends only on that task's gate."""
        selectors = self.selector_outputs(self._penalty_input(x))
        return torch.stack(
            [-(r * torch.log(r + eps)).sum(-1).mean() for r in selectors.values()]
        ).sum()

    def reachability_penalty(self, x: Tensor | None = None, eps: float = 1e-6) -> Tensor:
        """When n is not a power of 2: ``Σ_t mean_i 1 / max(Σ_j r(z_t^(i))_j, eps)``, the sum
        over the n real experts (the mean is 1 per task when no selector puts weight on a code
        that names no expert), as in the official implementation; a zero when n is a power of 2.

        It keeps the selectors away from those codes: one that has settled on such a code (every
        ``|z_l| >= gamma/2``) sits where the smooth step is flat, so no gradient brings it back;
        ``eps`` keeps the penalty finite there (the official ``1 / Σ`` is infinite)."""
        selectors = self.selector_outputs(self._penalty_input(x))
        terms = torch.stack([(1 / r.sum(-1).clamp_min(eps)).mean() for r in selectors.values()])
        if self.num_experts == 2**self.num_binary:
            return torch.zeros_like(terms[0])
        return terms.sum()

    def _penalty_input(self, x: Tensor | None) -> Tensor:
        if self.in_features is None:
            return self.binary_codes.new_zeros(0, dtype=torch.float32)  # static gates ignore it
        if x is None:
            raise ValueError("DSelectK: per-example gates need the input x for their penalties")
        return x

    def _shared_parameter_list(self) -> list[Parameter]:
        return list(self.experts.parameters())

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        if self.in_features is None:  # static gates: the logits are parameters
            gate = [self.z_logits[name]] + ([self.w_logits[name]] if self.w_logits else [])
        else:
            gate = [*self.z_logits[name].parameters()]
            if self.w_logits:
                gate += self.w_logits[name].parameters()
        return [*gate, *self.towers[name].parameters()]
