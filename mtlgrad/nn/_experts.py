"""Argument checks and the weighted sum shared by the mixture-of-experts models (CGC, PLE,
DSelect-k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "check_gate_input",
    "check_in_features",
    "check_modules",
    "mix_experts",
    "stack_experts",
]


def check_modules(
    modules: Sequence[nn.Module], what: str, owner: str, *, minimum: int = 1
) -> list[nn.Module]:
    """``modules`` as a list of at least ``minimum`` nn.Modules (a clear error otherwise)."""
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"{owner}: {what} must be a list of modules, got one {type(modules).__name__}"
        )
    result = list(modules)
    if len(result) < minimum:
        raise ValueError(
            f"{owner}: {what} must hold at least {minimum} module(s), got {len(result)}"
        )
    for i, module in enumerate(result):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{owner}: {what}[{i}] must be an nn.Module, got {type(module).__name__}"
            )
    return result


def check_in_features(value: object, what: str, owner: str) -> int:
    """``value`` if it is a positive int, else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {what} must be a positive int, got {value!r}")
    return value


def stack_experts(outputs: Sequence[Tensor], x: Tensor, owner: str, what: str) -> Tensor:
    """The experts' outputs stacked on a new last dimension, ``(..., expert output, n)``, after
    checking that they have one shape and keep the leading dimensions of the gates' input ``x``
    (the gates weigh each sample's experts)."""
    shapes = [list(o.shape) for o in outputs]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{owner}: {what} give outputs of different shapes {shapes}")
    stacked = torch.stack(list(outputs), dim=-1)
    if stacked.shape[: x.dim() - 1] != x.shape[:-1]:
        raise ValueError(
            f"{owner}: the outputs {shapes[0]} of {what} must keep the gate input's leading "
            f"dimensions {list(x.shape[:-1])} (the gates weigh each sample's experts)"
        )
    return stacked


def mix_experts(stacked: Tensor, weights: Tensor, x: Tensor) -> Tensor:
    """``Σ_i weights[..., i] stacked[..., i]``: ``stacked`` from :func:`stack_experts` on the
    gates' input ``x``, ``weights`` of shape ``(*x.shape[:-1], n)`` (or ``(n,)`` for a gate that
    does not depend on the input)."""
    extra = stacked.dim() - x.dim()  # the expert output's own dimensions
    if weights.dim() == 1:
        return (stacked * weights.to(stacked.dtype)).sum(dim=-1)
    g = weights.reshape(*x.shape[:-1], *([1] * extra), -1).to(stacked.dtype)
    return (stacked * g).sum(dim=-1)


def check_gate_input(x: Tensor, in_features: int, owner: str, what: str = "the gates") -> None:
    """A ValueError when ``x``'s last dimension is not the gates' ``in_features``."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{owner}: the input's last dimension is "
            f"{x.shape[-1] if x.dim() else 'missing'}, but {what} take in_features={in_features}"
        )
