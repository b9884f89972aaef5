"""Where :class:`~mtlgrad.diagnostics.GradientMonitor` writes its scalars: TensorBoard or CSV."""

from __future__ import annotations

import csv
import re
from pathlib import Path

BACKENDS = ("auto", "tensorboard", "csv")
CSV_NAME = "gradients.csv"


def tag(name: str) -> str:
    """A task name as a TensorBoard-friendly tag part (letters, digits, ``_ . -``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardWriter:
    """Scalars into a TensorBoard event file in ``log_dir`` (``torch.utils.tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "GradientMonitor(backend='tensorboard') needs TensorBoard: pip install tensorboard "
                "(or use backend='csv')"
            ) from error
        self.path = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, scalars: dict[str, float | None]) -> None:
        for key, value in scalars.items():
            if value is not None:  # absent at this step (no Gram matrix, skipped step)
                self._writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class CSVWriter:
    """One row per update in ``log_dir/gradients.csv`` (overwritten), one column per scalar;
    the columns are fixed by the first update, empty cells where a step has no value."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / CSV_NAME
        self._file = self.path.open("w", newline="")
        self._writer: csv.DictWriter | None = None

    def write(self, step: int, scalars: dict[str, float | None]) -> None:
        row = {"step": step, **scalars}
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), restval="")
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
