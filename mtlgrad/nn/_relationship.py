"""Deep relationship networks: a shared trunk and task-specific layers under tensor-normal
priors whose task and feature covariances are learned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlgrad.nn._multi_task_model import MultiTaskModel
from mtlgrad.regularizers import tensor_normal_covariances, tensor_normal_penalty

__all__ = ["DeepRelationshipNetwork"]


class DeepRelationshipNetwork(MultiTaskModel):
    """Deep relationship networks (Long & Wang, `Learning multiple tasks with deep relationship
    networks <https://arxiv.org/abs/1506.02117>`_, 2015; final version: Long, Cao, Wang & Yu,
    "Learning multiple tasks with multilinear relationship networks", NeurIPS 2017).

    A shared trunk (the paper's lower layers) and one head per task (its task-specific layers,
    all of one structure). Each related parameter of the heads, stacked over the tasks into
    ``W in R^{D_1 x ... x D_K x T}``, has the tensor-normal prior
    ``TN(0, Σ_1, ..., Σ_K, Ω)``: feature covariances ``Σ_k`` (for a linear layer, the output
    and input features) and the task covariance ``Ω``. Training alternates, as in the paper:

    - a gradient step on the task losses plus :meth:`relationship_penalty`,
      ``strength * Σ_layers vec(W)ᵀ (Σ_1 ⊗ ... ⊗ Ω)⁻¹ vec(W)``
      (:func:`mtlgrad.regularizers.tensor_normal_penalty`), the covariances held fixed;
    - :meth:`update_covariances`, the closed-form maximum-likelihood update of the covariances
      (:func:`mtlgrad.regularizers.tensor_normal_covariances`), the weights held fixed.

    The covariances are buffers (in ``state_dict``, not parameters), initialised to identities;
    :meth:`task_covariance` reads Ω. The penalty couples the heads, which stay task parameters:
    each head's gradient is its task's plus the penalty's (added by a plain backward).

    Partition: the trunk is shared; task t's head is its own.

    Args:
        trunk: the shared network.
        heads: one module per task, keyed by task name, with the same parameter names and shapes.
        related: the heads' parameter names under the prior (e.g. ``["0.weight", "2.weight"]``);
            by default every parameter of two dimensions or more (the weights, not the biases).
        strength: λ >= 0, the multiplier of the penalty.
        eps: the ridge added to each covariance at an update (positive).
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        related: Sequence[str] | None = None,
        strength: float = 1e-3,
        eps: float = 1e-3,
    ) -> None:
        super().__init__(trunk, heads)
        owner = "DeepRelationshipNetwork"
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
            raise ValueError(f"{owner}: strength must be a number >= 0, got {strength!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{owner}: eps must be a positive number, got {eps!r}")
        first = self.task_names[0]
        reference = dict(self.heads[first].named_parameters())
        if related is None:
            related = [name for name, p in reference.items() if p.dim() >= 2]
            if not related:
                raise ValueError(
                    f"{owner}: the heads have no parameter of 2 dimensions or more; "
                    "name the related parameters"
                )
        self.related: list[str] = list(related)
        if not self.related or any(not isinstance(n, str) for n in self.related):
            raise ValueError(f"{owner}: related must list parameter names, got {related!r}")
        for task in self.task_names:
            own = dict(self.heads[task].named_parameters())
            for name in self.related:
                if name not in own:
                    raise ValueError(
                        f"{owner}: task {task!r}'s head has no parameter {name!r} "
                        f"(its parameters: {sorted(own)})"
                    )
                if own[name].shape != reference[name].shape:
                    raise ValueError(
                        f"{owner}: parameter {name!r} has shape {list(own[name].shape)} in "
                        f"task {task!r}'s head but {list(reference[name].shape)} in {first!r}'s"
                    )
        self.strength = float(strength)
        self.eps = float(eps)
        for i, name in enumerate(self.related):
            sizes = [*reference[name].shape, len(self.task_names)]
            for m, size in enumerate(sizes):
                self.register_buffer(f"covariance_{i}_{m}", torch.eye(size))

    def _weights(self, index: int) -> list[Tensor]:
        name = self.related[index]
        return [dict(self.heads[t].named_parameters())[name] for t in self.task_names]

    def covariances(self, name: str) -> list[Tensor]:
        """``[Σ_1, ..., Σ_K, Ω]`` of the related parameter ``name``."""
        if name not in self.related:
            raise KeyError(
                f"DeepRelationshipNetwork: {name!r} is not a related parameter; "
                f"they are {self.related}"
            )
        i = self.related.index(name)
        count = self._weights(i)[0].dim() + 1
        return [getattr(self, f"covariance_{i}_{m}") for m in range(count)]

    def task_covariance(self, name: str) -> Tensor:
        """Ω (T x T, tasks in ``task_names`` order) of the related parameter ``name``."""
        return self.covariances(name)[-1]

    def relationship_penalty(self) -> Tensor:
        """``strength * Σ_related vec(W)ᵀ (Σ_1 ⊗ ... ⊗ Σ_K ⊗ Ω)⁻¹ vec(W)`` (a differentiable
        scalar to add to the loss; it reaches the heads only)."""
        terms = [
            tensor_normal_penalty(self._weights(i), self.covariances(name))
            for i, name in enumerate(self.related)
        ]
        return self.strength * torch.stack(terms).sum()

    @torch.no_grad()
    def update_covariances(self) -> None:
        """The closed-form update of every covariance from the current weights (one flip-flop
        sweep per related parameter)."""
        for i, name in enumerate(self.related):
            current = self.covariances(name)
            new = tensor_normal_covariances(self._weights(i), current, eps=self.eps)
            for old, value in zip(current, new, strict=True):
                old.copy_(value)

    def extra_repr(self) -> str:
        return (
            f"task_names={self.task_names}, related={self.related}, strength={self.strength}, "
            f"eps={self.eps}"
        )
