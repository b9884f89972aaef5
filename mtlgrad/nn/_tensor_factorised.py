"""Tensor-factorised multi-task layers: each layer's stacked task weights as a factorisation
with shared factors and one task-specific factor per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_task_names

__all__ = ["TensorFactorisedNetwork"]

FACTORISATIONS = ("tucker", "tt", "laf")
RANK_COUNTS = {"tucker": 3, "tt": 2, "laf": 1}


class _FactorisedLayer(nn.Module):
    """One layer: shared factors, and per task a factor vector and a bias."""

    def __init__(
        self, d_in: int, d_out: int, tasks: list[str], factorisation: str, ranks: list[int]
    ) -> None:
        super().__init__()
        self.factorisation = factorisation
        self.d_in, self.d_out = d_in, d_out
        # Every factor N(0, 1/fan) so that each task's weight has variance 1/d_in.
        if factorisation == "tucker":
            k1, k2, k3 = ranks
            self.core = Parameter(torch.randn(k1, k2, k3) / d_in**0.5)
            self.input_factor = Parameter(torch.randn(d_in, k1) / k1**0.5)
            self.output_factor = Parameter(torch.randn(d_out, k2) / k2**0.5)
            task_rank = k3
        elif factorisation == "tt":
            r1, r2 = ranks
            self.input_core = Parameter(torch.randn(d_in, r1) / d_in**0.5)
            self.output_core = Parameter(torch.randn(r1, d_out, r2) / r1**0.5)
            task_rank = r2
        else:
            (k,) = ranks
            self.basis = Parameter(torch.randn(d_in * d_out, k) / d_in**0.5)
            task_rank = k
        self.task_factors = nn.ParameterDict(
            {name: Parameter(torch.randn(task_rank) / task_rank**0.5) for name in tasks}
        )
        self.biases = nn.ParameterDict({name: Parameter(torch.zeros(d_out)) for name in tasks})

    def shared(self) -> list[Parameter]:
        if self.factorisation == "tucker":
            return [self.core, self.input_factor, self.output_factor]
        if self.factorisation == "tt":
            return [self.input_core, self.output_core]
        return [self.basis]

    def weight(self, name: str) -> Tensor:
        """Task ``name``'s ``(d_in, d_out)`` weight: its slice of the factorised tensor."""
        u = self.task_factors[name]
        if self.factorisation == "tucker":
            core = torch.einsum("abc,c->ab", self.core, u)  # S ×_3 u_t
            return self.input_factor @ core @ self.output_factor.T
        if self.factorisation == "tt":
            return self.input_core @ torch.einsum("ajb,b->aj", self.output_core, u)
        return (self.basis @ u).reshape(self.d_in, self.d_out)


