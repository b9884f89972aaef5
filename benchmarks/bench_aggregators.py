"""Per-method benchmark of the aggregators, all figures measured in one run: the `aggregators`
suite of `mtlgrad bench`, with its problem sizes as flags.

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
from pathlib import Path

from mtlgrad.bench import execute
from mtlgrad.bench._aggregators import METHODS, AggregatorConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--tasks", type=int, nargs="+")
    parser.add_argument("--params", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--layout-methods", nargs="*", choices=METHODS)
    parser.add_argument("--quick", action="store_true", help="T = 2, 8; 3 repetitions")
    parser.add_argument("--out", type=Path, help="also write JSON and markdown results here")
    args = parser.parse_args()
    config = AggregatorConfig.for_size("quick" if args.quick else "full")
    for name in ("methods", "tasks", "params", "repeat", "layout_methods"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    execute({"aggregators": config}, device_name=args.device, out=args.out)


if __name__ == "__main__":
    main()
