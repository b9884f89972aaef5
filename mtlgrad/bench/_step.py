"""Training-step benchmark on a shared-trunk model, all figures measured in one run.

A residual MLP trunk (by default 4 blocks of width 1024: 8.4M shared parameters) with T linear
heads, batch 128. For each T: time per step and peak memory of the plain summed loss, of
``mtlgrad.backward`` with each aggregator, through the ``loop`` and ``batched`` engines and with
``features=z`` (the task gradients at the trunk's output, loop engine), of TorchJD
(``mtl_backward`` + ``jac_to_grad``) and of LibMTL's weighting when they are installed; plus the
share of the step spent in the aggregation itself (gram + weights + combine on the step's own
task gradients).

Every configuration runs in its own process, ``python -m mtlgrad.bench._step --worker JSON``, so
that its peak memory (the process's peak resident set on the CPU, the allocator's peak on CUDA)
is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtlgrad.bench._harness import FLAGS_NOTE, Column, Table, Timer, Timing, flags, ratio, timed

# How mtlgrad.backward takes the task gradients: its two engines, and the loop engine with
# features=z (gradients at the shared representation, then one backward through the trunk).
VARIANTS = ("loop", "batched", "features")
VARIANT_LABELS = {"loop": "loop", "batched": "batched", "features": "loop, features=z"}
METHODS = ("PCGrad", "MGDA", "UPGrad")
# LibMTL's weighting classes for our methods (LibMTL's UPGrad needs arguments we do not mirror).
LIBMTL_METHODS = {"PCGrad": "PCGrad"}


@dataclass
class StepConfig:
    tasks: list[int] = field(default_factory=lambda: [2, 4, 8])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    width: int = 1024
    depth: int = 4
    batch: int = 128
    warmup: int = 1
    repeat: int = 5

    @classmethod
    def for_size(cls, size: str) -> StepConfig:
        if size == "quick":
            return cls(tasks=[2, 4], methods=["PCGrad"], repeat=3)
        if size == "tiny":
            return cls(
                tasks=[2], methods=["PCGrad"], width=32, depth=1, batch=8, warmup=1, repeat=1
            )
        return cls()

    def validate(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown step methods {unknown}; choose from {list(METHODS)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown step variants {unknown}; choose from {list(VARIANTS)}")


def _configurations(config: StepConfig) -> list[str]:
    """ "summed", then "<method> <variant>", "torchjd <method>", "libmtl <method>"."""
    configs = ["summed"]
    for name in config.methods:
        configs += [f"{name} {variant}" for variant in config.variants]
        configs.append(f"torchjd {name}")
        if name in LIBMTL_METHODS:
            configs.append(f"libmtl {name}")
    return configs


def count(config: StepConfig, device: torch.device) -> int:
    """Configurations of :func:`run` (for the progress bar)."""
    return len(config.tasks) * len(_configurations(config))


# The model and one step, in the worker process ---------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, width)
        self.down = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(torch.nn.Module):
    def __init__(self, tasks: int, width: int, depth: int) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(*(Block(width) for _ in range(depth)))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def shared_parameters(config: StepConfig) -> int:
    return sum(p.numel() for p in Model(1, config.width, config.depth).trunk.parameters())


def _losses(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]


def _aggregator(name: str) -> Any:
    from mtlgrad import aggregators as ours

    if name == "PCGrad":
        return ours.PCGrad(generator=torch.Generator().manual_seed(0))
    return getattr(ours, name)()


def _libmtl_weighting(name: str, shared: list[torch.Tensor], T: int, device: torch.device) -> Any:
    """LibMTL's weighting ``name`` over our model: LibMTL's classes are mixed into its model and
    read the task count, the device and the shared parameters from it."""
    import LibMTL.weighting as libmtl

    base = getattr(libmtl, LIBMTL_METHODS[name])

    class Weighting(base):
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad = T, device, False
            self.init_param()

        def get_share_params(self) -> list[torch.Tensor]:
            return shared

        def zero_grad_share_params(self) -> None:
            for p in shared:
                if p.grad is not None:
                    p.grad.zero_()

    return Weighting()


def build_step(
    config: StepConfig, configuration: str, T: int, device: torch.device
) -> tuple[Callable[[int], None], Callable[[], float]]:
    """One training step of ``configuration`` (its argument rotates two batches), and a function
    timing the aggregation alone on the step's own task gradients (NaN where not measured)."""
    torch.manual_seed(0)
    model = Model(T, config.width, config.depth).to(device)
    shared = list(model.trunk.parameters())
    batches = [
        (
            torch.randn(config.batch, config.width, device=device),
            torch.randn(config.batch, T, device=device),
        )
        for _ in range(2)
    ]
    kind, _, rest = configuration.partition(" ")

    if kind == "summed":

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            sum(_losses(model(x)[1], y)).backward()

    elif kind == "torchjd":
        import torchjd.aggregation as jd
        from torchjd.autojac import jac_to_grad, mtl_backward

        peer = getattr(jd, rest)()

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            z, outputs = model(x)
            mtl_backward(_losses(outputs, y), features=z)
            jac_to_grad(shared, peer)

    elif kind == "libmtl":
        weighting = _libmtl_weighting(rest, shared, T, device)

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad(set_to_none=False)
            weighting.backward(_losses(model(x)[1], y))

    else:
        import mtlgrad

        agg = _aggregator(kind)
        variant = rest

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            z, outputs = model(x)
            mtlgrad.backward(
                _losses(outputs, y),
                shared_params=shared,
                aggregator=agg,
                engine="loop" if variant == "features" else variant,
                features=z if variant == "features" else None,
            )

    def aggregation(timer: Timer) -> float:
        if rest != "loop" or kind in ("torchjd", "libmtl"):
            return float("nan")
        x, y = batches[0]
        losses = _losses(model(x)[1], y)
        flat = [g for loss in losses for g in torch.autograd.grad(loss, shared, retain_graph=True)]
        agg = _aggregator(kind)
        return timer(lambda i: agg.aggregate(flat, T)).median

    return step, aggregation


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: resident set (VmHWM) on the CPU, allocator peak on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows; the figure is the same peak in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: times one configuration (every repetition's seconds), reports its
    peak memory and, for the loop engine, the aggregation alone (median seconds)."""
    config = StepConfig(**spec["config"])
    device = torch.device(spec["device"])
    step, aggregation = build_step(config, spec["configuration"], spec["tasks"], device)
    timer = Timer(device, warmup=config.warmup, repeat=config.repeat)
    times = list(timer(step).times)
    share = aggregation(timer)
    return {"times": times, "peak_mib": peak_memory_mib(device), "aggregation": share}


def measure(config: StepConfig, configuration: str, T: int, device: torch.device) -> dict[str, Any]:
    """Runs :func:`worker` in a fresh process (``python -m mtlgrad.bench._step --worker``)."""
    spec = {"config": asdict(config), "configuration": configuration, "tasks": T}
    spec["device"] = str(device)
    command = [sys.executable, "-m", "mtlgrad.bench._step", "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        raise RuntimeError(
            f"the step benchmark of {configuration!r} at T={T} failed (exit code "
            f"{result.returncode}):\n{result.stderr.strip()[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


COLUMNS = [
    Column("T", "T"),
    Column("step", "step"),
    Column("ms", "time", "ms"),
    Column("ms_min", "min", "ms"),
    Column("ms_max", "max", "ms"),
    Column("x_summed", "x summed", "x"),
    Column("extra_mib", "extra", "MiB"),
    Column("aggregation_share", "aggregation", "%"),
    Column("status", "status"),
    Column("flags", "flags"),
]


def run(
    config: StepConfig,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    progress: Callable[[str], None],
) -> list[Table]:
    config.validate()
    P = shared_parameters(config)
    table = Table(
        "step",
        f"Training step: residual MLP trunk ({config.depth} blocks of width {config.width}, "
        f"{P / 1e6:.2f}M shared parameters), T linear heads, batch {config.batch} "
        f"(device {device})",
        COLUMNS,
        notes=[
            "each row runs in its own process; time: median of the repetitions, min / max: the "
            "fastest and the slowest; 'extra': its peak memory above the summed-loss process's; "
            "'aggregation': gram + weights + combine alone on the step's own task gradients, as "
            "a share of the loop engine's step",
            "the summed-loss step (one backward) is the floor of every other row: each does at "
            "least that backward",
            FLAGS_NOTE,
        ],
    )
    peer_of = {"torchjd": "TorchJD", "libmtl": "LibMTL"}
    for T in config.tasks:
        table.notes.append(f"T={T}: T x P fp32 = {T * P * 4 / 2**20:.0f} MiB")
        base: dict[str, Any] | None = None  # the summed loss's measurement
        for configuration in _configurations(config):
            kind, _, rest = configuration.partition(" ")
            label = {
                "summed": "summed loss",
                "torchjd": f"TorchJD {rest} (mtl_backward + jac_to_grad)",
                "libmtl": f"LibMTL {rest}",
            }.get(kind, f"mtlgrad {kind} {VARIANT_LABELS.get(rest, rest)}")
            row: dict[str, Any] = {"T": T, "step": label, "status": "", **timed("ms", None)}
            row.update(x_summed=None, extra_mib=None, aggregation_share=None, flags=[])
            progress(f"step T={T}: {label}")
            peer = peer_of.get(kind)
            if peer is not None and not peers[peer]["installed"]:
                row["status"] = f"{peer} not installed"
                table.rows.append(row)
                continue
            r = measure(config, configuration, T, device)
            timing = Timing(tuple(r["times"]))
            if base is None:
                base = r
            base_timing = Timing(tuple(base["times"]))
            share = r["aggregation"]
            x_summed = ratio(timing.median, base_timing.median)
            row.update(
                timed("ms", timing),
                x_summed=x_summed,
                extra_mib=r["peak_mib"] - base["peak_mib"],
                aggregation_share=None if share != share else 100 * share / timing.median,
                flags=flags({"": timing}, None if r is base else x_summed),
            )
            table.rows.append(row)
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one configuration of the step benchmark")
    parser.add_argument("--worker", required=True, help="the configuration, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(worker(json.loads(args.worker))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
