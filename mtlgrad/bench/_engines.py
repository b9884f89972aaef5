"""The engines side by side on three trunks: time per step and peak extra memory, one run.

Rows of ``mtlgrad bench step``: for an MLP trunk (the 4.2M-parameter one of the Gram engine's
targets: 5 Linear layers of width 1024, batch 256) at several T, a CNN with BatchNorm and a
transformer trunk (Embedding, attention, LayerNorm, MLP), the summed-loss step, then UPGrad
through ``mtlgrad.backward`` with the ``GramEngine`` and with the loop engine, and through
TorchJD 0.18's ``autogram`` (``Engine.compute_gramian``, the weighting, one backward of the
weighted losses) and ``autojac`` (``mtl_backward`` + ``jac_to_grad``) when it is installed.

Time is over the summed-loss step; memory is the process's peak above the summed-loss
process's, over the T x P fp32 that the T task gradients of the P shared parameters take. Every
row runs in its own process (``python -m mtlgrad.bench._engines --worker JSON``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mtlgrad.bench._harness import (
    FLAGS_NOTE,
    Column,
    Table,
    Timing,
    flags,
    median,
    ratio,
    timed,
)

# The rows of each case: the floor, ours, the peers.
ENGINES = ("summed", "gram", "loop", "autogram", "autojac")
ENGINE_LABELS = {
    "summed": "summed loss",
    "gram": "mtlgrad GramEngine",
    "loop": "mtlgrad loop engine",
    "autogram": "TorchJD autogram",
    "autojac": "TorchJD autojac",
}
PEER_ENGINES = ("autogram", "autojac")
TRUNKS = ("mlp", "cnn", "transformer")
# Sizes: (width, depth, batch, ...) per trunk; "tiny" is a smoke test whose figures mean nothing.
SIZES = {
    "full": {
        "mlp": {"inputs": 64, "width": 1024, "layers": 5, "batch": 256},
        "cnn": {"channels": (32, 64, 128, 128), "image": 32, "batch": 64},
        "transformer": {
            "vocab": 4096,
            "width": 256,
            "heads": 4,
            "blocks": 2,
            "tokens": 64,
            "batch": 16,
        },
    },
    "tiny": {
        "mlp": {"inputs": 4, "width": 16, "layers": 2, "batch": 8},
        "cnn": {"channels": (4, 8), "image": 8, "batch": 4},
        "transformer": {"vocab": 32, "width": 16, "heads": 2, "blocks": 1, "tokens": 6, "batch": 2},
    },
}


def parse_case(case: str) -> tuple[str, int]:
    """``"mlp:8"`` -> ``("mlp", 8)``, with an error naming the valid trunks."""
    trunk, _, tasks = case.partition(":")
    if trunk not in TRUNKS or not tasks.isdigit() or int(tasks) < 1:
        raise ValueError(
            f"engine case {case!r} must read '<trunk>:<T>' with a trunk among {list(TRUNKS)} and "
            "T a positive count of tasks, e.g. 'mlp:8'"
        )
    return trunk, int(tasks)


# The trunks ---------------------------------------------------------------------------------------


def mlp(inputs: int, width: int, layers: int, batch: int) -> tuple[nn.Module, Callable]:
    sizes = [inputs] + [width] * layers
    modules: list[nn.Module] = []
    for k in range(layers):
        modules += [nn.Linear(sizes[k], sizes[k + 1]), nn.ReLU()]
    return nn.Sequential(*modules[:-1]), lambda g: torch.randn(batch, inputs, generator=g)


def cnn(channels: tuple[int, ...], image: int, batch: int) -> tuple[nn.Module, Callable]:
    modules: list[nn.Module] = []
    previous = 3
    for k, c in enumerate(channels):
        stride = 1 if k == 0 else 2
        modules += [nn.Conv2d(previous, c, 3, stride=stride, padding=1), nn.BatchNorm2d(c)]
        modules.append(nn.ReLU())
        previous = c
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*modules), lambda g: torch.randn(batch, 3, image, image, generator=g)


class Attention(nn.Module):
    """Multi-head self-attention from Linear projections and ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = Attention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding, pre-norm blocks, a final LayerNorm, mean over the tokens."""

    def __init__(self, vocab: int, width: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embedding(tokens))).mean(dim=1)


def transformer(
    vocab: int, width: int, heads: int, blocks: int, tokens: int, batch: int
) -> tuple[nn.Module, Callable]:
    return Transformer(vocab, width, heads, blocks), lambda g: torch.randint(
        vocab, (batch, tokens), generator=g
    )


BUILDERS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


class Model(nn.Module):
    """A trunk and T linear regression heads on its output."""

    def __init__(self, trunk: nn.Module, features: int, tasks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def build_model(trunk: str, tasks: int, size: str) -> tuple[Model, Callable]:
    """The model of a case and a function making its input from a generator."""
    torch.manual_seed(0)
    body, make_input = BUILDERS[trunk](**SIZES[size][trunk])
    with torch.no_grad():
        features = body(make_input(torch.Generator().manual_seed(0))).shape[-1]
    return Model(body, features, tasks), make_input


def shared_parameters(trunk: str, size: str) -> int:
    model, _ = build_model(trunk, 1, size)
    return sum(p.numel() for p in model.trunk.parameters())


# One step, in the worker process ------------------------------------------------------------------


def _losses(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]


def build_step(spec: dict[str, Any], device: torch.device) -> Callable[[int], None]:
    """One training step of ``spec["engine"]`` on its case (its argument rotates two batches)."""
    trunk, tasks = parse_case(spec["case"])
    model, make_input = build_model(trunk, tasks, spec["size"])
    model = model.to(device)
    shared = list(model.trunk.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [(make_input(g).to(device), None) for _ in range(2)]
    batches = [(x, torch.randn(x.shape[0], tasks, generator=g).to(device)) for x, _ in batches]
    engine = spec["engine"]

    if engine == "summed":

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            sum(_losses(model(x)[1], y)).backward()

    elif engine == "autogram":
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine

        gramian_engine, weighting = Engine(model.trunk, batch_dim=None), UPGradWeighting()

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            losses = torch.stack(_losses(model(x)[1], y))
            losses.backward(weighting(gramian_engine.compute_gramian(losses)))

    elif engine == "autojac":
        from torchjd.aggregation import UPGrad as PeerUPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward

        peer = PeerUPGrad()

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            z, outputs = model(x)
            mtl_backward(_losses(outputs, y), features=z)
            jac_to_grad(shared, peer)

    else:
        import mtlgrad
        from mtlgrad.aggregators import UPGrad

        aggregator = UPGrad()
        how: Any = mtlgrad.GramEngine(model.trunk) if engine == "gram" else "loop"

        def step(i: int) -> None:
            x, y = batches[i % 2]
            model.zero_grad()
            losses = _losses(model(x)[1], y)
            mtlgrad.backward(losses, shared_params=shared, aggregator=aggregator, engine=how)

    return step


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: every repetition's seconds and the process's peak memory."""
    from mtlgrad.bench._harness import Timer
    from mtlgrad.bench._step import step_peak_mib

    device = torch.device(spec["device"])
    step = build_step(spec, device)
    timer = Timer(device, warmup=spec["warmup"], repeat=spec["repeat"])
    return {"times": list(timer(step).times), "peak_mib": step_peak_mib(device, step)}


