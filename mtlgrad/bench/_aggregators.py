"""Per-method benchmark of the aggregators, all figures measured in one run.

For each method and T: our ``agg.weights(G)`` (the native solver), our ``agg(J)`` on a T x P fp32
matrix, the native ``gram`` + ``combine`` alone on the same J (the floor of any Gram-based
method), and TorchJD's aggregator of the same method when TorchJD is installed. Then the layout of
a real model: P parameters held as many tensors per task, where TorchJD first concatenates the
gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mtlgrad.bench._harness import (
    FLAGS_NOTE,
    Column,
    Rotation,
    Table,
    Timer,
    Timing,
    flags,
    ratio,
    rotation_copies,
    split_sizes,
    timed,
)


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _ours(name: str, T: int) -> Any:
    from mtlgrad import aggregators as ours

    factories: dict[str, Callable[[], Any]] = {
        "PCGrad": lambda: ours.PCGrad(generator=_seeded()),
        "GradVac": lambda: ours.GradVac(generator=_seeded()),
        "CAGrad": lambda: ours.CAGrad(c=0.5),
        "FairGrad": lambda: ours.FairGrad(alpha=1.0),
        "RLW": lambda: ours.RLW(generator=_seeded()),
        "GradDrop": lambda: ours.GradDrop(generator=_seeded()),
        "CosineGating": lambda: ours.CosineGating(main=0),
        "HydaLearn": lambda: ours.HydaLearn(main=0),
        "GradientMatching": lambda: ours.GradientMatching(main=0),
        "Krum": lambda: ours.Krum(n_byzantine=max(0, (T - 3) // 2), n_selected=1),
        "TrimmedMean": lambda: ours.TrimmedMean(trim_number=(T - 1) // 4),
        "CRMOGM": lambda: ours.CRMOGM(ours.UPGrad(reg_eps=1e-4)),
        "DBMTL": lambda: _WithLosses(ours.DBMTL()),
        "MoDo": lambda: ours.MoDo(num_tasks=_sub_batch_tasks(T)),
        "SDMGrad": lambda: ours.SDMGrad(num_tasks=_sub_batch_tasks(T)),
    }
    return factories.get(name, getattr(ours, name))()


class _WithLosses:
    """A method that needs the task losses (DB-MTL), timed with losses of 1 (the timing does not
    depend on their values)."""

    def __init__(self, aggregator: Any) -> None:
        self.aggregator = aggregator

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        return self.aggregate(list(J.unbind(0)), J.shape[0]).out[0]

    def aggregate(self, grads: list[torch.Tensor], T: int, out: Any = None) -> Any:
        losses = torch.ones(T, dtype=torch.float64)
        return self.aggregator.aggregate(grads, T, out, losses=losses)


def _sub_batch_tasks(T: int) -> int:
    """The double-sampling methods read the T rows as 2 (or else 3) sub-batches of the tasks."""
    return T // 2 if T % 2 == 0 else T // 3


class _TorchJDDoubleSampling:
    """TorchJD's ``MoDoWeighting`` / ``SDMGradWeighting`` (which take ``J₁ J₂ᵀ``) on the same
    rows as ours: the cross block, the weighting, then the weighted sum of the rows."""

    def __init__(self, weighting: Any, T: int) -> None:
        self.weighting, self.T = weighting, T

    def __call__(self, J: torch.Tensor) -> torch.Tensor:
        t = _sub_batch_tasks(self.T)
        v = self.weighting(J[:t] @ J[t : 2 * t].T)
        w = torch.cat([v / 2, v / 2]) if 2 * t == self.T else torch.cat([0 * v, 0 * v, v])
        return w @ J


# method -> TorchJD's aggregator of the same method for T tasks (None: TorchJD has none)
_TORCHJD: dict[str, Callable[[Any, int], Any] | None] = {
    "Sum": lambda jd, T: jd.Sum(),
    "Mean": lambda jd, T: jd.Mean(),
    "PCGrad": lambda jd, T: jd.PCGrad(),
    "UPGrad": lambda jd, T: jd.UPGrad(),
    "DualProj": lambda jd, T: jd.DualProj(),
    "MGDA": lambda jd, T: jd.MGDA(),
    "GradVac": lambda jd, T: jd.GradVac(),
    "CAGrad": lambda jd, T: jd.CAGrad(c=0.5),
    "IMTLG": lambda jd, T: jd.IMTLG(),
    "NashMTL": lambda jd, T: jd.NashMTL(n_tasks=T),
    "AlignedMTL": lambda jd, T: jd.AlignedMTL(),
    "ConFIG": lambda jd, T: jd.ConFIG(),
    "FairGrad": lambda jd, T: jd.FairGrad(alpha=1.0),
    "RLW": lambda jd, T: jd.Random(),
    "GradDrop": lambda jd, T: jd.GradDrop(),
    "CosineGating": None,
    "HydaLearn": None,
    "GradientMatching": None,
    # Krum: the most Byzantine tasks the paper's guarantee allows (T > 2f + 2); TrimmedMean: a
    # quarter of the tasks trimmed on each side.
    "Krum": lambda jd, T: jd.Krum(n_byzantine=max(0, (T - 3) // 2), n_selected=1),
    "TrimmedMean": lambda jd, T: jd.TrimmedMean(trim_number=(T - 1) // 4),
    "PCD": lambda jd, T: jd.PCD(),
    "CRMOGM": lambda jd, T: jd.GramianWeightedAggregator(jd.CRMOGMWeighting(jd.UPGradWeighting())),
    "ExcessMTL": lambda jd, T: jd.ExcessMTL(),
    "MoCo": None,
    "DBMTL": None,
    # The rows are 2 (or else 3) sub-batches of T/2 (T/3) tasks: MoDo, SDMGrad need one of them.
    "MoDo": lambda jd, T: _TorchJDDoubleSampling(jd.MoDoWeighting(), T),
    "SDMGrad": lambda jd, T: _TorchJDDoubleSampling(jd.SDMGradWeighting(), T),
}
METHODS = list(_TORCHJD)
# Methods that need more tasks than some configurations have (Krum: a score needs a neighbour).
_MIN_TASKS = {"Krum": 3, "MoDo": 2, "SDMGrad": 2}
# Methods whose rows are the tasks on 2 (or 3) sub-batches: T must be even (or a multiple of 3).
_DOUBLE_SAMPLING = {"MoDo", "SDMGrad"}


@dataclass
class AggregatorConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    tasks: list[int] = field(default_factory=lambda: [2, 8, 32, 128])
    params: int = 100_000
    layout_methods: list[str] = field(default_factory=lambda: ["UPGrad", "PCGrad", "MGDA"])
    layout_tasks: int = 8
    layout_params: int = 10_000_000
    layout_tensors: int = 100
    warmup: int = 2
    repeat: int = 7

    @classmethod
    def for_size(cls, size: str) -> AggregatorConfig:
        if size == "quick":
            return cls(tasks=[2, 8], repeat=3, layout_params=2_000_000)
        if size == "tiny":
            return cls(
                tasks=[3],
                params=2_000,
                layout_methods=["UPGrad", "PCGrad"],
                layout_tasks=3,
                layout_params=20_000,
                layout_tensors=5,
                warmup=1,
                repeat=1,
            )
        return cls()

    def validate(self) -> None:
        unknown = sorted(set(self.methods + self.layout_methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")


def count(config: AggregatorConfig, device: torch.device) -> int:
    """Timed measurements of :func:`run` (for the progress bar; an upper bound)."""
    per_t = 1 + 3 * len(config.methods)
    return len(config.tasks) * per_t + 2 * len(config.layout_methods)


def _peer(
    name: str, T: int, peers: dict[str, dict[str, Any]], device: torch.device
) -> tuple[Any | None, str]:
    """TorchJD's aggregator and an empty status, or None and why it is not run."""
    if not peers["TorchJD"]["installed"]:
        return None, "TorchJD not installed"
    factory = _TORCHJD[name]
    if factory is None:
        return None, "no TorchJD version"
    import torchjd.aggregation as jd

    try:
        agg = factory(jd, T)
        agg(torch.randn(T, 10, device=device))  # some need optional dependencies at call time
    except Exception as error:  # noqa: BLE001  (any missing optional dependency)
        why = str(error).split(". ")[0] if isinstance(error, ImportError) else repr(error)
        return None, f"TorchJD's {name} not run: {why[:80]}"
    return agg, ""


