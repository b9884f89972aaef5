"""Per-method benchmark of the aggregators, all figures measured in one run.

For each method and T: our ``agg.weights(G)`` (the native solver), our ``agg(J)`` on a T x P fp32
matrix, the native ``gram`` + ``combine`` alone on the same J (the floor of any Gram-based
method), and TorchJD's aggregator of the same method when TorchJD is installed. Then the layout of
a real model: T = 8 tasks, P = 10M parameters held as 100 tensors per task, where TorchJD first
concatenates the gradients.

    python benchmarks/bench_aggregators.py                  # T = 2, 8, 32, 128; P = 100k
    python benchmarks/bench_aggregators.py --quick          # T = 2, 8; fewer repetitions
    python benchmarks/bench_aggregators.py --methods UPGrad PCGrad --tasks 8 128
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib.metadata import version

import torch
from harness import Timer, split_sizes

import mtlgrad
from mtlgrad import aggregators as ours
from mtlgrad import ops

try:
    import torchjd.aggregation as torchjd
except ImportError:  # the comparison is optional (pip install torchjd)
    torchjd = None


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# name -> (our aggregator for T tasks, TorchJD's for T tasks or None)
METHODS: dict[str, tuple[Callable[[int], object], Callable[[int], object] | None]] = {
    "Sum": (lambda T: ours.Sum(), lambda T: torchjd.Sum()),
    "Mean": (lambda T: ours.Mean(), lambda T: torchjd.Mean()),
    "PCGrad": (lambda T: ours.PCGrad(generator=seeded()), lambda T: torchjd.PCGrad()),
    "UPGrad": (lambda T: ours.UPGrad(), lambda T: torchjd.UPGrad()),
    "DualProj": (lambda T: ours.DualProj(), lambda T: torchjd.DualProj()),
    "MGDA": (lambda T: ours.MGDA(), lambda T: torchjd.MGDA()),
    "GradVac": (lambda T: ours.GradVac(generator=seeded()), lambda T: torchjd.GradVac()),
    "CAGrad": (lambda T: ours.CAGrad(c=0.5), lambda T: torchjd.CAGrad(c=0.5)),
    "IMTLG": (lambda T: ours.IMTLG(), lambda T: torchjd.IMTLG()),
    "NashMTL": (lambda T: ours.NashMTL(), lambda T: torchjd.NashMTL(n_tasks=T)),
    "AlignedMTL": (lambda T: ours.AlignedMTL(), lambda T: torchjd.AlignedMTL()),
    "ConFIG": (lambda T: ours.ConFIG(), lambda T: torchjd.ConFIG()),
    "FairGrad": (lambda T: ours.FairGrad(alpha=1.0), lambda T: torchjd.FairGrad(alpha=1.0)),
    "RLW": (lambda T: ours.RLW(generator=seeded()), lambda T: torchjd.Random()),
    "GradDrop": (lambda T: ours.GradDrop(generator=seeded()), lambda T: torchjd.GradDrop()),
    "CosineGating": (lambda T: ours.CosineGating(main=0), None),
    "HydaLearn": (lambda T: ours.HydaLearn(main=0), None),
    "GradientMatching": (lambda T: ours.GradientMatching(main=0), None),
}


def available(names: list[str]) -> list[str]:
    return [n for n in names if hasattr(ours, n)]


def peer(name: str, T: int) -> object | None:
    """TorchJD's aggregator, or None when TorchJD (or what this method needs of it) is missing."""
    factory = METHODS[name][1]
    if torchjd is None or factory is None:
        return None
    try:
        agg = factory(T)
        agg(torch.randn(T, 10))  # some need optional dependencies (cvxpy, scipy) at call time
        return agg
    except Exception:  # noqa: BLE001  (any missing optional dependency)
        return None


