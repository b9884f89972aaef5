"""Sluice networks: subspaces mixed across tasks, layers mixed per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import Parameter

from mtlgrad.nn._base import MultiTaskModule, check_same_tasks, check_task_names, task_inputs
from mtlgrad.nn._cross_stitch import mixing_matrix

__all__ = ["Sluice"]


def _output_weight(layer: nn.Module) -> Tensor | None:
    """The weight producing the layer's output units: the last submodule's >= 2-D ``weight``."""
    found = None
    for module in layer.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            found = weight
    return found


class Sluice(MultiTaskModule):
    """Sluice networks (Ruder, Bingel, Augenstein & Søgaard, `Latent multi-task architecture
    learning <https://arxiv.org/abs/1705.08142>`_, AAAI 2019).

    Each task has its own stack of K layers. The output of every task's layer k is split along
    the feature dimension into S subspaces; a learned ``(T·S) x (T·S)`` matrix ``α_k`` mixes all
    tasks' subspaces (the paper's α matrix, for T tasks and S subspaces: subspace s of task t is
    ``h̃_{t,s} = Σ_{u,r} α_k[(t,s),(u,r)] h_{u,r}``), and the mixed outputs feed the next layer.
    Each task's final representation is the β-weighted sum of its mixed layer outputs,
    ``Σ_k β_{t,k} h̃_{t,k}`` (the paper's β parameters; all layers must give outputs of one
    shape), which its head reads.

    The subspace orthogonality constraint of the paper is
    :meth:`orthogonality_penalty`: ``Σ_t Σ_k Σ_{s<r} ||W_{t,k,s}ᵀ W_{t,k,r}||_F²`` over the
    weights of the output units of each subspace (the paper's two subspaces give one pair; with
    S > 2 every pair is penalised). Add ``λ * model.orthogonality_penalty()`` to the loss.

    Initialisation, as the paper describes (biased towards one source subspace per direction,
    and towards the last layer): ``α_k`` has ``alpha_self`` on the diagonal and ``alpha_other``
    elsewhere (default ``(1 - alpha_self) / (T·S - 1)``: rows are convex combinations);
    ``β_t`` gives ``beta_last`` to the last layer and shares ``1 - beta_last`` equally among the
    others.

    Partition: the layers of every task feed every task once mixed, so ``shared_parameters()``
    holds all layers and the α's; ``task_parameters(t)`` holds β_t and head t.

    Args:
        layers: one sequence of K layers per task, keyed by task name. The orthogonality penalty
            reads, in each layer, the last submodule's ``weight`` of dimension >= 2 (e.g. an
            ``nn.Linear`` or ``nn.Conv2d``, possibly followed by an activation), whose rows are
            the output units.
        heads: one module per task.
        num_subspaces: S, which must divide the number of output features of every layer.
        feature_dim: the feature dimension of the layers' outputs (-1 for ``(N, F)``, 1 for
            ``(N, C, H, W)``).
        alpha_self, alpha_other, beta_last: the initialisation (see above).
    """

    def __init__(
        self,
        layers: Mapping[str, Sequence[nn.Module]],
        heads: Mapping[str, nn.Module],
        num_subspaces: int = 2,
        feature_dim: int = -1,
        alpha_self: float = 0.9,
        alpha_other: float | None = None,
        beta_last: float = 0.9,
    ) -> None:
        owner = "Sluice"
        if not isinstance(layers, Mapping) or not isinstance(heads, Mapping):
            raise TypeError(f"{owner}: layers and heads must be dicts keyed by task name")
        super().__init__(check_task_names(layers.keys(), owner))
        check_same_tasks(heads.keys(), self.task_names, "heads", owner)
        if isinstance(num_subspaces, bool) or not isinstance(num_subspaces, int):
            raise TypeError(f"{owner}: num_subspaces must be an int, got {num_subspaces!r}")
        if num_subspaces < 1:
            raise ValueError(f"{owner}: num_subspaces must be >= 1, got {num_subspaces}")
        first = self.task_names[0]
        K = len(list(layers[first]))
        if K == 0:
            raise ValueError(f"{owner}: the task {first!r} has no layers")
        for name in self.task_names:
            if len(list(layers[name])) != K:
                raise ValueError(
                    f"{owner}: task {name!r} has {len(list(layers[name]))} layers but task "
                    f"{first!r} has {K}; every task needs the same number of layers"
                )
            for k, layer in enumerate(layers[name]):
                weight = _output_weight(layer)
                if weight is None:
                    raise ValueError(
                        f"{owner}: layer {k} of task {name!r} has no weight of dimension >= 2 "
                        "(the orthogonality penalty needs one, e.g. an nn.Linear)"
                    )
                if weight.shape[0] % num_subspaces:
                    raise ValueError(
                        f"{owner}: layer {k} of task {name!r} has {weight.shape[0]} output units, "
                        f"not divisible into num_subspaces={num_subspaces}"
                    )
        beta_last = float(beta_last)
        if not 0.0 <= beta_last <= 1.0:
            raise ValueError(f"{owner}: beta_last must be in [0, 1], got {beta_last}")
        self.layers = nn.ModuleDict(
            {name: nn.ModuleList(list(layers[name])) for name in self.task_names}
        )
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})
        self.num_subspaces = num_subspaces
        self.feature_dim = int(feature_dim)
        TS = len(self.task_names) * num_subspaces
        self.alphas = nn.ParameterList(
            Parameter(mixing_matrix(TS, alpha_self, alpha_other, owner)) for _ in range(K)
        )
        beta = torch.full((K,), (1.0 - beta_last) / (K - 1) if K > 1 else 0.0)
        beta[-1] = beta_last if K > 1 else 1.0
        self.betas = nn.ParameterDict({name: Parameter(beta.clone()) for name in self.task_names})
        self._num_layers = K
        self.check_partition()

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = task_inputs(x, self.task_names, "Sluice")
        S, T = self.num_subspaces, len(self.task_names)
        hidden = [inputs[name] for name in self.task_names]
        outputs: list[list[Tensor]] = [[] for _ in range(T)]
        for k in range(self._num_layers):
            hidden = [self.layers[name][k](h) for name, h in zip(self.task_names, hidden)]
            shapes = [list(h.shape) for h in hidden]
            if any(s != shapes[0] for s in shapes) or (
                k and shapes[0] != list(outputs[0][0].shape)
            ):
                raise ValueError(
                    f"Sluice: layer {k} gives outputs of shapes "
                    f"{dict(zip(self.task_names, shapes))}; every layer of every task must give "
                    "one shape (they are mixed across tasks and summed over layers)"
                )
            features = shapes[0][self.feature_dim]
            if features % S:
                raise ValueError(
                    f"Sluice: layer {k} gives {features} features (dimension "
                    f"{self.feature_dim}), not divisible into {S} subspaces"
                )
            chunks = torch.stack([c for h in hidden for c in h.chunk(S, dim=self.feature_dim)])
            alpha = self.alphas[k].to(chunks.dtype)
            mixed = torch.einsum("ij,j...->i...", alpha, chunks).unbind(0)
            hidden = [torch.cat(mixed[t * S : (t + 1) * S], dim=self.feature_dim) for t in range(T)]
            for t in range(T):
                outputs[t].append(hidden[t])
        result = {}
        for t, name in enumerate(self.task_names):
            beta = self.betas[name].to(outputs[t][0].dtype)
            final = torch.einsum("k,k...->...", beta, torch.stack(outputs[t]))
            result[name] = self.heads[name](final)
        return result

    def orthogonality_penalty(self) -> Tensor:
        """``Σ_t Σ_k Σ_{s<r} ||W_{t,k,s}ᵀ W_{t,k,r}||_F²`` (unscaled), with ``W_{t,k,s}`` the
        weights of the output units of subspace s of layer k of task t (one column per unit)."""
        S = self.num_subspaces
        terms = []
        for name in self.task_names:
            for layer in self.layers[name]:
                weight = _output_weight(layer)
                blocks = weight.reshape(weight.shape[0], -1).chunk(S, dim=0)  # (units, inputs)
                for s in range(S):
                    for r in range(s + 1, S):
                        terms.append((blocks[s] @ blocks[r].t()).pow(2).sum())
        if not terms:
            return torch.zeros((), device=self.alphas[0].device)
        return torch.stack(terms).sum()

    def _shared_parameter_list(self) -> list[Parameter]:
        return list(self.layers.parameters()) + list(self.alphas.parameters())

    def _task_parameter_list(self, name: str) -> list[Parameter]:
        return [self.betas[name], *self.heads[name].parameters()]

    def extra_repr(self) -> str:
        return (
            f"task_names={self.task_names}, num_subspaces={self.num_subspaces}, "
            f"feature_dim={self.feature_dim}"
        )
