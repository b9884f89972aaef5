"""The training step under torch.distributed, all figures measured in one run: the
`distributed` suite of `mtlgrad bench`, with its sizes as flags.

Every rank a process on this machine (gloo on loopback, CPU, one thread each): UPGrad with T=4
heads on the step benchmark's residual MLP trunk (2 blocks of width 512), 64 samples per rank.
For world sizes 2 and 4: time per step, and the bytes handed to torch.distributed's collectives
in one step (counted in rank 0, not estimated), for per-task all-reduces written by hand
(``naive``), replicated mode, sharded mode and ``features=z``.

    python benchmarks/bench_distributed.py                  # worlds 2 and 4, every mode
    python benchmarks/bench_distributed.py --worlds 2 --tasks 8 --modes replicated sharded
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlgrad.bench import execute
from mtlgrad.bench._distributed import MODES, DistributedConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", help="world sizes (default 2 4)")
    parser.add_argument("--modes", nargs="+", choices=MODES)
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--batch", type=int, help="samples per rank")
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--quick", action="store_true", help="world 2 only; 3 repetitions")
    parser.add_argument("--out", type=Path, help="also write JSON and markdown results here")
    args = parser.parse_args()
    config = DistributedConfig.for_size("quick" if args.quick else "full")
    for name in ("worlds", "modes", "tasks", "width", "depth", "batch", "repeat"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    execute({"distributed": config}, out=args.out)


if __name__ == "__main__":
    main()