def fmt(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def per_method(names: list[str], tasks: list[int], params: int, timer: Timer) -> None:
    print(f"\nms per call on a T x {params:,} fp32 matrix; floor = gram + combine on the same J")
    header = f"{'method':<17}{'T':>5}{'weights(G)':>12}{'agg(J)':>10}{'floor':>9}{'agg/floor':>11}"
    print(header + f"{'TorchJD':>10}{'TorchJD/ours':>14}")
    for T in tasks:
        gen = torch.Generator().manual_seed(T)
        J = torch.randn(T, params, generator=gen)
        rows = list(J.unbind(0))
        G = ops.gram(rows, T)
        w = torch.full((T,), 1.0 / T, dtype=torch.float64)

        def floor(i: int, rows=rows, T=T, w=w) -> None:
            ops.gram(rows, T)
            ops.combine(rows, T, w)

        t_floor = timer(floor)
        for name in names:
            agg = METHODS[name][0](T)
            has_weights = hasattr(agg, "weights")
            t_weights = timer(lambda i, agg=agg, G=G: agg.weights(G)) if has_weights else None
            t_agg = timer(lambda i, agg=agg, J=J: agg(J))
            other = peer(name, T)
            t_peer = timer(lambda i, other=other, J=J: other(J)) if other is not None else None
            ratio = f"{t_peer / t_agg:.1f}x" if t_peer is not None else "not run"
            print(
                f"{name:<17}{T:>5}{fmt(t_weights):>12}{fmt(t_agg):>10}{fmt(t_floor):>9}"
                f"{t_agg / t_floor:>10.2f}x{fmt(t_peer):>10}{ratio:>14}"
            )


def model_layout(names: list[str], timer: Timer) -> None:
    T, P, K = 8, 10_000_000, 100
    sizes = split_sizes(P, K, torch.Generator().manual_seed(1))
    flat = torch.randn(T, P)
    grads = [g for t in range(T) for g in torch.split(flat[t], sizes)]
    out = [torch.empty(s) for s in sizes]
    print(f"\nT={T}, P={P:,} as {K} tensors per task (a model's layout), ms per step")
    print(f"{'method':<17}{'mtlgrad':>10}{'TorchJD (cat + aggregate)':>28}{'TorchJD/ours':>14}")
    for name in names:
        agg = METHODS[name][0](T)
        t_ours = timer(lambda i, agg=agg: agg.aggregate(grads, T, out))
        other = peer(name, T)

        def torchjd_step(i: int, other=other) -> None:
            J = torch.stack([torch.cat(grads[t * K : (t + 1) * K]) for t in range(T)])
            d = other(J)
            for o, piece in zip(out, torch.split(d, sizes)):
                o.copy_(piece)

        t_peer = timer(torchjd_step) if other is not None else None
        ratio = f"{t_peer / t_ours:.1f}x" if t_peer is not None else "not run"
        print(f"{name:<17}{fmt(t_ours):>10}{fmt(t_peer):>28}{ratio:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--layout-methods", nargs="*", default=["UPGrad", "PCGrad", "MGDA"])
    parser.add_argument("--quick", action="store_true", help="T = 2, 8; 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeat = [2, 8], 3
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")

    names = available(args.methods)
    missing = sorted(set(args.methods) - set(names))
    print(
        f"mtlgrad {mtlgrad.__version__}, torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads, {ops.cpu_kernels()} kernels"
    )
    if torchjd is None:
        print("TorchJD: not installed (pip install torchjd): the peer columns are not run")
    else:
        print(
            f"TorchJD {version('torchjd')}: methods whose optional dependencies are missing "
            "(cvxpy, scipy) are marked 'not run'"
        )
    if missing:
        print(f"not in this build of mtlgrad: {', '.join(missing)}")
    timer = Timer(torch.device("cpu"), warmup=2, repeat=args.repeat)
    per_method(names, args.tasks, args.params, timer)
    layout = available(args.layout_methods)
    if layout:
        model_layout(layout, timer)


if __name__ == "__main__":
    main()
