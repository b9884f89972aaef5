"""Training-step benchmark on a shared-trunk model, all figures measured in one run.

A residual MLP trunk (4 blocks of width 1024: 8.4M shared parameters) with T linear heads, batch
128, on this CPU. For T = 2, 4, 8: time per step and peak memory of the plain summed loss, of
``mtlgrad.backward`` with each engine and aggregator, and of TorchJD (``mtl_backward`` +
``jac_to_grad``) when installed; plus the share of the step spent in the aggregation itself
(gram + weights + combine on the step's own task gradients).

    python benchmarks/bench_step.py             # T = 2, 4, 8; PCGrad, MGDA, UPGrad
    python benchmarks/bench_step.py --quick     # T = 2, 4; PCGrad only; fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from harness import Timer
from torch import nn

import mtlgrad
from mtlgrad import aggregators as ours

try:
    import torchjd.aggregation as torchjd_aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:
    torchjd_aggregation = None


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, width)
        self.down = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, tasks: int, width: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def losses_of(outputs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


AGGREGATORS = {
    "PCGrad": lambda: ours.PCGrad(generator=torch.Generator().manual_seed(0)),
    "MGDA": lambda: ours.MGDA(),
    "UPGrad": lambda: ours.UPGrad(),
}
PEERS = {"PCGrad": "PCGrad", "MGDA": "MGDA", "UPGrad": "UPGrad"}


def build_step(config: str, T: int):
    """The model, its shared parameters and a function running one training step of `config`:
    "summed", "torchjd <method>", or "<method> <engine>"."""
    torch.manual_seed(0)
    model = Model(T)
    shared = list(model.trunk.parameters())
    x, y = torch.randn(128, 1024), torch.randn(128, T)
    kind, _, rest = config.partition(" ")

    if kind == "summed":

        def step() -> None:
            model.zero_grad()
            sum(losses_of(model(x)[1], y)).backward()

    elif kind == "torchjd":
        peer = getattr(torchjd_aggregation, rest)()

        def step() -> None:
            model.zero_grad()
            z, outputs = model(x)
            mtl_backward(losses_of(outputs, y), features=z)
            jac_to_grad(shared, peer)

    else:
        agg = AGGREGATORS[kind]()
        engine = rest

        def step() -> None:
            model.zero_grad()
            z, outputs = model(x)
            mtlgrad.backward(
                losses_of(outputs, y),
                shared_params=shared,
                aggregator=agg,
                engine="loop" if engine == "features" else engine,
                features=z if engine == "features" else None,
            )

    return model, shared, x, y, step


def run_one(config: str, T: int, repeat: int) -> None:
    """Child process: time one configuration, report its peak memory and, for the loop engine,
    the time of the aggregation alone on the step's own task gradients."""
    model, shared, x, y, step = build_step(config, T)
    timer = Timer(torch.device("cpu"), warmup=1, repeat=repeat)
    seconds = timer(lambda i: step())
    aggregation = float("nan")
    kind, _, engine = config.partition(" ")
    if engine == "loop":
        _, outputs = model(x)
        losses = losses_of(outputs, y)
        flat = [g for loss in losses for g in torch.autograd.grad(loss, shared, retain_graph=True)]
        agg = AGGREGATORS[kind]()
        aggregation = timer(lambda i: agg.aggregate(flat, T))
    print(json.dumps({"seconds": seconds, "peak": peak_rss_mib(), "aggregation": aggregation}))


def measure(config: str, T: int, repeat: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        config,
        "--tasks",
        str(T),
        "--repeat",
        str(repeat),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.tasks[0], args.repeat)
        return
    if args.quick:
        args.tasks, args.methods, args.repeat = [2, 4], ["PCGrad"], 3
    methods = [m for m in args.methods if hasattr(ours, m)]
    print(
        f"mtlgrad {mtlgrad.__version__}, torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads; each row runs in its own process (peak memory)"
    )
    if torchjd_aggregation is None:
        print("TorchJD: not installed (pip install torchjd): its rows are not run")
    print("LibMTL: not installed here: its PCGrad row is not run")

    for T in args.tasks:
        P = sum(p.numel() for p in Model(T).trunk.parameters())
        buffer = T * P * 4 / 2**20
        print(f"\nT={T}, {P / 1e6:.1f}M shared parameters; T x P fp32 = {buffer:.0f} MiB")
        print(f"{'step':<30}{'ms':>9}{'x summed':>10}{'extra MiB':>11}{'aggregation':>14}")
        base = measure("summed", T, args.repeat)
        rows = [("summed loss", base)]
        for name in methods:
            for engine in ("loop", "batched", "features"):
                rows.append(
                    (f"mtlgrad {name} {engine}", measure(f"{name} {engine}", T, args.repeat))
                )
            if torchjd_aggregation is not None:
                rows.append((f"TorchJD {name}", measure(f"torchjd {name}", T, args.repeat)))
        for label, r in rows:
            share = (
                ""
                if r["aggregation"] != r["aggregation"]
                else (f"{100 * r['aggregation'] / r['seconds']:.1f}% of step")
            )
            print(
                f"{label:<30}{r['seconds'] * 1e3:>9.1f}{r['seconds'] / base['seconds']:>9.2f}x"
                f"{r['peak'] - base['peak']:>11.0f}{share:>14}"
            )


if __name__ == "__main__":
    main()
