"""Distributed-step benchmark: what each mode sends per step, counted, and its step time.

World sizes 2 and 4 by default, every rank a process on this machine (gloo on loopback, CPU), the
step benchmark's residual MLP trunk (``mtlgrad.bench._step.Model``) with T heads and UPGrad. Four
ways to keep the replicas one model:

- ``naive``: each task's gradient of the shared parameters all-reduced on its own (T calls, one
  per task, no buckets), then the aggregation: what a training loop written by hand does;
- ``replicated``: :func:`mtlgrad.backward`'s default (bucketed asynchronous all-reduces, each
  task's launched as soon as its backward returns);
- ``sharded``: ``distributed="sharded"`` (reduce-scatter, T x T all-reduce, all-gather);
- ``sharded_owned``: sharded mode with ``owned_params=`` a ``ZeroRedundancyOptimizer``'s
  partition (reduce-scatter, T x T all-reduce, no all-gather);
- ``features``: ``features=z`` (one T x T all-reduce, then the trunk's gradient averaged);
- ``gram``: the Gram engine (each layer's T gradients averaged as its backward produces them,
  then the update of ``Σ_t w_t L_t`` averaged).

Bytes are counted in each rank by wrapping torch.distributed's collectives during one step:
``payload`` is the size of the tensors handed to them (an all-reduce's tensor, a reduce-scatter's
input, an all-gather's output), ``ring`` what a ring algorithm sends per rank for that payload
(2 (W-1)/W for an all-reduce, (W-1)/W for a reduce-scatter or an all-gather). Every
(world, mode) runs in its own processes; rank 0 reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mtlgrad.bench._harness import FLAGS_NOTE, Column, Table, Timer, Timing, flags, ratio, timed

MODES = ("naive", "replicated", "sharded", "sharded_owned", "features", "gram")
# What a ring algorithm sends per rank, per byte of payload (W: the world size).
RING_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
}


@dataclass
class DistributedConfig:
    worlds: list[int] = field(default_factory=lambda: [2, 4])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    tasks: int = 4
    width: int = 512
    depth: int = 2
    batch: int = 64  # per rank
    warmup: int = 2
    repeat: int = 7

    @classmethod
    def for_size(cls, size: str) -> DistributedConfig:
        if size == "quick":
            return cls(worlds=[2], repeat=3)
        if size == "tiny":
            return cls(worlds=[2], tasks=3, width=32, depth=1, batch=8, warmup=1, repeat=1)
        return cls()

    def validate(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown distributed modes {unknown}; choose from {list(MODES)}")
        if any(w < 2 for w in self.worlds):
            raise ValueError(f"world sizes must be at least 2, got {self.worlds}")
        if self.tasks < 2:
            raise ValueError(f"tasks must be at least 2, got {self.tasks}")


def count(config: DistributedConfig, device: torch.device) -> int:
    return len(config.worlds) * len(config.modes)


# One rank, in its own process ------------------------------------------------------------------


class CollectiveCounter:
    """Wraps torch.distributed's collectives and adds up the bytes handed to them."""

    def __init__(self) -> None:
        self.payload: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        def wrap(name: str, fn: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                tensor = args[0]
                if name == "reduce_scatter_tensor":
                    tensor = args[1]  # the input: what each rank contributes
                if isinstance(tensor, list):
                    size = sum(t.numel() * t.element_size() for t in tensor)
                else:
                    size = tensor.numel() * tensor.element_size()
                self.payload[name] = self.payload.get(name, 0) + size
                self.calls[name] = self.calls.get(name, 0) + 1
                return fn(*args, **kwargs)

            return counted

        for name in RING_FACTOR:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def ring_bytes(self, world: int) -> float:
        return sum(RING_FACTOR[name](world) * n for name, n in self.payload.items())


def build_step(
    config: DistributedConfig, mode: str, world: int, rank: int
) -> Callable[[int], None]:
    import torch.distributed as dist

    import mtlgrad
    from mtlgrad.aggregators import UPGrad
    from mtlgrad.bench._step import Model

    torch.manual_seed(0)
    T = config.tasks
    model = Model(T, config.width, config.depth)
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    aggregator = UPGrad()
    generator = torch.Generator().manual_seed(1 + rank)
    batches = [
        (
            torch.randn(config.batch, config.width, generator=generator),
            torch.randn(config.batch, T, generator=generator),
        )
        for _ in range(2)
    ]

    def losses_of(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
        return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]

    def naive(i: int) -> None:
        x, y = batches[i % 2]
        model.zero_grad()
        _, outputs = model(x)
        losses = losses_of(outputs, y)
        task_grads = []
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, shared + heads[t], retain_graph=t < T - 1)
            flat = torch.cat([g.reshape(-1) for g in grads[: len(shared)]])
            dist.all_reduce(flat)  # one call per task
            flat.div_(world)
            task_grads += list(flat.split([p.numel() for p in shared]))
            for p, g in zip(heads[t], grads[len(shared) :]):
                dist.all_reduce(g)
                p.grad = g.div_(world)
        views = [g.view(p.shape) for g, p in zip(task_grads, shared * T)]
        out = aggregator.aggregate(views, T).out
        for p, d in zip(shared, out):
            p.grad = d

    engine = mtlgrad.GramEngine(model.trunk) if mode == "gram" else "loop"
    owned = None
    if mode == "sharded_owned":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer(shared, optimizer_class=torch.optim.SGD, lr=0.0)
        owned = [p for group in zero.optim.param_groups for p in group["params"]]

    def ours(i: int) -> None:
        x, y = batches[i % 2]
        model.zero_grad()
        z, outputs = model(x)
        mtlgrad.backward(
            losses_of(outputs, y),
            shared_params=shared,
            aggregator=aggregator,
            task_params=heads,
            features=z if mode == "features" else None,
            engine=engine,
            distributed="sharded" if mode.startswith("sharded") else "replicated",
            owned_params=owned,
        )

    return naive if mode == "naive" else ours


def worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One rank: joins the group, times the step, counts one step's bytes; rank 0 returns."""
    import torch.distributed as dist

    config = DistributedConfig(**spec["config"])
    world, rank = spec["world"], spec["rank"]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{spec['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        step = build_step(config, spec["mode"], world, rank)
        timer = Timer(torch.device("cpu"), warmup=config.warmup, repeat=config.repeat)
        times = list(timer(step).times)
        with CollectiveCounter() as counter:
            step(0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    return {
        "times": times,
        "payload_bytes": sum(counter.payload.values()),
        "ring_bytes": counter.ring_bytes(world),
        "payload_by_collective": counter.payload,
        "calls": counter.calls,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: DistributedConfig, mode: str, world: int, timeout: float = 900) -> dict:
    """Runs ``world`` ranks of one mode, each in its own process; rank 0's report."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = []
    for rank in range(world):
        spec = {"config": asdict(config), "mode": mode, "world": world, "rank": rank, "port": port}
        command = [sys.executable, "-m", "mtlgrad.bench._distributed", "--worker", json.dumps(spec)]
        processes.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    outputs = []
    try:
        for rank, process in enumerate(processes):
            out, err = process.communicate(timeout=timeout)
            if process.returncode != 0:
                raise RuntimeError(
                    f"the distributed benchmark's {mode!r} at world {world}: rank {rank} failed "
                    f"(exit code {process.returncode}):\n{err.strip()[-3000:]}"
                )
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return json.loads(outputs[0].strip().splitlines()[-1])


COLUMNS = [
    Column("world", "ranks"),
    Column("mode", "mode"),
    Column("ms", "time", "ms"),
    Column("ms_min", "min", "ms"),
    Column("ms_max", "max", "ms"),
    Column("x_naive", "x naive", "x"),
    Column("payload_mib", "payload MiB", "ratio"),
    Column("ring_mib", "ring MiB per rank", "ratio"),
    Column("ring_over_tp", "ring / T·P", "ratio"),
    Column("collectives", "calls in one step"),
    Column("flags", "flags"),
]


def shared_parameters(config: DistributedConfig) -> int:
    from mtlgrad.bench._step import Model

    return sum(p.numel() for p in Model(1, config.width, config.depth).trunk.parameters())


def run(
    config: DistributedConfig, device: torch.device, peers: dict[str, Any], progress: Any
) -> list[Table]:
    P = shared_parameters(config)
    T = config.tasks
    tp_bytes = T * P * 4
    table = Table(
        "distributed",
        f"One training step under torch.distributed (gloo on loopback, CPU, one thread per "
        f"rank): UPGrad, T={T} heads on a residual MLP trunk of P={P:,} parameters, batch "
        f"{config.batch} per rank",
        COLUMNS,
        notes=[
            "naive: each task's gradient all-reduced on its own (T calls), then the aggregation; "
            "replicated: mtlgrad.backward (bucketed asynchronous all-reduces, each task's "
            "launched as its backward returns); sharded: "
            "distributed='sharded' (reduce-scatter, T x T all-reduce, all-gather); sharded_owned: "
            "the same with owned_params= a ZeroRedundancyOptimizer's partition (no all-gather); "
            "features: "
            "features=z (T x T all-reduce, then the trunk's gradient averaged); gram: the Gram "
            "engine (each layer's T gradients all-reduced during its backward, then the update)",
            "payload: bytes handed to the collectives in one step, counted in rank 0 (an "
            "all-reduce's tensor, a reduce-scatter's input, an all-gather's output); ring per "
            "rank: what a ring algorithm sends per rank for those calls; ring / T·P: over the "
            f"T x P fp32 of the task gradients ({tp_bytes / 2**20:.1f} MiB)",
            "every rank is a process on this machine: the times include the processes sharing "
            "its cores; compare rows of the same world size",
            FLAGS_NOTE,
        ],
    )
    if device.type != "cpu":
        table.notes.append(f"measured on the CPU with gloo (--device {device.type} not used here)")
    for world in config.worlds:
        naive: Timing | None = None
        for mode in config.modes:
            progress(f"distributed world={world}: {mode}")
            r = measure(config, mode, world)
            timing = Timing(tuple(r["times"]))
            if mode == "naive":
                naive = timing
            row: dict[str, Any] = {"world": world, "mode": mode, **timed("ms", timing)}
            row["x_naive"] = ratio(timing.median, naive.median if naive else None)
            row["payload_mib"] = r["payload_bytes"] / 2**20
            row["ring_mib"] = r["ring_bytes"] / 2**20
            row["ring_over_tp"] = r["ring_bytes"] / tp_bytes
            row["collectives"] = ", ".join(
                f"{name} x{calls}" for name, calls in sorted(r["calls"].items())
            )
            row["flags"] = flags({"": timing})
            table.rows.append(row)
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of the distributed benchmark")
    parser.add_argument("--worker", required=True, help="the rank's configuration, as JSON")
    args = parser.parse_args(argv)
    report = worker(json.loads(args.worker))
    if report is not None:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
