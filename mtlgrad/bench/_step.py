"""Training-step benchmark on shared-trunk models, all figures measured in one run.

Two tables. The first: a residual MLP trunk (by default 4 blocks of width 1024: 8.4M shared
parameters) with T linear heads, batch 128. For each T: time per step and peak memory of the
plain summed loss, of ``mtlgrad.backward`` with each aggregator, through the ``loop`` and
``batched`` engines and with ``features=z`` (the task gradients at the trunk's output, loop
engine), of TorchJD (``mtl_backward`` + ``jac_to_grad``) and of LibMTL's weighting when they are
installed; plus the share of the step spent in the aggregation itself (gram + weights + combine
on the step's own task gradients). The second (:mod:`mtlgrad.bench._engines`): the Gram engine
beside the loop engine and TorchJD's autogram and autojac on an MLP, a CNN and a transformer.

Every row runs in its own process, ``python -m mtlgrad.bench._step --worker JSON`` (or
``mtlgrad.bench._engines``); its memory figure is the peak of one more step above the memory in
use before that step (:func:`step_peak_mib`), so that imports and caches do not count.
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

from mtlgrad.bench import _engines as engines
from mtlgrad.bench._harness import FLAGS_NOTE, Column, Table, Timer, Timing, flags, ratio, timed

# How mtlgrad.backward takes the task gradients: its two engines, the loop engine with
# features=z (gradients at the shared representation, then one backward through the trunk), and
# the loop engine's whole step (forward, losses, backward) under torch.compile(fullgraph=True).
VARIANTS = ("loop", "batched", "features", "compiled")
VARIANT_LABELS = {
    "loop": "loop",
    "batched": "batched",
    "features": "loop, features=z",
    "compiled": "loop, torch.compile(fullgraph=True)",
}
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
    # The engines table (mtlgrad.bench._engines): "<trunk>:<T>" cases, at the trunks' "full"
    # sizes or "tiny" ones.
    engine_cases: list[str] = field(
        default_factory=lambda: ["mlp:4", "mlp:8", "cnn:8", "transformer:8"]
    )
    engine_size: str = "full"
    engine_rounds: int = 3  # interleaved rounds of each case's rows

    @classmethod
    def for_size(cls, size: str) -> StepConfig:
        if size == "quick":
            return cls(
                tasks=[2, 4], methods=["PCGrad"], repeat=3, engine_cases=["mlp:4"], engine_rounds=1
            )
        if size == "tiny":
            return cls(
                tasks=[2],
                methods=["PCGrad", "UPGrad"],
                width=32,
                depth=1,
                batch=8,
                warmup=1,
                repeat=1,
                engine_cases=["mlp:2", "cnn:2", "transformer:2"],
                engine_size="tiny",
                engine_rounds=1,
            )
        return cls()

    def validate(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown step methods {unknown}; choose from {list(METHODS)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown step variants {unknown}; choose from {list(VARIANTS)}")
        for case in self.engine_cases:
            engines.parse_case(case)
        if self.engine_rounds < 1:
            raise ValueError(f"engine_rounds must be at least 1, got {self.engine_rounds}")
        if self.engine_size not in engines.SIZES:
            raise ValueError(
                f"engine_size must be one of {list(engines.SIZES)}, got {self.engine_size!r}"
            )


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
    per_case = len(engines.ENGINES) * config.engine_rounds
    return len(config.tasks) * len(_configurations(config)) + len(config.engine_cases) * per_case


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
        heads = [list(h.parameters()) for h in model.heads]

        def compiled_step(x: torch.Tensor, y: torch.Tensor) -> None:
            # The README's recipe: task_params (no graph walk), no host-side finite check.
            _, outputs = model(x)
            mtlgrad.backward(
                _losses(outputs, y),
                shared_params=shared,
                aggregator=agg,
                task_params=heads,
                check_finite=False,
            )

        if variant == "compiled":
            torch._dynamo.config.trace_autograd_ops = True
            compiled = torch.compile(compiled_step, fullgraph=True)

            def step(i: int) -> None:
                x, y = batches[i % 2]
                model.zero_grad()
                compiled(x, y)

            # Untimed: the compilation, and the recompilation that the aggregator's state after
            # its first step (the task order it keeps) triggers.
            step(0)
            step(1)
            return step, lambda timer: float("nan")

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


def _resident_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MiB, None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _follow_live_memory() -> bool:
    """Makes the resident set follow the live tensors and restarts its peak (glibc and Linux):
    every allocation of 64 KiB or more gets its own mapping, returned on free (by default glibc
    raises that threshold as blocks are freed and keeps them cached, so the peak would count what
    the allocator keeps), free heap memory goes back to the system, and ``/proc/self/clear_refs``
    restarts VmHWM. False where that cannot be done."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, 64 << 10) != 1:  # M_MMAP_THRESHOLD
            return False
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def step_peak_mib(device: torch.device, step: Callable[[int], None]) -> float:
    """The peak memory of one call of ``step`` above the memory in use just before it: on CUDA
    from the allocator's statistics, on the CPU from the resident set made to follow the live
    tensors (:func:`_follow_live_memory`). Where the CPU figures cannot be had, the process's
    whole peak resident set (imports and caches included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(0)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _follow_live_memory():
        before = _resident_mib("VmRSS")
        step(0)
        peak = _resident_mib("VmHWM")
        if before is not None and peak is not None:
            return peak - before
    step(0)
    peak = _resident_mib("VmHWM")
    if peak is not None:
        return peak
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
    return {"times": times, "peak_mib": step_peak_mib(device, step), "aggregation": share}


def measure(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``module``'s worker on ``spec`` in a fresh process (``python -m module --worker``)."""
    command = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if result.returncode != 0:
        raise RuntimeError(
            f"the step benchmark's row {spec} failed (exit code {result.returncode}):\n"
            f"{result.stderr.strip()[-3000:]}"
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
            "fastest and the slowest; 'extra': the peak memory of one step above the memory in use "
            "before it, minus the summed-loss step's; "
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
            if rest == "compiled" and getattr(_aggregator(kind), "generator", None) is not None:
                row["status"] = "draws from a torch.Generator: dynamo cannot trace it"
                table.rows.append(row)
                continue
            peer = peer_of.get(kind)
            if peer is not None and not peers[peer]["installed"]:
                row["status"] = f"{peer} not installed"
                table.rows.append(row)
                continue
            spec = {"config": asdict(config), "configuration": configuration, "tasks": T}
            r = measure("mtlgrad.bench._step", {**spec, "device": str(device)})
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
    if not config.engine_cases:
        return [table]
    engines_table = engines.run(
        config.engine_cases,
        config.engine_size,
        config.warmup,
        config.repeat,
        config.engine_rounds,
        device,
        peers,
        progress,
        measure,
    )
    return [table, engines_table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one configuration of the step benchmark")
    parser.add_argument("--worker", required=True, help="the configuration, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(worker(json.loads(args.worker))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
