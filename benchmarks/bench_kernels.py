"""Microbenchmark of the native gram and combine ops against the memory floor and the usual
pure-PyTorch way (torch.cat, then matmul), all measured in one run: the `kernels` suite of
`mtlgrad bench`, with its problem sizes as flags.

    python benchmarks/bench_kernels.py                 # T=8, P=10M fp32 over 100 tensors, CPU
    python benchmarks/bench_kernels.py --quick         # smaller problem, a few seconds
    python benchmarks/bench_kernels.py --device cuda --tasks 8 32 --params 100_000_000 \
        --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlgrad.bench import execute
from mtlgrad.bench._kernels import DTYPES, KernelConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+")
    parser.add_argument("--params", type=int, nargs="+")
    parser.add_argument("--tensors", type=int)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int)
    parser.add_argument(
        "--no-cat", action="store_true", help="skip the torch.cat + matmul baseline"
    )
    parser.add_argument("--quick", action="store_true", help="P=2M, fewer repetitions")
    parser.add_argument("--out", type=Path, help="also write JSON and markdown results here")
    args = parser.parse_args()
    config = KernelConfig.for_size("quick" if args.quick else "full")
    for name, value in (
        ("tasks", args.tasks),
        ("params", args.params),
        ("tensors", args.tensors),
        ("dtypes", args.dtype),
        ("repeat", args.repeat),
    ):
        if value is not None:
            setattr(config, name, value)
    config.with_cat = not args.no_cat
    execute({"kernels": config}, device_name=args.device, out=args.out)


if __name__ == "__main__":
    main()