def run(
    config: AggregatorConfig,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    progress: Callable[[str], None],
) -> list[Table]:
    config.validate()
    timer = Timer(device, warmup=config.warmup, repeat=config.repeat)
    tables = [_per_method(config, device, peers, timer, progress)]
    if config.layout_methods:
        tables.append(_layout(config, device, peers, timer, progress))
    return tables


def _per_method(
    config: AggregatorConfig,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    timer: Timer,
    progress: Callable[[str], None],
) -> Table:
    from mtlgrad import ops

    table = Table(
        "aggregators",
        f"ms per call on a T x {config.params:,} fp32 matrix (device {device})",
        [
            Column("method", "method"),
            Column("T", "T"),
            Column("weights_ms", "weights(G)", "ms"),
            Column("agg_ms", "agg(J)", "ms"),
            Column("agg_ms_min", "min", "ms"),
            Column("agg_ms_max", "max", "ms"),
            Column("floor_ms", "floor", "ms"),
            Column("agg_over_floor", "agg/floor", "x"),
            Column("peer_ms", "TorchJD", "ms"),
            Column("peer_over_ours", "TorchJD/ours", "x"),
            Column("peer_status", "peer"),
            Column("flags", "flags"),
        ],
        notes=[
            "times: medians of the repetitions; min / max: agg(J)'s fastest and slowest "
            "(every figure's are in the JSON); floor: the native gram + combine alone on the "
            "same J, the floor of any Gram-based method (GradDrop and TrimmedMean are "
            "elementwise: not theirs); TorchJD: the same method's aggregator on the same J; "
            "Krum needs T >= 3 (no row below); MoDo and SDMGrad read the T rows as 2 sub-batches "
            "of T/2 tasks (3 of T/3 for odd T)",
            FLAGS_NOTE,
        ],
    )
    for T in config.tasks:
        gen = torch.Generator().manual_seed(T)
        copies = rotation_copies(T * config.params * 4, device)
        Js = Rotation(
            lambda k, T=T, gen=gen: torch.randn(T, config.params, generator=gen).to(device), copies
        )
        rows = Rotation(lambda k, Js=Js: list(Js.items[k].unbind(0)), copies)
        G = ops.gram(rows[0], T)
        w = torch.full((T,), 1.0 / T, dtype=torch.float64, device=device)

        def floor(i: int, rows=rows, T=T, w=w) -> None:
            ops.gram(rows[i], T)
            ops.combine(rows[i], T, w)

        progress(f"aggregators T={T}: floor")
        t_floor = timer(floor)
        for name in config.methods:
            if _MIN_TASKS.get(name, 1) > T:
                progress(f"aggregators T={T}: {name} needs T >= {_MIN_TASKS[name]}, skipped")
                continue
            if name in _DOUBLE_SAMPLING and T % 2 and T % 3:
                progress(f"aggregators T={T}: {name} needs 2 or 3 sub-batches, skipped")
                continue
            agg = _ours(name, T)
            t_weights: Timing | None = None
            gram_based = hasattr(agg, "weights")
            if gram_based:
                progress(f"aggregators T={T}: {name} weights(G)")
                t_weights = timer(lambda i, agg=agg, G=G: agg.weights(G))
            progress(f"aggregators T={T}: {name} agg(J)")
            t_agg = timer(lambda i, agg=agg, Js=Js: agg(Js[i]))
            other, status = _peer(name, T, peers, device)
            t_peer: Timing | None = None
            if other is not None:
                progress(f"aggregators T={T}: TorchJD {name}")
                t_peer = timer(lambda i, other=other, Js=Js: other(Js[i]))
            over_floor = ratio(t_agg.median, t_floor.median)
            table.rows.append(
                {
                    "method": name,
                    "T": T,
                    **timed("weights_ms", t_weights),
                    **timed("agg_ms", t_agg),
                    **timed("floor_ms", t_floor),
                    "agg_over_floor": over_floor,
                    **timed("peer_ms", t_peer),
                    "peer_over_ours": ratio(_median(t_peer), t_agg.median),
                    "peer_status": status,
                    "flags": flags(
                        {"weights": t_weights, "agg": t_agg, "floor": t_floor, "TorchJD": t_peer},
                        over_floor if gram_based else None,
                    ),
                }
            )
    return table


