"""Running statistics of the task gradients' geometry, from the step records."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from mtlgrad.diagnostics._writers import (
    BACKENDS,
    CSVWriter,
    TensorBoardWriter,
    tag,
    tensorboard_available,
)
from mtlgrad.step import StepRecord

__all__ = ["GradientMonitor"]


class _Running:
    """Running mean and exponential moving average of a float64 tensor."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.count = 0
        self.mean: Tensor | None = None
        self.ema: Tensor | None = None

    def add(self, value: Tensor) -> None:
        self.count += 1
        if self.mean is None or self.ema is None:
            self.mean, self.ema = value.clone(), value.clone()
            return
        self.mean += (value - self.mean) / self.count
        self.ema.mul_(self.decay).add_(value, alpha=1.0 - self.decay)


class GradientMonitor:
    """Watches the task gradients through the :class:`~mtlgrad.StepRecord` of each step.

    Everything comes from what the step already computed: the record's cosines, task-gradient
    norms and share of conflicting pairs (``record.cosines``, ``record.norms``,
    ``record.conflicts``, all read from the Gram matrix ``G = J Jᵀ`` of the task gradients), its
    weights and its losses; no extra gradient pass. Per update, whatever the record still holds
    on a device is copied to the host in one transfer; the statistics are kept in float64 on the
    CPU. Running statistics:

    - the mean and the exponential moving average (EMA) of the T x T cosine matrix
      ``G_ij / (|g_i| |g_j|)`` (0 where a gradient is zero), of the fraction of task pairs with a
      negative cosine, of the task-gradient norms ``sqrt(G_ii)``, of the weights and of the
      losses;
    - the number of steps, of steps with a Gram matrix, and of skipped steps (a GradScaler
      overflow: ``record.skipped``; such a step's values are left out of the statistics, since
      the update did not happen and its gradients overflowed).

    The EMA with decay ``ema`` (β) starts at the first value and then follows
    ``m_k = β m_{k-1} + (1 - β) x_k``. Records without a Gram matrix (elementwise methods such as
    GradDrop: ``weights`` and ``gram`` are ``None``) add to the losses and the step count only.

    With ``log_dir``, every update's scalars (``conflicts``, ``skipped``, ``loss/<task>``,
    ``weight/<task>``, ``norm/<task>``, ``cosine/<task a>__<task b>`` for each pair) are written to
    TensorBoard (``backend="tensorboard"``, needs the ``tensorboard`` package) or to
    ``log_dir/gradients.csv`` (``backend="csv"``, one row per update); ``"auto"`` takes
    TensorBoard when it is installed, else CSV. Without ``log_dir`` nothing is written.

    Example::

        with GradientMonitor(log_dir="runs/mtl") as monitor:
            for x, y in loader:
                record = mtlgrad.backward(losses, shared_params=trunk.parameters(), aggregator=agg)
                optimizer.step()
                monitor.update(record)
            monitor.plot_cosines("cosines.png")
            print(monitor.summary()["conflicts_mean"])

    Args:
        log_dir: folder for the TensorBoard event file or the CSV file; ``None`` to only keep the
            statistics.
        backend: ``"auto"``, ``"tensorboard"`` or ``"csv"``.
        ema: decay of the moving averages, in [0, 1).
        history: keep every update's cosine matrix for the per-pair curves of
            :meth:`plot_cosines` (T² floats per update).
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        backend: str = "auto",
        ema: float = 0.9,
        history: bool = True,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
            )
        if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0 <= ema < 1:
            raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self.history = history
        self.writer: TensorBoardWriter | CSVWriter | None = None
        if log_dir is not None:
            log_dir = Path(log_dir)
            if backend == "auto":
                backend = "tensorboard" if tensorboard_available() else "csv"
            self.writer = (
                TensorBoardWriter(log_dir) if backend == "tensorboard" else CSVWriter(log_dir)
            )
        self.backend = backend if log_dir is not None else None
        self.names: list[str] | None = None
        self.steps = 0
        self.skipped = 0
        self._next_step = 0
        self._cosines = _Running(self.ema)
        self._conflicts = _Running(self.ema)
        self._norms = _Running(self.ema)
        self._weights = _Running(self.ema)
        self._losses = _Running(self.ema)
        self._history_steps: list[int] = []
        self._history_cosines: list[Tensor] = []

    def __repr__(self) -> str:
        return f"GradientMonitor(backend={self.backend!r}, ema={self.ema}, steps={self.steps})"

    # Updates ----------------------------------------------------------------------------------

    def update(self, record: StepRecord, step: int | None = None) -> None:
        """Adds one step's record to the statistics and writes its scalars.

        Args:
            record: what ``mtlgrad.backward`` or ``MTLOptimizer.backward`` returned.
            step: the global step for the log (default: the number of updates so far).
        """
        if not isinstance(record, StepRecord):
            raise TypeError(f"record must be an mtlgrad StepRecord, got {type(record).__name__}")
        names = list(record.names)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(
                f"the record's tasks {names} differ from the tasks of the previous updates "
                f"{self.names}; use one monitor per set of tasks"
            )
        T = len(names)
        for label, value, shape in (
            ("gram", record.gram, (T, T)),
            ("weights", record.weights, (T,)),
            ("losses", record.losses, (T,)),
        ):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"record.{label} has shape {tuple(value.shape)}, expected {shape} for the "
                    f"{T} tasks {names}"
                )
        if step is None:
            step = self._next_step
        self._next_step = step + 1
        self.steps += 1

        # The cosines, the norms and the share of conflicting pairs are the record's own (one
        # definition, in StepRecord); a skipped step's overflowed gradients are not read.
        with_gram = record.gram is not None and not record.skipped
        norms, cosines, weights, losses = _to_host(
            [
                record.norms if with_gram else None,
                record.cosines if with_gram else None,
                record.weights,
                record.losses,
            ]
        )
        conflicts = record.conflicts if with_gram else None
        if record.skipped:
            self.skipped += 1
        else:
            if cosines is not None and norms is not None:
                self._cosines.add(cosines)
                self._norms.add(norms)
                self._conflicts.add(torch.tensor(conflicts, dtype=torch.float64))
                if self.history:
                    self._history_steps.append(step)
                    self._history_cosines.append(cosines)
            if weights is not None:
                self._weights.add(weights)
            if losses is not None:
                self._losses.add(losses)
        if self.writer is not None:
            self.writer.write(
                step,
                self._scalars(
                    record.skipped,
                    conflicts,
                    losses,
                    None if record.skipped else weights,
                    norms,
                    cosines,
                ),
            )

    def _scalars(
        self,
        skipped: bool,
        conflicts: float | None,
        losses: Tensor | None,
        weights: Tensor | None,
        norms: Tensor | None,
        cosines: Tensor | None,
    ) -> dict[str, float | None]:
        """Every scalar key for these tasks (the same keys every update; None where absent)."""
        assert self.names is not None
        tags = [tag(n) for n in self.names]
        scalars: dict[str, float | None] = {"skipped": float(skipped), "conflicts": conflicts}
        for prefix, values in (("loss", losses), ("weight", weights), ("norm", norms)):
            listed = None if values is None else values.tolist()
            for t, name in enumerate(tags):
                scalars[f"{prefix}/{name}"] = None if listed is None else listed[t]
        listed_cosines = None if cosines is None else cosines.tolist()
        for i in range(len(tags)):
            for j in range(i + 1, len(tags)):
                value = None if listed_cosines is None else listed_cosines[i][j]
                scalars[f"cosine/{tags[i]}__{tags[j]}"] = value
        return scalars

    # Results ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The running statistics.

        Keys: ``names``; ``steps``, ``gram_steps`` (steps with a Gram matrix, not skipped),
        ``skipped_steps``; ``cosines_mean`` / ``cosines_ema`` (float64 T x T), ``conflicts_mean``
        / ``conflicts_ema`` (floats), ``norms_*``, ``weights_*``, ``losses_*`` (float64, T).
        A statistic with no data yet is ``None``.
        """
        conflicts_mean = self._conflicts.mean
        conflicts_ema = self._conflicts.ema
        return {
            "names": None if self.names is None else list(self.names),
            "steps": self.steps,
            "gram_steps": self._cosines.count,
            "skipped_steps": self.skipped,
            "cosines_mean": _copy(self._cosines.mean),
            "cosines_ema": _copy(self._cosines.ema),
            "conflicts_mean": None if conflicts_mean is None else float(conflicts_mean),
            "conflicts_ema": None if conflicts_ema is None else float(conflicts_ema),
            "norms_mean": _copy(self._norms.mean),
            "norms_ema": _copy(self._norms.ema),
            "weights_mean": _copy(self._weights.mean),
            "weights_ema": _copy(self._weights.ema),
            "losses_mean": _copy(self._losses.mean),
            "losses_ema": _copy(self._losses.ema),
        }

    def plot_cosines(self, path: str | Path, *, which: str = "mean") -> Path:
        """Draws the cosine heat map (``which``: the ``"mean"`` or ``"ema"`` cosine matrix, with
        the task names) and, when the history is kept and there are two or more steps, each task
        pair's cosine over the steps; saves the figure to ``path`` (PNG, PDF, SVG, ...).

        Needs matplotlib (``pip install "mtlgrad[cli]"``).
        """
        if which not in ("mean", "ema"):
            raise ValueError(f"which must be 'mean' or 'ema', got {which!r}")
        matrix = self._cosines.mean if which == "mean" else self._cosines.ema
        if matrix is None or self.names is None:
            raise ValueError(
                "plot_cosines: no step with a Gram matrix has been recorded yet (elementwise "
                "methods such as GradDrop compute none, and skipped steps do not count)"
            )
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                'GradientMonitor.plot_cosines needs matplotlib: pip install "mtlgrad[cli]"'
            ) from error

        T = len(self.names)
        curves = self.history and len(self._history_steps) >= 2 and T >= 2
        # Cells large enough for their numbers (8 pt and up) whatever the number of tasks.
        width, height = max(5.5, 0.55 * T + 1.5), max(4.5, 0.45 * T + 1.5)
        figure = Figure(figsize=(2 * width if curves else width, height), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, 2 if curves else 1, squeeze=False)[0]
        heat = axes[0]
        image = heat.imshow(matrix.numpy(), cmap="RdBu", vmin=-1.0, vmax=1.0)
        heat.set_xticks(range(T), labels=self.names, rotation=45, ha="right")
        heat.set_yticks(range(T), labels=self.names)
        if T <= 12:
            size = 10 if T <= 6 else 9 if T <= 9 else 8
            for i in range(T):
                for j in range(T):
                    value = float(matrix[i, j])
                    heat.text(
                        j,
                        i,
                        f"{value + 0.0:.2f}".replace("-0.00", "0.00"),
                        ha="center",
                        va="center",
                        fontsize=size,
                        color=_text_color(image.cmap(image.norm(value))),
                    )
        heat.set_title(f"{which} cosine between task gradients ({self._cosines.count} steps)")
        figure.colorbar(image, ax=heat, shrink=0.8, label="cosine (red: conflicting)")
        if curves:
            history = torch.stack(self._history_cosines)
            ax = axes[1]
            for i in range(T):
                for j in range(i + 1, T):
                    label = f"{self.names[i]} · {self.names[j]}"
                    ax.plot(self._history_steps, history[:, i, j].numpy(), label=label)
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel("cosine")
            ax.set_ylim(-1.05, 1.05)
            ax.set_title("cosine per task pair")
            if T * (T - 1) // 2 <= 10:
                ax.legend(fontsize="small")
        path = Path(path)
        figure.savefig(path)
        return path

    # Lifetime ---------------------------------------------------------------------------------

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Closes the log (the statistics stay available)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> GradientMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _copy(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.clone()


def _text_color(rgba: tuple[float, ...]) -> str:
    """White on a dark cell, black on a light one: the text colour of higher contrast against
    the cell's relative luminance (WCAG 2; both contrasts are equal at 0.179)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "white" if luminance < 0.179 else "black"


def _to_host(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """float64 CPU copies, with the device tensors moved in one transfer."""
    on_device = [t for t in tensors if t is not None and t.device.type != "cpu"]
    moved: list[Tensor] = []
    if on_device:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in on_device]).cpu()
        moved = list(flat.split([t.numel() for t in on_device]))
    result: list[Tensor | None] = []
    k = 0
    for t in tensors:
        if t is None:
            result.append(None)
        elif t.device.type != "cpu":
            result.append(moved[k].reshape(t.shape))
            k += 1
        else:
            result.append(t.detach().to(torch.float64).clone())
    return result
