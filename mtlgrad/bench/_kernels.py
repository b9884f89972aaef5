"""The native ``gram`` and ``combine`` ops against the memory floor and the usual pure-PyTorch way
(``torch.cat``, then a matmul), all measured in one run.

The floor is what the memory can deliver for the same bytes: on the CPU the fastest of two ways
to read every byte once (torch's ``sum`` over the contiguous J, and a one-task ``gram`` over it),
plus the time to write P elements for ``combine``; on CUDA a device-to-device copy gives the
bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mtlgrad.bench._harness import (
    FLAGS_NOTE,
    Column,
    Rotation,
    Table,
    Timer,
    Timing,
    flags,
    ratio,
    rotation_copies,
    split_sizes,
    timed,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KernelConfig:
    tasks: list[int] = field(default_factory=lambda: [8])
    params: list[int] = field(default_factory=lambda: [10_000_000])
    tensors: int = 100
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    with_cat: bool = True
    warmup: int = 2
    repeat: int = 9

    @classmethod
    def for_size(cls, size: str) -> KernelConfig:
        if size == "quick":
            return cls(params=[2_000_000], repeat=5)
        if size == "tiny":
            return cls(tasks=[3], params=[20_000], tensors=7, warmup=1, repeat=2)
        return cls()

    def problems(self) -> list[tuple[str, int, int]]:
        return [(d, t, p) for d in self.dtypes for t in self.tasks for p in self.params]


def count(config: KernelConfig, device: torch.device) -> int:
    """Timed measurements of :func:`run` (for the progress bar)."""
    floors = 1 if device.type == "cuda" else 3
    return len(config.problems()) * (floors + 4 + int(config.with_cat))


COLUMNS = [
    Column("problem", "problem"),
    Column("measurement", "measurement"),
    Column("ms", "time", "ms"),
    Column("ms_min", "min", "ms"),
    Column("ms_max", "max", "ms"),
    Column("ratio", "ratio", "x"),
    Column("ratio_of", "ratio of"),
    Column("flags", "flags"),
    Column("note", "note"),
]


def run(
    config: KernelConfig,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    progress: Callable[[str], None],
) -> list[Table]:
    del peers  # no peer implements these ops: the baselines are torch's own
    timer = Timer(device, warmup=config.warmup, repeat=config.repeat)
    table = Table(
        "kernels",
        f"Native ops vs the memory floor and torch (device {device}, "
        f"{config.tensors} tensors per task)",
        COLUMNS,
        notes=[
            "time: median of the repetitions, min / max: the fastest and the slowest; ratio of "
            "'floor': ours / the floor measured in this run (1.00x is the memory's limit); ratio "
            "of 'speed-up': the baseline's time / ours",
            FLAGS_NOTE,
        ],
    )
    for dtype_name, tasks, params in config.problems():
        table.rows += _problem(
            tasks, params, config, DTYPES[dtype_name], dtype_name, device, timer, progress
        )
    return [table]


def _problem(
    tasks: int,
    params: int,
    config: KernelConfig,
    dtype: torch.dtype,
    dtype_name: str,
    device: torch.device,
    timer: Timer,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    from mtlgrad import ops

    problem = f"T={tasks} P={params:,} {dtype_name}"
    sizes = split_sizes(params, config.tensors, torch.Generator().manual_seed(0))
    elem = torch.finfo(dtype).bits // 8
    data_bytes = tasks * params * elem
    copies = rotation_copies(data_bytes, device)
    gen = torch.Generator().manual_seed(1)
    flats = Rotation(
        lambda k: torch.randn(tasks, params, generator=gen).to(device=device, dtype=dtype), copies
    )
    # The per-task gradient lists are views into one buffer per copy: the ops see many separate
    # tensors, while the floor and the matmul baselines can use the contiguous J.
    lists = Rotation(
        lambda k: [g for t in range(tasks) for g in torch.split(flats.items[k][t], sizes)], copies
    )
    out = [torch.empty(s, dtype=dtype, device=device) for s in sizes]
    out_flat = torch.empty(params, dtype=dtype, device=device)
    weights = torch.rand(tasks, dtype=torch.float64, generator=gen).to(device)
    w_dtype = weights.to(dtype).view(1, -1)

    def measure(label: str, fn: Callable[[int], object]) -> Timing:
        progress(f"kernels {problem}: {label}")
        return timer(fn)

    if device.type == "cuda":
        scratch = torch.empty_like(flats[0])
        copy = measure("floor", lambda i: scratch.copy_(flats[i]))
        bandwidth = 2 * data_bytes / copy.median  # a copy reads and writes every byte
        # Reading the bytes once, and writing P elements, at the copy's bandwidth.
        read_floor = copy.scaled(0.5)
        write_floor = copy.scaled(params * elem / (2 * data_bytes))
        floor_note = f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s"
    else:
        # Both ways of reading every byte once vary between processes on shared machines; the
        # faster is the better estimate of what the memory can deliver.
        t_sum = measure("floor (sum)", lambda i: flats[i].sum())
        t_self = measure("floor (1-task gram)", lambda i: ops.gram([flats[i].view(-1)], 1))
        read_floor = min(t_sum, t_self, key=lambda t: t.median)
        write_floor = measure("floor (write P)", lambda i: out_flat.fill_(1.0))
        floor_note = (
            f"read once: {data_bytes / read_floor.median / 1e9:.1f} GB/s "
            f"(sum {t_sum.median * 1e3:.2f} ms, 1-task gram {t_self.median * 1e3:.2f} ms)"
        )
    # Two measurements added: their medians add, their repetitions do not pair up (no min/max).
    combine_floor = read_floor.median + write_floor.median

    def row(
        measurement: str,
        timing: Timing | None,
        r: float | None = None,
        of: str = "",
        note: str = "",
        seconds: float | None = None,
        spreads: dict[str, Timing | None] | None = None,
    ) -> dict:
        cells = timed("ms", timing)
        if timing is None:
            cells["ms"] = None if seconds is None else seconds * 1e3
        return {
            "problem": problem,
            "measurement": measurement,
            **cells,
            "ratio": r,
            "ratio_of": of,
            "flags": flags(
                {"": timing} if spreads is None else spreads, r if of == "floor" else None
            ),
            "note": note,
        }

    t_gram = measure("gram", lambda i: ops.gram(lists[i], tasks))
    t_mm = measure("J @ J.T", lambda i: flats[i] @ flats[i].T)
    rows = [
        row("gram floor (read T*P once)", read_floor, note=floor_note),
        row("mtlgrad.ops.gram", t_gram, ratio(t_gram.median, read_floor.median), "floor"),
        row("J @ J.T (contiguous J)", t_mm, ratio(t_mm.median, t_gram.median), "speed-up"),
    ]
    if config.with_cat:
        per_task = len(sizes)

        def cat_matmul(i: int) -> torch.Tensor:
            grads = lists[i]
            J = torch.stack(
                [torch.cat(grads[t * per_task : (t + 1) * per_task]) for t in range(tasks)]
            )
            return J @ J.T

        t_cat = measure("torch.cat + J @ J.T", cat_matmul)
        rows.append(
            row("torch.cat + J @ J.T", t_cat, ratio(t_cat.median, t_gram.median), "speed-up")
        )

    t_combine = measure("combine", lambda i: ops.combine(lists[i], tasks, weights, out))
    t_wj = measure("w @ J", lambda i: torch.matmul(w_dtype, flats[i], out=out_flat.view(1, -1)))
    rows += [
        row(
            "combine floor (read T*P, write P)",
            None,
            note="the read floor + the time to write P elements",
            seconds=combine_floor,
            spreads={"read": read_floor, "write": write_floor},
        ),
        row("mtlgrad.ops.combine", t_combine, ratio(t_combine.median, combine_floor), "floor"),
        row("w @ J (contiguous J)", t_wj, ratio(t_wj.median, t_combine.median), "speed-up"),
    ]
    return rows
