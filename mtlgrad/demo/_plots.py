"""The demo's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

matplotlib is imported here only; this module is imported when a figure is drawn.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtlgrad.demo._problem import Task
from mtlgrad.demo._toy import PARETO_X2, ToyResult, toy_losses
from mtlgrad.demo._train import MethodResult

__all__ = ["plot_demo", "plot_toy"]

HEAT_COLUMNS = 4
LINE_STYLES = ("-", "--")
PALETTE = 10  # tab10


def _line_style(k: int) -> str:
    """Line ``k``'s style: alternating, shifted by one on each turn of the palette, so that the
    first 2 x 10 lines all differ in colour or style."""
    return LINE_STYLES[(k + k // PALETTE) % len(LINE_STYLES)]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % PALETTE) for i in range(n)]


def plot_demo(results: Sequence[MethodResult], tasks: Sequence[Task], path: Path) -> None:
    """Test metric curves per task (one line per method), then, per gradient method, a heat map
    of the task-gradient cosines on the trunk: task pairs x evaluation steps."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    T = len(tasks)
    with_cosines = [r for r in results if r.cosines]
    heat_rows = math.ceil(len(with_cosines) / HEAT_COLUMNS)
    fig = Figure(figsize=(3.6 * max(T, HEAT_COLUMNS), 3.4 * (1 + heat_rows)), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, max(heat_rows, 1)])

    curve_axes = top.subplots(1, T, squeeze=False)[0]
    top.suptitle("test metric per task (same initialisation, batches and steps for every method)")
    colors = _colors(len(results))
    for t, (task, ax) in enumerate(zip(tasks, curve_axes)):
        for k, (result, color) in enumerate(zip(results, colors)):
            values = [row[t] for row in result.curves]
            ax.plot(
                result.eval_steps,
                values,
                color=color,
                linestyle=_line_style(k),
                label=result.method.label,
                lw=1.5,
            )
        if task.kind == "regression":
            ax.set_yscale("log")
            # Plain numbers; minor ticks labelled only when the axis spans under a decade.
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            low, high = ax.get_ylim()
            if high < 10 * low:
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
                ax.tick_params(axis="y", which="minor", labelsize=6)
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{task.name} (σ={task.scale:g}): NMSE, lower is better", fontsize=9)
        else:
            ax.set_title(f"{task.name}: accuracy %, higher is better", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    curve_axes[0].legend(fontsize=7, ncol=2)

    if with_cosines:
        pairs = list(itertools.combinations(range(T), 2))
        pair_labels = [f"{tasks[i].name} / {tasks[j].name}" for i, j in pairs]
        heat_axes = bottom.subplots(heat_rows, HEAT_COLUMNS, squeeze=False).ravel()
        bottom.suptitle(
            "cosines between task gradients on the shared trunk, mean over each evaluation "
            "interval (red: conflicting)"
        )
        # One symmetric colour scale for all maps, fitted to the data (98th percentile of |cos|,
        # beyond it the colour saturates): cosines between the gradients of a wide trunk are
        # mostly small.
        matrices = [
            np.array([[float(c[i, j]) for c in result.cosines] for i, j in pairs])
            for result in with_cosines
        ]
        limit = max(
            1e-3, float(np.percentile(np.abs(np.concatenate([m.ravel() for m in matrices])), 98))
        )
        image = None
        for k, ax in enumerate(heat_axes):
            if k >= len(with_cosines):
                ax.set_axis_off()
                continue
            result, matrix = with_cosines[k], matrices[k]
            last = result.eval_steps[matrix.shape[1] - 1]
            image = ax.imshow(
                matrix,
                aspect="auto",
                cmap="RdBu",
                vmin=-limit,
                vmax=limit,
                interpolation="nearest",
                extent=(0, last, len(pairs) - 0.5, -0.5),
            )
            ax.set_title(
                f"{result.method.label} (conflicting pairs {result.conflicts:.0%})", fontsize=9
            )
            ax.set_yticks(range(len(pairs)))
            ax.set_yticklabels(pair_labels if k % HEAT_COLUMNS == 0 else [], fontsize=6)
            ax.set_xlabel("step")
        bottom.colorbar(image, ax=heat_axes, shrink=0.8, label=f"cosine (scale ±{limit:.2f})")
    fig.savefig(path, dpi=100)


def plot_toy(results: Sequence[ToyResult], scale: float, path: Path) -> None:
    """The objectives' contours, then each method's trajectories on the contours of the average
    objective, with the starting points (black) and the papers' Pareto segment (grey)."""
    n = 300
    axis = np.linspace(-10.0, 10.0, n)
    X1, X2 = np.meshgrid(axis, axis)
    losses = toy_losses(np.stack([X1, X2], axis=-1), scale)
    mean = losses.mean(axis=-1)

    panels = 1 + len(results)
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(4 * columns, 4 * rows), layout="constrained")
    FigureCanvasAgg(fig)

    ax = fig.add_subplot(rows, columns, 1)
    ax.contour(X1, X2, losses[..., 0], levels=15, cmap="Blues")
    ax.contour(X1, X2, losses[..., 1], levels=15, cmap="Oranges")
    ax.set_title(f"L1 (blues, scale {scale:g}) and L2 (oranges)", fontsize=9)
    _decorate(ax)

    start_colors = _colors(results[0].trajectories.shape[0] if results else 0)
    for k, result in enumerate(results):
        ax = fig.add_subplot(rows, columns, k + 2)
        ax.contour(X1, X2, mean, levels=20, cmap="viridis", linewidths=0.8)
        for trajectory, color in zip(result.trajectories, start_colors):
            ax.plot(trajectory[:, 0], trajectory[:, 1], color=color, lw=1.8)
            ax.plot(*trajectory[0], "o", color="black", ms=5)
            ax.plot(*trajectory[-1], "*", color=color, ms=10, mec="black", mew=0.5)
        ax.set_title(result.method.label)
        _decorate(ax)
    fig.suptitle(
        "CAGrad's toy problem: Adam trajectories from 5 starts on the average objective's contours"
    )
    fig.savefig(path, dpi=100)


def _decorate(ax) -> None:
    ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="grey", lw=4, alpha=0.6, zorder=0)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
