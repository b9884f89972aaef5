"""``mtlgrad bench``: the benchmarks of the kernels, the aggregators, the training step and the
distributed step.

    mtlgrad bench kernels|aggregators|step|distributed|all [--device cpu|cuda] [--quick] [--out DIR]

One harness for all of them (``mtlgrad.bench._harness``): warm-up, repetitions, the median
with the fastest and the slowest repetition, inputs rotated over enough copies that the caches do
not hold the previous repetition's data, and every ratio between figures of the same run (ours vs
the memory floor, ours vs a peer). Figures that a busy machine spoiled are flagged: below their
floor, or with a wide spread between repetitions. The results are printed as tables and written,
with the machine's description, as JSON and markdown into the results folder. Peers (TorchJD,
LibMTL) are compared when installed; a missing one is said so in its rows. The progress bar is
drawn only when stderr is a terminal.

This module only builds the parser at import; torch, tqdm and the peers are imported when a
benchmark runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "SUITES", "configure_parser", "execute", "run"]

SUITES = ("kernels", "aggregators", "step", "distributed")
SIZES = ("full", "quick", "tiny")
DEFAULT_OUT = "mtlgrad-bench-results"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suite", choices=[*SUITES, "all"], help="what to benchmark ('all': every suite in turn)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="full",
        help="problem sizes: 'full' (the recorded figures), 'quick' (about a minute for all), "
        "'tiny' (a smoke test of a few seconds; its figures mean nothing)",
    )
    parser.add_argument(
        "--quick", dest="size", action="store_const", const="quick", help="same as --size quick"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed repetitions (default: per suite and size)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"folder for the JSON and markdown results (default ./{DEFAULT_OUT}/)",
    )


def _configs(size: str, repeat: int | None) -> dict[str, Any]:
    from mtlgrad.bench._aggregators import AggregatorConfig
    from mtlgrad.bench._distributed import DistributedConfig
    from mtlgrad.bench._kernels import KernelConfig
    from mtlgrad.bench._step import StepConfig

    configs = {
        "kernels": KernelConfig.for_size(size),
        "aggregators": AggregatorConfig.for_size(size),
        "step": StepConfig.for_size(size),
        "distributed": DistributedConfig.for_size(size),
    }
    if repeat is not None:
        for config in configs.values():
            config.repeat = repeat
    return configs


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            'mtlgrad bench shows its progress with tqdm: pip install "mtlgrad[cli]"'
        ) from error
    return tqdm


def check_device(name: str) -> Any:
    """The torch device, or a ValueError saying why it cannot be used."""
    import torch

    import mtlgrad

    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: no CUDA device is available to this torch "
                f"({torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)"
            )
        if not getattr(mtlgrad._C, "with_cuda", False):
            raise ValueError(
                "--device cuda: this build of mtlgrad has no CUDA ops (it was built against a "
                "CPU torch or without nvcc); rebuild it with a CUDA torch"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}")
    return torch.device("cpu")


class _Progress:
    """Counts measurements on a tqdm bar: each call starts the next one."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(label[:60])

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.total = self.bar.n  # the count is an upper bound where peers are missing
        self.bar.close()


def execute(
    suites: dict[str, Any],
    device_name: str = "cpu",
    out: Path | None = None,
    size: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs each suite of ``suites`` (name -> its config), prints its tables and, with ``out``,
    writes them as JSON and markdown; returns ``{name: {"tables": [...], "files": [...]}}``.

    With ``progress``, a tqdm bar counts the measurements on stderr when stderr is a terminal
    (never in a log file or a pipe)."""
    from mtlgrad.bench import _aggregators, _distributed, _harness, _kernels, _peers, _step

    modules = {
        "kernels": _kernels,
        "aggregators": _aggregators,
        "step": _step,
        "distributed": _distributed,
    }
    unknown = sorted(set(suites) - set(modules))
    if unknown:
        raise ValueError(f"unknown benchmark suites {unknown}; choose from {list(SUITES)}")
    tqdm = _tqdm() if progress and _interactive() else None
    device = check_device(device_name)
    info = _harness.machine_info(device)
    peers = _peers.detect()
    print(_harness.machine_line(info))
    print(_harness.peer_line(peers))
    results: dict[str, Any] = {}
    for name, config in suites.items():
        module = modules[name]
        if hasattr(config, "validate"):
            config.validate()
        total = module.count(config, device)
        bar = _Progress(tqdm(total=total, unit="run", leave=False)) if tqdm else None
        try:
            tables = module.run(config, device, peers, bar or (lambda label: None))
        finally:
            if bar is not None:
                bar.close()
        for table in tables:
            print()
            print(_harness.text_table(table))
        files: list[Path] = []
        if out is not None:
            settings = {"size": size, **_settings(config)}
            files = list(_harness.write_results(out, name, info, peers, settings, tables))
        results[name] = {"tables": tables, "files": files}
    flagged = _harness.flagged_rows([t for r in results.values() for t in r["tables"]])
    if flagged:
        print(
            f"\n{flagged} row{'s' if flagged > 1 else ''} flagged (see 'flags'): figures below "
            "their floor or with a wide spread between repetitions come from a busy machine; "
            "rerun those on an idle one"
        )
    written = [f for r in results.values() for f in r["files"]]
    if written:
        print("\nresults written to " + ", ".join(str(f) for f in written))
    return results


def _interactive() -> bool:
    """Whether stderr is a terminal (where a progress bar belongs)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _settings(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mtlgrad bench``."""
    if args.repeat is not None and args.repeat < 1:
        print(f"mtlgrad bench: --repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    try:
        if _interactive():
            _tqdm()
        check_device(args.device)
    except (ValueError, ImportError) as error:
        print(f"mtlgrad bench: {error}", file=sys.stderr)
        return 2
    configs = _configs(args.size, args.repeat)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    execute({n: configs[n] for n in names}, device_name=args.device, out=args.out, size=args.size)
    return 0
