"""The methods the demo can run, by command-line name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from mtlgrad.aggregators import (
    CRMOGM,
    DBMTL,
    IMTLG,
    MGDA,
    PCD,
    RLW,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    DualProj,
    ExcessMTL,
    GradDrop,
    GradVac,
    Krum,
    Mean,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    SDMGrad,
    Sum,
    TrimmedMean,
    UPGrad,
)
from mtlgrad.demo._problem import DemoModel, Task
from mtlgrad.weighting import (
    DWA,
    FAMO,
    GLS,
    STCH,
    GradNorm,
    LossWeighting,
    UncertaintyWeighting,
)

__all__ = ["METHODS", "Method", "resolve_methods"]

# GradNorm's task weights get Adam's learning rate of their own (a parameter group): at the
# model's 1e-3 they take thousands of steps to move across this problem's loss scales. Measured on
# the default run (4000 steps, seed 0), Δm% against Sum: +3.6 at 1e-3, -7.5 at 0.01, -10.3 at
# 0.025, -11.4 at 0.05.
GRADNORM_LR = 0.025

# Constant's hand-set weights for the multi-task problem: 1 / σ_i² for the regression tasks (σ_i =
# 0.1, 1, 10, 100: their MSE scales as σ_i²), 1 for the classification task. The toy has other
# tasks: Constant is not run there.
CONSTANT_WEIGHTS = (100.0, 1.0, 0.01, 1e-4, 1.0)
# The multi-task problem's task count (MoDo and SDMGrad split their losses by it).
DEMO_TASKS = len(CONSTANT_WEIGHTS)


@dataclass(frozen=True)
class Method:
    """A method of the demo: a gradient aggregator or a loss weighting (exactly one factory).

    Attributes:
        key: the command-line name.
        label: the name shown in tables and figures.
        make: builds a fresh aggregator from a seed (for the randomised ones); run through
            :class:`~mtlgrad.optim.MTLOptimizer`.
        make_weighting: builds a fresh loss weighting for a model, its tasks and a seed; the
            training loop backpropagates ``weighting(losses)`` and drives the weighting's hooks
            (see :func:`mtlgrad.demo._train.train`). No per-task gradients are aggregated.
        weighting_lr: Adam's learning rate for the weighting's parameters (``None``: the
            model's).
        toy: False for an aggregator made for the multi-task problem's tasks (Constant's
            weights), which the toy does not offer (nor the loss weightings).
        samples: double-sampling methods (MoDo, SDMGrad): the training loop splits each batch
            into this many sub-batches and hands the aggregator every task's loss on each
            (sample-major); 1 for every other method.
    """

    key: str
    label: str
    make: Callable[[int], Aggregator] | None = None
    make_weighting: Callable[[DemoModel, list[Task], int], LossWeighting] | None = None
    weighting_lr: float | None = None
    toy: bool = True
    samples: int = 1

    def __post_init__(self) -> None:
        if (self.make is None) == (self.make_weighting is None):
            raise ValueError(
                f"method {self.key!r} needs exactly one of make (an aggregator) and "
                "make_weighting (a loss weighting)"
            )

    @property
    def loss_based(self) -> bool:
        return self.make_weighting is not None

    @property
    def runs_on_toy(self) -> bool:
        return self.toy and not self.loss_based


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uncertainty(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return UncertaintyWeighting(len(tasks), kinds=[task.kind for task in tasks])


def _gradnorm(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return GradNorm(len(tasks), model.last_shared_layer.parameters(), alpha=1.5)


def _dwa(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return DWA(len(tasks), temperature=2.0)


def _famo(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return FAMO(len(tasks))


def _gls(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return GLS(len(tasks))


def _stch(model: DemoModel, tasks: list[Task], seed: int) -> LossWeighting:
    return STCH(len(tasks))


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
        Method("uw", "UW", make_weighting=_uncertainty),
        # Not in the default runs, available by name.
        Method("dualproj", "DualProj", lambda seed: DualProj()),
        Method("alignedmtl", "Aligned-MTL", lambda seed: AlignedMTL()),
        Method("config", "ConFIG", lambda seed: ConFIG()),
        Method("gradvac", "GradVac", lambda seed: GradVac(generator=_seeded(seed))),
        Method("graddrop", "GradDrop", lambda seed: GradDrop(generator=_seeded(seed))),
        Method("rlw", "RLW", lambda seed: RLW(generator=_seeded(seed))),
        Method("excessmtl", "ExcessMTL", lambda seed: ExcessMTL()),
        Method("moco", "MoCo", lambda seed: MoCo()),
        Method("dbmtl", "DB-MTL", lambda seed: DBMTL()),
        # Double sampling: each batch split in two, the weights' step from J1 J2ᵀ.
        Method("modo", "MoDo", lambda seed: MoDo(DEMO_TASKS), toy=False, samples=2),
        Method("sdmgrad", "SDMGrad", lambda seed: SDMGrad(DEMO_TASKS), toy=False, samples=2),
        Method("constant", "Constant", lambda seed: Constant(CONSTANT_WEIGHTS), toy=False),
        # Robust aggregation (5 tasks: one may be an outlier), PCD (task 0 primary), and UPGrad's
        # weights smoothed across steps.
        Method("krum", "Krum", lambda seed: Krum(n_byzantine=1, n_selected=2), toy=False),
        Method("trimmedmean", "TrimmedMean", lambda seed: TrimmedMean(trim_number=1), toy=False),
        Method("pcd", "PCD", lambda seed: PCD()),
        Method("crmogm", "CR-MOGM", lambda seed: CRMOGM(UPGrad())),
        Method("gradnorm", "GradNorm", make_weighting=_gradnorm, weighting_lr=GRADNORM_LR),
        Method("dwa", "DWA", make_weighting=_dwa),
        Method("famo", "FAMO", make_weighting=_famo),
        Method("gls", "GLS", make_weighting=_gls),
        Method("stch", "STCH", make_weighting=_stch),
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