class TensorFactorisedNetwork(MultiTaskModule):
    """Deep multi-task representation learning by tensor factorisation (Yang & Hospedales,
    `Deep multi-task representation learning: a tensor factorisation approach
    <https://arxiv.org/abs/1605.06391>`_, ICLR 2017).

    A network of linear layers (an activation between them) where task t's layer ℓ computes
    ``h @ W_t + b_t`` and the T weights of the layer, stacked into ``W in R^{D_in x D_out x T}``,
    are a factorisation whose last (task) factor holds one vector per task::

        "tucker":  W = S ×_1 U_in ×_2 U_out ×_3 U_T,   W_t = U_in (S ×_3 u_t) U_outᵀ
                   (S: K1 x K2 x K3, U_in: D_in x K1, U_out: D_out x K2, u_t in R^K3)
        "tt":      W[i, j, t] = G_in[i, :] G_out[:, j, :] g_t   (tensor train; ranks r1, r2)
        "laf":     W_(3)ᵀ = L [s_1 ... s_T]   (last-axis flattening: (D_in D_out) x K, s_t in R^K)

    The paper augments the input with a constant 1 so that the bias is a row of ``W``; here each
    task has its own bias ``b_t`` beside the factorisation. The paper initialises the factors by
    decomposing single-task networks' weights; here they are drawn at random, each factor
    ``N(0, 1/fan)`` so that ``W_t`` has variance ``1/D_in``.

    Partition: the shared factors (S, U_in, U_out; G_in, G_out; L) of every layer are shared;
    task t's factor vectors (u_t, g_t, s_t) and biases are its own.

    Args:
        sizes: ``[D_0, D_1, ..., D_L]``: the input size, then each layer's output size.
        task_names: the tasks, in order.
        factorisation: ``"tucker"``, ``"tt"`` or ``"laf"``.
        ranks: the ranks of every layer (``(K1, K2, K3)``, ``(r1, r2)`` or ``(K,)``), or one
            such tuple per layer.
        activation: builds the module applied between layers (``nn.ReLU`` by default).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        task_names: Sequence[str],
        factorisation: str = "tucker",
        ranks: Sequence[int] | Sequence[Sequence[int]] = (4, 4, 2),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        owner = "TensorFactorisedNetwork"
        super().__init__(check_task_names(task_names, owner))
        if factorisation not in FACTORISATIONS:
            raise ValueError(
                f"{owner}: factorisation must be one of {FACTORISATIONS}, got {factorisation!r}"
            )
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"{owner}: sizes must list the input size and at least one layer")
        for i, s in enumerate(sizes):
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"{owner}: sizes[{i}] must be a positive int, got {s!r}")
        num_layers = len(sizes) - 1
        ranks = list(ranks)
        per_layer = ranks if ranks and isinstance(ranks[0], Sequence) else [ranks] * num_layers
        if len(per_layer) != num_layers:
            raise ValueError(
                f"{owner}: ranks lists {len(per_layer)} layers, but sizes gives {num_layers}"
            )
        count = RANK_COUNTS[factorisation]
        for i, layer_ranks in enumerate(per_layer):
            layer_ranks = list(layer_ranks)
            if len(layer_ranks) != count or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in layer_ranks
            ):
                raise ValueError(
                    f"{owner}: the {factorisation!r} factorisation takes {count} positive int "
                    f"rank(s) per layer, got {layer_ranks!r} for layer {i}"
                )
        self.factorisation = factorisation
        self.sizes = sizes
        self.layers = nn.ModuleList(
            _FactorisedLayer(sizes[i], sizes[i + 1], self.task_names, factorisation, list(r))
            for i, r in enumerate(per_layer)
        )
        self.activation = activation()
        self.check_partition()

    def task_weight(self, layer: int, name: str) -> Tensor:
        """Task ``name``'s ``(D_in, D_out)`` weight at ``layer``."""
        return self.layers[layer].weight(self.check_task(name))

    def stacked_weight(self, layer: int) -> Tensor:
        """The ``(D_in, D_out, T)`` tensor of the layer's task weights (task mode last)."""
        return torch.stack([self.task_weight(layer, name) for name in self.task_names], dim=-1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() < 1 or x.shape[-1] != self.sizes[0]:
            raise ValueError(
                f"TensorFactorisedNetwork: the input's last dimension must be sizes[0]="
                f"{self.sizes[0]}, got shape {list(x.shape)}"
            )
        result = {}
        for name in self.task_names:
            h = x
            for i, layer in enumerate(self.layers):
                h = h @ layer.weight(name) + layer.biases[name]
                if i < len(self.layers) - 1:
                    h = self.activation(h)
            result[name] = h
        return result

    def extra_repr(self) -> str:
        return (
            f"task_names={self.task_names}, sizes={self.sizes}, "
            f"factorisation={self.factorisation!r}"
        )

    def _shared_parameter_list(self) -> list[Parameter]:
        return [p for layer in self.layers for p in layer.shared()]

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [p for layer in self.layers for p in (layer.task_factors[name], layer.biases[name])]
