"""The methods the demo can run, by command-line name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from mtlgrad.aggregators import (
    IMTLG,
    MGDA,
    RLW,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    Mean,
    NashMTL,
    PCGrad,
    Sum,
    UPGrad,
)

__all__ = ["METHODS", "Method", "resolve_methods"]


@dataclass(frozen=True)
class Method:
    """A method of the demo.

    Attributes:
        key: the command-line name.
        label: the name shown in tables and figures.
        make: builds a fresh aggregator from a seed (for the randomised ones); ``None`` for the
            loss-based uncertainty weighting, which needs no per-task gradients.
    """

    key: str
    label: str
    make: Callable[[int], Aggregator] | None

    @property
    def loss_based(self) -> bool:
        return self.make is None


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


METHODS = {
    m.key: m
    for m in (
        Method("sum", "Sum", lambda seed: Sum()),
        Method("mean", "Mean", lambda seed: Mean()),
        Method("pcgrad", "PCGrad", lambda seed: PCGrad(generator=_seeded(seed))),
        Method("mgda", "MGDA", lambda seed: MGDA()),
        Method("cagrad", "CAGrad", lambda seed: CAGrad(c=0.5)),
        Method("upgrad", "UPGrad", lambda seed: UPGrad()),
        Method("nashmtl", "Nash-MTL", lambda seed: NashMTL()),
        Method("imtlg", "IMTL-G", lambda seed: IMTLG()),
        Method("uw", "UW", None),
        # Not in the default runs, available by name.
        Method("dualproj", "DualProj", lambda seed: DualProj()),
        Method("alignedmtl", "Aligned-MTL", lambda seed: AlignedMTL()),
        Method("config", "ConFIG", lambda seed: ConFIG()),
        Method("gradvac", "GradVac", lambda seed: GradVac(generator=_seeded(seed))),
        Method("graddrop", "GradDrop", lambda seed: GradDrop(generator=_seeded(seed))),
        Method("rlw", "RLW", lambda seed: RLW(generator=_seeded(seed))),
    )
}

# Other spellings accepted on the command line.
ALIASES = {"uncertainty": "uw", "ls": "sum"}


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("-", "").replace("_", "")
    return ALIASES.get(key, key)


def resolve_methods(names: Sequence[str], allowed: Sequence[str]) -> list[Method]:
    """The methods named on the command line, in order, without repeats.

    Names are case-insensitive and may keep the paper's hyphens (``Nash-MTL``, ``IMTL-G``).
    Raises a ``ValueError`` naming every unknown method and listing the ones ``allowed``.
    """
    methods: list[Method] = []
    unknown = []
    for name in names:
        key = _normalise(name)
        if key not in allowed:
            unknown.append(name)
        elif METHODS[key] not in methods:
            methods.append(METHODS[key])
    if unknown:
        raise ValueError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(allowed)}"
        )
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(allowed)}")
    return methods
