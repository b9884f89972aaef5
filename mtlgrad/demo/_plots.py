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
# Twelve colours told apart at a glance: black for the first method (Sum, the baseline of Δm),
# then tab10, then navy; past twelve methods the colours repeat with another line style.
PALETTE = (
    *("#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"),
    *("#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000080"),
)
# Gradient aggregators draw solid lines, loss weightings dashed ones (first turn of the palette).
LINE_STYLES = {False: ("-", ":"), True: ("--", "-.")}
FONT = 9  # points: tick labels, titles and legends of the figures (12.5 px at the saved 100 dpi)


def method_styles(loss_based: Sequence[bool]) -> list[tuple[str, str]]:
    """``(colour, line style)`` of each method in run order: every method its own pair."""
    return [
        (PALETTE[k % len(PALETTE)], LINE_STYLES[kind][(k // len(PALETTE)) % 2])
        for k, kind in enumerate(loss_based)
    ]


def _colors(n: int) -> list[str]:
    return [PALETTE[1 + k % (len(PALETTE) - 1)] for k in range(n)]


def plot_demo(results: Sequence[MethodResult], tasks: Sequence[Task], path: Path) -> None:
    """Test metric curves per task (one line per method, each method its own colour and line
    style in every panel; the legend beside the panels), then, per gradient method, a heat map
    of the task-gradient cosines on the trunk: task pairs x evaluation steps."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    T = len(tasks)
    with_cosines = [r for r in results if r.cosines]
    heat_rows = math.ceil(len(with_cosines) / HEAT_COLUMNS)
    width = 3.6 * max(T, HEAT_COLUMNS) + 1.6  # + the legend's column
    fig = Figure(figsize=(width, 3.6 + 3.4 * heat_rows), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 3.4 * max(heat_rows, 1)])

    # The legend gets a column of its own, beside the panels, never over a curve.
    curves, key = top.subfigures(1, 2, width_ratios=[3.6 * max(T, HEAT_COLUMNS), 1.6])
    curve_axes = curves.subplots(1, T, squeeze=False)[0]
    curves.suptitle(
        "test metric per task (same initialisation, batches and steps for every method)"
    )
    styles = method_styles([r.method.loss_based for r in results])
    for t, (task, ax) in enumerate(zip(tasks, curve_axes)):
        for result, (color, linestyle) in zip(results, styles):
            values = [row[t] for row in result.curves]
            ax.plot(
                result.eval_steps,
                values,
                color=color,
                linestyle=linestyle,
                label=result.method.label,
                lw=1.5,
            )
        if task.kind == "regression":
            ax.set_yscale("log")
            # Plain numbers; minor ticks labelled only when the axis spans under a decade, and
            # then only 2, 3 and 5 times a power of ten unless it spans under a factor 3.
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            low, high = ax.get_ylim()
            if high < 10 * low:
                if high >= 3 * low:
                    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
                ax.tick_params(axis="y", which="minor", labelsize=FONT - 1)
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{task.name} (σ={task.scale:g}): NMSE, lower is better", fontsize=FONT)
        else:
            ax.set_title(f"{task.name}: accuracy %, higher is better", fontsize=FONT)
        ax.set_xlabel("step")
        ax.tick_params(labelsize=FONT)
        ax.grid(alpha=0.3, which="both")
    key.legend(
        *curve_axes[0].get_legend_handles_labels(),
        loc="center left",
        fontsize=FONT,
        title="method (dashed:\nloss weighting)",
        title_fontsize=FONT,
        handlelength=2.6,
    )

    if with_cosines:
        pairs = list(itertools.combinations(range(T), 2))
        pair_labels = [f"{tasks[i].name} · {tasks[j].name}" for i, j in pairs]
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
        style_of = {id(r): style for r, style in zip(results, styles)}
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
            # The method's line from the curves above, as a key before its title.
            color, linestyle = style_of[id(result)]
            ax.add_line(
                Line2D(
                    [0.0, 0.09],
                    [1.045, 1.045],
                    transform=ax.transAxes,
                    color=color,
                    linestyle=linestyle,
                    lw=2.5,
                    clip_on=False,
                )
            )
            ax.set_title(
                f"{result.method.label} (conflicting pairs {result.conflicts:.0%})",
                fontsize=FONT,
                loc="left",
                x=0.12,
            )
            ax.set_yticks(range(len(pairs)))
            ax.set_yticklabels(pair_labels if k % HEAT_COLUMNS == 0 else [])
            ax.tick_params(labelsize=FONT)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10], integer=True))
            ax.set_xlabel("step")
        bottom.colorbar(image, ax=heat_axes, shrink=0.8, label=f"cosine (scale ±{limit:.2f})")
    fig.savefig(path, dpi=100)


def plot_toy(results: Sequence[ToyResult], scale: float, path: Path) -> None:
    """The objectives' contours, then each method's trajectories on the contours of the average
    objective, with the starting points (black), the end points (stars) and the papers' Pareto
    segment (grey); a legend below the panels says which is which."""
    from matplotlib.lines import Line2D

    n = 300
    axis = np.linspace(-10.0, 10.0, n)
    X1, X2 = np.meshgrid(axis, axis)
    losses = toy_losses(np.stack([X1, X2], axis=-1), scale)
    mean = losses.mean(axis=-1)

    panels = 1 + len(results)
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(4 * columns, 4 * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)

    ax = fig.add_subplot(rows, columns, 1)
    ax.contour(X1, X2, losses[..., 0], levels=15, cmap="Blues")
    ax.contour(X1, X2, losses[..., 1], levels=15, cmap="Oranges")
    ax.set_title(f"L1 (blues, scale {scale:g}) and L2 (oranges)", fontsize=FONT + 1)
    _decorate(ax)

    starts = results[0].trajectories[:, 0] if results else np.empty((0, 2))
    start_colors = _colors(starts.shape[0])
    for k, result in enumerate(results):
        ax = fig.add_subplot(rows, columns, k + 2)
        ax.contour(X1, X2, mean, levels=20, cmap="viridis", linewidths=0.8)
        for trajectory, color in zip(result.trajectories, start_colors):
            ax.plot(trajectory[:, 0], trajectory[:, 1], color=color, lw=1.8)
            ax.plot(*trajectory[0], "o", color="black", ms=5)
            ax.plot(*trajectory[-1], "*", color=color, ms=10, mec="black", mew=0.5)
        ax.set_title(result.method.label)
        _decorate(ax)

    handles = [
        Line2D([], [], color=color, lw=1.8, label=f"trajectory from ({x1:g}, {x2:g})")
        for (x1, x2), color in zip(starts, start_colors)
    ]
    handles += [
        Line2D([], [], ls="", marker="o", color="black", ms=5, label="starting point"),
        Line2D(
            [],
            [],
            ls="",
            marker="*",
            color="white",
            mec="black",
            mew=0.5,
            ms=10,
            label="end point (star in its trajectory's colour)",
        ),
        Line2D([], [], color="grey", lw=4, alpha=0.6, label=f"Pareto set (x2 ≈ {PARETO_X2:.2f})"),
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(4, len(handles)), fontsize=FONT
    )
    fig.suptitle(
        f"CAGrad's toy problem: Adam trajectories from {starts.shape[0]} starts on the average "
        "objective's contours"
    )
    fig.savefig(path, dpi=100)


def _decorate(ax) -> None:
    ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="grey", lw=4, alpha=0.6, zorder=0)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