def _median(timing: Timing | None) -> float | None:
    return None if timing is None else timing.median


def _layout(
    config: AggregatorConfig,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    timer: Timer,
    progress: Callable[[str], None],
) -> Table:
    T, P, K = config.layout_tasks, config.layout_params, config.layout_tensors
    table = Table(
        "aggregators_layout",
        f"A model's layout: T={T}, P={P:,} as {K} tensors per task, ms per step (device {device})",
        [
            Column("method", "method"),
            Column("ours_ms", "mtlgrad", "ms"),
            Column("ours_ms_min", "min", "ms"),
            Column("ours_ms_max", "max", "ms"),
            Column("peer_ms", "TorchJD (cat + aggregate)", "ms"),
            Column("peer_over_ours", "TorchJD/ours", "x"),
            Column("peer_status", "peer"),
            Column("flags", "flags"),
        ],
        notes=["times: medians; min / max: mtlgrad's fastest and slowest repetition", FLAGS_NOTE],
    )
    sizes = split_sizes(P, K, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    copies = rotation_copies(T * P * 4, device)
    flats = Rotation(lambda k: torch.randn(T, P, generator=gen).to(device), copies)
    grads = Rotation(
        lambda k: [g for t in range(T) for g in torch.split(flats.items[k][t], sizes)], copies
    )
    out = [torch.empty(s, device=device) for s in sizes]
    for name in config.layout_methods:
        agg = _ours(name, T)
        progress(f"layout: {name}")
        t_ours = timer(lambda i, agg=agg: agg.aggregate(grads[i], T, out))
        other, status = _peer(name, T, peers, device)
        t_peer: Timing | None = None
        if other is not None:

            def peer_step(i: int, other=other) -> None:
                g = grads[i]
                J = torch.stack([torch.cat(g[t * K : (t + 1) * K]) for t in range(T)])
                d = other(J)
                for o, piece in zip(out, torch.split(d, sizes)):
                    o.copy_(piece)

            progress(f"layout: TorchJD {name}")
            t_peer = timer(peer_step)
        table.rows.append(
            {
                "method": name,
                **timed("ours_ms", t_ours),
                **timed("peer_ms", t_peer),
                "peer_over_ours": ratio(_median(t_peer), t_ours.median),
                "peer_status": status,
                "flags": flags({"mtlgrad": t_ours, "TorchJD": t_peer}),
            }
        )
    return table