# The table ----------------------------------------------------------------------------------------


COLUMNS = [
    Column("case", "trunk"),
    Column("T", "T"),
    Column("engine", "engine"),
    Column("ms", "time", "ms"),
    Column("ms_min", "min", "ms"),
    Column("ms_max", "max", "ms"),
    Column("x_summed", "x summed", "x"),
    Column("x_loop", "x loop", "x"),
    Column("x_autogram", "x autogram", "x"),
    Column("extra_mib", "extra", "MiB"),
    Column("extra_tp", "extra / T*P", "ratio"),
    Column("status", "status"),
    Column("flags", "flags"),
]


def case_label(trunk: str, size: str, P: int) -> str:
    s = SIZES[size][trunk]
    if trunk == "mlp":
        shape = f"{s['layers']} Linear of width {s['width']}, batch {s['batch']}"
    elif trunk == "cnn":
        shape = f"{len(s['channels'])} Conv2d+BatchNorm, {s['image']}px, batch {s['batch']}"
    else:
        shape = f"{s['blocks']} blocks of width {s['width']}, {s['batch']}x{s['tokens']} tokens"
    return f"{trunk} ({shape}, P={P / 1e6:.2f}M)"


def run(
    cases: list[str],
    size: str,
    warmup: int,
    repeat: int,
    rounds: int,
    device: torch.device,
    peers: dict[str, dict[str, Any]],
    progress: Callable[[str], None],
    measure: Callable[[str, dict[str, Any]], dict[str, Any]],
) -> Table:
    """The engines table; ``measure(module, spec)`` runs one row's worker in its own process.

    A case's rows are measured in ``rounds`` interleaved rounds (summed, gram, loop, autogram,
    autojac, then again), so that a machine busy for a while slows all of them alike; a row's
    time is over every repetition of every round, its memory the median of its rounds."""
    table = Table(
        "engines",
        f"Engines on three trunks: UPGrad, T linear heads (device {device})",
        COLUMNS,
        notes=[
            f"each row runs in its own process, {rounds} time(s), the rows of a case interleaved; "
            "time: median of all the repetitions, min / max: the fastest and the slowest; "
            "x summed / x loop / x autogram: its time over the summed loss's, our loop engine's "
            "and TorchJD autogram's on the same case",
            "extra: the peak memory of one step above the memory in use before it (the resident "
            "set following the live tensors on the CPU, the allocator's statistics on CUDA), "
            "minus the summed-loss step's (medians over the rounds); extra / T*P: that over the T "
            "task gradients of the shared parameters in fp32 (what holding the Jacobian J takes)",
            FLAGS_NOTE,
        ],
    )
    run_engines = [e for e in ENGINES if e not in PEER_ENGINES or peers["TorchJD"]["installed"]]
    for case in cases:
        trunk, T = parse_case(case)
        P = shared_parameters(trunk, size)
        label = case_label(trunk, size, P)
        if label not in table.notes:
            table.notes.append(label)
        times: dict[str, list[float]] = {e: [] for e in run_engines}
        peaks: dict[str, list[float]] = {e: [] for e in run_engines}
        for k in range(rounds):
            for engine in run_engines:
                progress(f"engines {trunk} T={T}: {ENGINE_LABELS[engine]} ({k + 1}/{rounds})")
                spec = {"case": case, "size": size, "engine": engine, "device": str(device)}
                r = measure("mtlgrad.bench._engines", {**spec, "warmup": warmup, "repeat": repeat})
                times[engine] += r["times"]
                peaks[engine].append(r["peak_mib"])
        measured = {e: Timing(tuple(t)) for e, t in times.items()}
        peak = {e: median(p) for e, p in peaks.items()}
        for engine in ENGINES:
            row: dict[str, Any] = {"case": trunk, "T": T, "engine": ENGINE_LABELS[engine]}
            row.update(timed("ms", measured.get(engine)), x_summed=None, x_loop=None)
            row.update(x_autogram=None, extra_mib=None, extra_tp=None, status="", flags=[])
            if engine not in measured:
                row["status"] = "TorchJD not installed"
                table.rows.append(row)
                continue
            timing = measured[engine]
            x_summed = ratio(timing.median, measured["summed"].median)
            row.update(x_summed=x_summed, extra_mib=peak[engine] - peak["summed"])
            for key, other in (("x_loop", "loop"), ("x_autogram", "autogram")):
                if other in measured:
                    row[key] = ratio(timing.median, measured[other].median)
            if engine != "summed":  # the baseline's own extra is 0 by definition
                row["extra_tp"] = row["extra_mib"] * 2**20 / (4 * T * P)
            row["flags"] = flags({"": timing}, None if engine == "summed" else x_summed)
            table.rows.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one row of the engines benchmark")
    parser.add_argument("--worker", required=True, help="the row, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(worker(json.loads(args.worker))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
