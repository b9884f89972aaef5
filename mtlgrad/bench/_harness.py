"""Timing, tables and result files shared by the benchmark suites.

Every figure is the median of several timed repetitions after warm-up, shown with the fastest and
the slowest repetition; inputs are rotated over enough copies that the caches do not hold the
previous repetition's data; every ratio is between figures of the same run. A figure that cannot
be right is flagged where it is printed: a time below the floor measured in the same run (the
memory cannot deliver the bytes faster), and a measurement whose slowest repetition took more
than ``SPREAD_LIMIT`` times its fastest (another process took the machine meanwhile).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Bytes of distinct data a rotation should cover on the CPU: more than any last-level cache of
# the machines we measure on, so a repetition never finds the previous one's inputs cached.
ROTATION_BYTES = 256 << 20
MAX_COPIES = 4
# A measurement whose slowest repetition took more than this many times its fastest is flagged.
SPREAD_LIMIT = 1.5
BELOW_FLOOR = "below floor: noisy machine?"
FLAGS_NOTE = (
    f"flags: '{BELOW_FLOOR}' marks a figure under the floor measured in this run, which the "
    "machine cannot deliver (another process disturbed the measurements); 'spread' marks a "
    f"measurement whose slowest repetition took over {SPREAD_LIMIT:g}x its fastest. Rerun "
    "flagged rows on an idle machine."
)


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def rotation_copies(
    nbytes: int,
    device: torch.device,
    budget: int = ROTATION_BYTES,
    max_copies: int = MAX_COPIES,
) -> int:
    """How many copies of an input of ``nbytes`` to rotate over.

    On the CPU, enough that together they exceed ``budget`` (the caches), at most ``max_copies``;
    on a GPU one: its caches are small next to the inputs we time there.
    """
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    if device.type != "cpu":
        return 1
    return max(1, min(max_copies, -(-budget // nbytes)))


class Rotation:
    """``copies`` inputs built by ``make(k)``; ``rotation[i]`` is copy ``i mod copies``, so that
    consecutive repetitions read different memory."""

    def __init__(self, make: Callable[[int], Any], copies: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.items = [make(k) for k in range(copies)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i % len(self.items)]


@dataclass(frozen=True)
class Timing:
    """Seconds of every timed repetition of one measurement; the median is the figure shown."""

    times: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("a timing needs at least one repetition")

    @property
    def median(self) -> float:
        return median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def spread(self) -> float:
        """Slowest over fastest repetition (1.0 for a single one)."""
        return self.max / self.min if self.min > 0 else math.inf

    def scaled(self, factor: float) -> Timing:
        """The same repetitions times ``factor`` (a figure derived from this one)."""
        return Timing(tuple(t * factor for t in self.times))


@dataclass
class Timer:
    """Every repetition's seconds of ``fn(i)`` over ``repeat`` timed calls after ``warmup``
    untimed ones, as a :class:`Timing`.

    ``i`` is the call's index (0, 1, ... over warm-up and timed calls alike), for a
    :class:`Rotation`. On CUDA the device is synchronised around every timed call.
    """

    device: torch.device
    warmup: int = 2
    repeat: int = 9
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def times(self, fn: Callable[[int], object]) -> list[float]:
        """Seconds of each timed call."""
        for i in range(self.warmup):
            fn(i)
        self.sync()
        result = []
        for i in range(self.warmup, self.warmup + self.repeat):
            self.sync()
            start = self.clock()
            fn(i)
            self.sync()
            result.append(self.clock() - start)
        return result

    def __call__(self, fn: Callable[[int], object]) -> Timing:
        return Timing(tuple(self.times(fn)))


def split_sizes(total: int, count: int, generator: torch.Generator) -> list[int]:
    """``count`` tensor sizes of uneven length (like a model's layers) that add up to ``total``."""
    if count < 1 or total < count:
        raise ValueError(f"cannot split {total} elements into {count} tensors")
    raw = torch.rand(count, generator=generator, dtype=torch.float64) + 0.05
    sizes = (raw / raw.sum() * (total - count)).floor().long() + 1
    sizes[-1] += total - int(sizes.sum())
    return [int(s) for s in sizes]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def timed(key: str, timing: Timing | None) -> dict[str, Any]:
    """A row's cells for one timing, in ms: ``key`` (the median), ``key_min``, ``key_max``, and
    ``key_times`` (every repetition: in the JSON only)."""
    if timing is None:
        return {key: None, f"{key}_min": None, f"{key}_max": None, f"{key}_times": None}
    return {
        key: timing.median * 1e3,
        f"{key}_min": timing.min * 1e3,
        f"{key}_max": timing.max * 1e3,
        f"{key}_times": [t * 1e3 for t in timing.times],
    }


def flags(
    timings: dict[str, Timing | None], floor_ratio: float | None = None, limit: float = SPREAD_LIMIT
) -> list[str]:
    """A row's flags: ``BELOW_FLOOR`` when ``floor_ratio`` (the row's figure over its floor,
    measured in the same run) is under 1, and the spread of each timing over ``limit``, named by
    its key in ``timings`` (``""``: the row's only timing)."""
    found = []
    if floor_ratio is not None and floor_ratio < 1:
        found.append(BELOW_FLOOR)
    for name, timing in timings.items():
        if timing is not None and timing.spread > limit:
            found.append(f"spread {timing.spread:.2f}x" + (f" ({name})" if name else ""))
    return found


# Tables --------------------------------------------------------------------------------------

UNITS = ("", "ms", "x", "MiB", "%", "ratio")  # "ratio": a signed quotient (memory over T·P)


@dataclass
class Column:
    """A table column: ``key`` in the rows, ``header`` shown, ``unit`` one of ``UNITS`` (``""``
    for text and integers)."""

    key: str
    header: str
    unit: str = ""


@dataclass
class Table:
    """One table of results: rows are dicts keyed by the columns' keys; ``None`` is a figure that
    was not measured (its row says why)."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "columns": [{"key": c.key, "header": c.header, "unit": c.unit} for c in self.columns],
            "rows": self.rows,
            "notes": self.notes,
        }


def format_cell(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):  # flags
        return "; ".join(map(str, value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if unit == "ms":
        return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:.0f}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "ratio":
        return f"{value:.2f}"
    return str(value)


def _header(column: Column) -> str:
    return f"{column.header} ({column.unit})" if column.unit in ("ms", "MiB") else column.header


def _cells(table: Table) -> tuple[list[str], list[list[str]]]:
    headers = [_header(c) for c in table.columns]
    body = [[format_cell(row.get(c.key), c.unit) for c in table.columns] for row in table.rows]
    return headers, body


def text_table(table: Table) -> str:
    """The table as aligned plain text (numbers right-aligned), with its title and notes."""
    headers, body = _cells(table)
    widths = [max(len(h), *(len(r[k]) for r in body)) for k, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = []
        for k, (cell, column) in enumerate(zip(cells, table.columns)):
            parts.append(cell.rjust(widths[k]) if column.unit else cell.ljust(widths[k]))
        return "  ".join(parts).rstrip()

    lines = [table.title, line(headers), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in body]
    lines += [f"  {note}" for note in table.notes]
    return "\n".join(lines)


def markdown_table(table: Table) -> str:
    headers, body = _cells(table)
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("| " + " | ".join("---" if not c.unit else "---:" for c in table.columns) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines)


# Machine and results ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: CPU model and cores, torch, the kernel set, the device."""
    import mtlgrad
    from mtlgrad import ops

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mtlgrad": mtlgrad.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_kernels": ops.cpu_kernels(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    where = (
        f"{info['gpu']} (CUDA {info['cuda']})"
        if "gpu" in info
        else f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads"
    )
    return (
        f"mtlgrad {info['mtlgrad']}, torch {info['torch']}, {where}, "
        f"{info['cpu_kernels']} CPU kernels, {info['date']}"
    )


def peer_line(peers: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, peer in peers.items():
        if peer["installed"]:
            parts.append(f"{name} {peer['version']}")
        else:
            parts.append(f"{name}: {peer['note']}")
    return "Peers: " + "; ".join(parts)


def flagged_rows(tables: Sequence[Table]) -> int:
    """How many rows of ``tables`` carry a flag."""
    return sum(1 for table in tables for row in table.rows if row.get("flags"))


def write_results(
    out: Path,
    suite: str,
    info: dict[str, Any],
    peers: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    tables: list[Table],
) -> tuple[Path, Path]:
    """Writes ``bench-<suite>-<time>.json`` and ``.md`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out / f"bench-{suite}-{stamp}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    payload = {
        "suite": suite,
        "machine": info,
        "peers": peers,
        "settings": settings,
        "tables": [t.to_json() for t in tables],
    }
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    lines = [f"# mtlgrad bench {suite}", "", machine_line(info), "", peer_line(peers), ""]
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
    for table in tables:
        lines += ["", markdown_table(table)]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
