"""The demo's tables: aligned text for the terminal, markdown and JSON for the output folder."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlgrad.demo._metrics import delta_m
from mtlgrad.demo._problem import Task
from mtlgrad.demo._toy import ToyResult
from mtlgrad.demo._train import MethodResult

__all__ = ["demo_table", "echo", "toy_table", "write_json"]

DEMO_NOTES = (
    "NMSE: test MSE divided by the variance of the test targets (1 - R², lower is better); "
    "accuracy in % (higher is better).",
    "Δm%: mean relative performance drop against Sum over all tasks "
    "(100/T Σ_t ±(M_t - M_Sum,t)/M_Sum,t, + for lower-is-better metrics): "
    "lower is better, negative = better than Sum.",
    "ms/step: wall time of a training step (forward, per-task backward, aggregation, Adam). "
    "conflicts: mean fraction of task pairs with a negative gradient cosine on the trunk "
    "('-': a loss weighting such as UW aggregates no task gradients).",
)


def echo(text: str = "") -> None:
    """Prints, replacing what the terminal's encoding cannot show (Δ, σ) instead of failing."""
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, "replace").decode(encoding))


def _rows(table: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    return table[0], table[1:]


def _text(table: list[list[str]]) -> str:
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines = []
    for k, row in enumerate(table):
        cells = [
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(table: list[list[str]]) -> str:
    header, body = _rows(table)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def demo_table(
    results: Sequence[MethodResult], tasks: Sequence[Task]
) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, markdown, rows as dicts) of the per-method table; the first result is Sum, the
    baseline of Δm."""
    baseline = results[0].metrics
    lower = [task.lower_is_better for task in tasks]
    header = ["method"]
    header += [f"{t.name} {'NMSE' if t.kind == 'regression' else 'acc %'}" for t in tasks]
    header += ["Δm% vs Sum", "ms/step", "conflicts"]
    table = [header]
    rows = []
    for result in results:
        dm = delta_m(result.metrics, baseline, lower)
        cells = [result.method.label]
        for task, value in zip(tasks, result.metrics):
            cells.append(f"{value:.4f}" if task.kind == "regression" else f"{value:.1f}")
        cells.append(f"{dm:+.1f}")
        cells.append(f"{result.ms_per_step:.2f}")
        cells.append("-" if result.conflicts is None else f"{result.conflicts:.0%}")
        table.append(cells)
        row = result.to_json()
        row["delta_m_percent"] = dm
        rows.append(row)
    return _text(table), _markdown(table), rows


def toy_table(results: Sequence[ToyResult]) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, markdown, rows as dicts): final point and objectives per method and start."""
    table = [["method", "start", "final x", "L1", "L2", "ms/step"]]
    rows = []
    for result in results:
        starts = result.trajectories[:, 0]
        for s, (start, final, losses) in enumerate(zip(starts, result.final, result.final_losses)):
            table.append(
                [
                    result.method.label if s == 0 else "",
                    f"({start[0]:g}, {start[1]:g})",
                    f"({final[0]:.3f}, {final[1]:.3f})",
                    f"{losses[0]:.3f}",
                    f"{losses[1]:.3f}",
                    f"{result.ms_per_step:.2f}" if s == 0 else "",
                ]
            )
        rows.append(
            {
                "method": result.method.label,
                "starts": starts.tolist(),
                "final": result.final.tolist(),
                "final_losses": result.final_losses.tolist(),
                "ms_per_step": result.ms_per_step,
            }
        )
    return _text(table), _markdown(table), rows


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
