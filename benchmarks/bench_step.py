"""Training-step benchmark on a shared-trunk model, all figures measured in one run: the `step`
suite of `mtlgrad bench`, with its sizes as flags.

A residual MLP trunk (4 blocks of width 1024: 8.4M shared parameters) with T linear heads, batch
128. For T = 2, 4, 8: time per step and peak memory of the plain summed loss, of
``mtlgrad.backward`` with each aggregator (``loop`` and ``batched`` engines, and ``features=z``),
and of TorchJD (``mtl_backward`` +
``jac_to_grad``) and LibMTL when installed; plus the share of the step spent in the aggregation
itself. Then the engines table: UPGrad through the Gram engine, the loop engine and TorchJD's
autogram and autojac on an MLP (T = 4, 8), a CNN and a transformer trunk (T = 8). Each
configuration runs in its own process (``python -m mtlgrad.bench._step --worker``, or
``mtlgrad.bench._engines``).

    python benchmarks/bench_step.py             # T = 2, 4, 8; PCGrad, MGDA, UPGrad; all cases
    python benchmarks/bench_step.py --quick     # T = 2, 4; PCGrad only; fewer repetitions; mlp:4
    python benchmarks/bench_step.py --methods UPGrad --tasks 8 --engine-cases mlp:8 cnn:16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlgrad.bench import execute
from mtlgrad.bench._step import METHODS, VARIANTS, StepConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        help="the loop and batched engines, and features (the loop engine with features=z)",
    )
    parser.add_argument(
        "--engine-cases",
        nargs="+",
        metavar="TRUNK:T",
        help="rows of the engines table: mlp, cnn or transformer, and the task count (mlp:8)",
    )
    parser.add_argument(
        "--engine-rounds", type=int, help="interleaved rounds of each engine case (default 3)"
    )
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--quick", action="store_true", help="T = 2, 4; PCGrad; 3 repetitions")
    parser.add_argument("--out", type=Path, help="also write JSON and markdown results here")
    args = parser.parse_args()
    config = StepConfig.for_size("quick" if args.quick else "full")
    for name in ("tasks", "methods", "variants", "engine_cases", "engine_rounds", "repeat"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    execute({"step": config}, device_name=args.device, out=args.out)


if __name__ == "__main__":
    main()
