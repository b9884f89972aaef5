"""Where the Gram engine's step goes, against the loop engine's, on one case of the engines table.

The step of each engine (and of the summed loss) on the same model and batches, interleaved
repetition by repetition, then one profiled pass of the Gram engine's step split by its
``torch.profiler`` ranges:

- ``mtlgrad::gram_engine::backward``: the vmapped backward over the T tasks towards the
  activations, including the layers' contributions to G made during it;
- ``mtlgrad::gram_engine::layer``: those contributions (ghost or materialising way, per layer);
- ``mtlgrad::gram_engine::write``: the one backward of ``Σ_t w_t L_t`` into ``.grad``;
- ``mtlgrad::gram_engine::heads``: each task's own part of the graph (its head), differentiated
  alone before the vmapped backward.

    python benchmarks/profile_gram_engine.py                # the MLP at T = 8 (mlp:8)
    python benchmarks/profile_gram_engine.py --case transformer:8 --repeat 5

Times are medians of ``--repeat`` steps after two warm-ups, in this process (one machine, one
run: compare the rows with one another, not with another run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtlgrad.bench._engines import build_step

RANGES = ("heads", "backward", "layer", "write")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", default="mlp:8", help="trunk:tasks, as in the engines table")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    spec = {"case": args.case, "size": args.size}
    steps = {
        e: build_step({**spec, "engine": e}, torch.device("cpu"))
        for e in ("summed", "loop", "gram")
    }
    for step in steps.values():
        for i in range(2):
            step(i)
    times: dict[str, list[float]] = {e: [] for e in steps}
    for i in range(args.repeat):
        for engine, step in steps.items():
            start = time.perf_counter()
            step(i)
            times[engine].append(time.perf_counter() - start)
    median = {e: statistics.median(t) * 1e3 for e, t in times.items()}
    spread = {e: max(t) / min(t) for e, t in times.items()}

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        for i in range(args.repeat):
            steps["gram"](i)
        profiled = (time.perf_counter() - start) / args.repeat * 1e3
    ranges = {
        event.key.rsplit("::", 1)[1]: event.cpu_time_total / 1e3 / args.repeat
        for event in profile.key_averages()
        if event.key.startswith("mtlgrad::gram_engine::")
    }

    print(f"{args.case} ({args.size}), medians of {args.repeat} steps, one process")
    for engine in steps:
        print(
            f"  {engine:7s} {median[engine]:8.1f} ms  (spread {spread[engine]:.2f}x)"
            f"  x loop {median[engine] / median['loop']:.3f}"
        )
    print(f"  gram engine, per step of a profiled pass ({profiled:.1f} ms with the profiler on):")
    for name in RANGES:
        print(f"    {name:9s} {ranges.get(name, 0.0):8.1f} ms")
    rest = profiled - sum(ranges.get(name, 0.0) for name in ("heads", "backward", "write"))
    print(f"    the rest  {rest:8.1f} ms (forward, aggregation, the heads' .grad)")


if __name__ == "__main__":
    main()
