"""The two demo runs: training, table, figure, files."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from mtlgrad.demo._methods import METHODS, Method
from mtlgrad.demo._plots import plot_demo, plot_toy
from mtlgrad.demo._problem import DemoModel, make_problem
from mtlgrad.demo._report import DEMO_NOTES, demo_table, echo, toy_table, write_json
from mtlgrad.demo._toy import DEFAULT_SCALE, LEARNING_RATE, STARTS, run_toy
from mtlgrad.demo._train import TrainConfig, train

__all__ = ["run_mtl_demo", "run_toy_demo"]


def run_mtl_demo(methods: Sequence[Method], steps: int, seed: int, out: Path, quick: bool) -> int:
    methods = list(methods)
    if METHODS["sum"] not in methods:
        echo("Sum, the baseline of Δm, is added to the methods.")
    methods = [METHODS["sum"]] + [m for m in methods if m.key != "sum"]

    problem = make_problem(seed)
    torch.manual_seed(seed)
    init_state = {k: v.clone() for k, v in DemoModel(problem).state_dict().items()}
    config = TrainConfig(steps=steps, seed=seed, evaluations=10 if quick else 40)
    echo(
        f"{len(problem.tasks)} tasks ({', '.join(t.name for t in problem.tasks)}), "
        f"{problem.train_inputs.shape[0]} training and {problem.test_inputs.shape[0]} test "
        f"samples; {len(methods)} methods x {steps} steps of Adam (lr {config.lr:g}, batch "
        f"{config.batch_size}), same initialisation and batches for all."
    )
    begin = time.perf_counter()
    results = []
    with tqdm(total=len(methods) * steps, unit="step", disable=None, leave=False) as bar:
        for method in methods:
            bar.set_description(method.label)
            results.append(train(method, problem, init_state, config, on_step=bar.update))
    elapsed = time.perf_counter() - begin

    text, markdown, rows = demo_table(results, problem.tasks)
    echo()
    echo(text)
    echo()
    for note in DEMO_NOTES:
        echo(note)
    figure = out / "demo.png"
    plot_demo(results, problem.tasks, figure)
    (out / "demo.md").write_text(
        f"# mtlgrad demo ({steps} steps, seed {seed})\n\n{markdown}\n\n"
        + "\n".join(f"- {note}" for note in DEMO_NOTES)
        + "\n",
        encoding="utf-8",
    )
    write_json(
        out / "demo.json",
        {
            "steps": steps,
            "seed": seed,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "tasks": [
                {"name": t.name, "kind": t.kind, "scale": t.scale, "noise": t.noise}
                for t in problem.tasks
            ],
            "baseline": "Sum",
            "delta_m": "mean relative drop against the baseline in %, lower is better",
            "methods": rows,
        },
    )
    echo()
    echo(f"trained in {elapsed:.1f} s; wrote {figure}, {out / 'demo.md'}, {out / 'demo.json'}")
    return 0


def run_toy_demo(
    methods: Sequence[Method], steps: int, seed: int, out: Path, scale: float | None
) -> int:
    scale = DEFAULT_SCALE if scale is None else scale
    echo(
        f"CAGrad's toy problem (first objective x {scale:g}), {len(STARTS)} starting points; "
        f"{len(methods)} methods x {steps} steps of Adam (lr {LEARNING_RATE:g})."
    )
    begin = time.perf_counter()
    results = []
    with tqdm(total=len(methods) * steps, unit="step", disable=None, leave=False) as bar:
        for method in methods:
            bar.set_description(method.label)
            results += run_toy([method], steps, scale=scale, seed=seed, on_step=bar.update)
    elapsed = time.perf_counter() - begin

    text, markdown, rows = toy_table(results)
    echo()
    echo(text)
    figure = out / "toy.png"
    plot_toy(results, scale, figure)
    (out / "toy.md").write_text(
        f"# CAGrad's toy problem ({steps} steps, scale {scale:g})\n\n{markdown}\n",
        encoding="utf-8",
    )
    write_json(out / "toy.json", {"steps": steps, "scale": scale, "methods": rows})
    echo()
    echo(f"ran in {elapsed:.1f} s; wrote {figure}, {out / 'toy.md'}, {out / 'toy.json'}")
    return 0
