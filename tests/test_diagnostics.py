"""GradientMonitor: running statistics against hand-computed values, the CSV and TensorBoard logs,
the cosine figure, and a real training loop feeding it."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import mtlgrad
from mtlgrad import StepRecord
from mtlgrad.aggregators import GradDrop, PCGrad
from mtlgrad.diagnostics import GradientMonitor, _monitor


def t64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def records() -> list[StepRecord]:
    """Three Gram steps, one elementwise step (no Gram, no weights) and one skipped step.

    cos(a, b) per Gram step: -2 / (2 * 2) = -0.5, 0 / (1 * 3) = 0, 2 / (1 * 4) = 0.5.
    """
    names = ["a", "b"]
    return [
        StepRecord(names, t64([0.5, 0.5]), t64([[4, -2], [-2, 4]]), losses=t64([1, 2])),
        StepRecord(names, t64([0.25, 0.75]), t64([[1, 0], [0, 9]]), losses=t64([3, 4])),
        StepRecord(names, t64([1, 0]), t64([[1, 2], [2, 16]]), losses=t64([5, 6])),
        StepRecord(names, None, None, losses=t64([7, 8])),
        StepRecord(names, None, None, skipped=True, losses=t64([math.inf, 1])),
    ]


def close(actual: torch.Tensor | None, expected: list) -> None:
    assert actual is not None
    torch.testing.assert_close(actual, t64(expected), rtol=0, atol=1e-12)


def test_running_statistics_by_hand() -> None:
    monitor = GradientMonitor(ema=0.5)
    for record in records():
        monitor.update(record)
    s = monitor.summary()
    assert s["names"] == ["a", "b"]
    assert (s["steps"], s["gram_steps"], s["skipped_steps"]) == (5, 3, 1)
    # Means over the three Gram steps; EMA m1 = x1, m_k = 0.5 m_{k-1} + 0.5 x_k.
    close(s["cosines_mean"], [[1, 0], [0, 1]])
    close(s["cosines_ema"], [[1, 0.125], [0.125, 1]])  # -0.5, -0.25, 0.125
    assert s["conflicts_mean"] == pytest.approx(1 / 3, abs=1e-15)
    assert s["conflicts_ema"] == pytest.approx(0.25, abs=1e-15)  # 1, 0.5, 0.25
    close(s["norms_mean"], [4 / 3, 3])
    close(s["norms_ema"], [1.25, 3.25])  # [2, 2], [1.5, 2.5], [1.25, 3.25]
    close(s["weights_mean"], [7 / 12, 5 / 12])
    close(s["weights_ema"], [0.6875, 0.3125])
    # Losses of the four steps that were not skipped (the elementwise one included).
    close(s["losses_mean"], [4, 5])
    close(s["losses_ema"], [5.25, 6.25])  # [1, 2], [2, 3], [3.5, 4.5], [5.25, 6.25]


def test_cosines_agree_with_the_record() -> None:
    monitor = GradientMonitor(ema=0.0)  # the EMA is then the last value
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    J[2] = 0  # a zero gradient: cosine 0, as StepRecord.cosines
    record = StepRecord(["x", "y", "z"], None, J @ J.T)
    monitor.update(record)
    s = monitor.summary()
    torch.testing.assert_close(s["cosines_ema"], record.cosines)
    torch.testing.assert_close(s["norms_mean"], J.norm(dim=1))
    assert s["conflicts_mean"] == record.conflicts
    assert s["weights_mean"] is None and s["losses_mean"] is None


def test_statistics_are_the_records_own() -> None:
    # The monitor has no cosine maths of its own: a record that defines its cosines, norms and
    # conflicts otherwise is summarised with its own values.
    class Defined(StepRecord):
        @property
        def cosines(self):
            return t64([[1, 0.25], [0.25, 1]])

        @property
        def norms(self):
            return t64([3, 5])

        @property
        def conflicts(self):
            return 0.75

    monitor = GradientMonitor()
    monitor.update(Defined(["a", "b"], None, t64([[4, -2], [-2, 4]])))
    s = monitor.summary()
    close(s["cosines_mean"], [[1, 0.25], [0.25, 1]])
    close(s["norms_mean"], [3, 5])
    assert s["conflicts_mean"] == 0.75


def test_text_colour_follows_the_cell() -> None:
    from matplotlib import colormaps

    cmap = colormaps["RdBu"]
    assert _monitor._text_color(cmap(1.0)) == "white"  # dark navy: cosine 1
    assert _monitor._text_color(cmap(0.0)) == "white"  # dark red: cosine -1
    assert _monitor._text_color(cmap(0.5)) == "black"  # near white: cosine 0
    assert _monitor._text_color((1.0, 1.0, 1.0, 1.0)) == "black"
    assert _monitor._text_color((0.0, 0.0, 0.0, 1.0)) == "white"


def test_no_gram_yet() -> None:
    monitor = GradientMonitor()
    monitor.update(StepRecord(["a", "b"], None, None, losses=t64([1, 2])))
    s = monitor.summary()
    assert s["steps"] == 1 and s["gram_steps"] == 0
    assert s["cosines_mean"] is None and s["conflicts_mean"] is None
    with pytest.raises(ValueError, match="no step with a Gram matrix"):
        monitor.plot_cosines("unused.png")


def test_csv_contents(tmp_path) -> None:
    with GradientMonitor(tmp_path, backend="csv") as monitor:
        assert monitor.backend == "csv"
        for k, record in enumerate(records()):
            monitor.update(record, step=10 * k)
    with (tmp_path / "gradients.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "step",
        "skipped",
        "conflicts",
        "loss/a",
        "loss/b",
        "weight/a",
        "weight/b",
        "norm/a",
        "norm/b",
        "cosine/a__b",
    ]
    assert [r["step"] for r in rows] == ["0", "10", "20", "30", "40"]
    assert [float(r["cosine/a__b"]) for r in rows[:3]] == [-0.5, 0.0, 0.5]
    assert [float(r["conflicts"]) for r in rows[:3]] == [1.0, 0.0, 0.0]
    assert [float(r["norm/b"]) for r in rows[:3]] == [2.0, 3.0, 4.0]
    assert [float(r["weight/b"]) for r in rows[:3]] == [0.5, 0.75, 0.0]
    # The elementwise step: losses only; the skipped step: flagged, no weights or cosines.
    assert rows[3]["loss/a"] == "7.0" and rows[3]["cosine/a__b"] == rows[3]["weight/a"] == ""
    assert rows[4]["skipped"] == "1.0" and rows[4]["cosine/a__b"] == ""
    assert [r["skipped"] for r in rows[:4]] == ["0.0"] * 4


def test_tensorboard_event_file(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with GradientMonitor(tmp_path, backend="tensorboard") as monitor:
        for record in records():
            monitor.update(record)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    cosines = events.Scalars("cosine/a__b")
    assert [e.step for e in cosines] == [0, 1, 2]
    assert [e.value for e in cosines] == [-0.5, 0.0, 0.5]
    assert [e.value for e in events.Scalars("loss/b")] == [2, 4, 6, 8, 1]
    assert [e.value for e in events.Scalars("skipped")] == [0, 0, 0, 0, 1]


def test_auto_backend(tmp_path, monkeypatch) -> None:
    with GradientMonitor(tmp_path / "tb") as monitor:
        assert monitor.backend == "tensorboard"  # installed with the test requirements
    monkeypatch.setattr(_monitor, "tensorboard_available", lambda: False)
    with GradientMonitor(tmp_path / "csv") as monitor:
        assert monitor.backend == "csv"
    assert (tmp_path / "csv" / "gradients.csv").exists()
    assert GradientMonitor().backend is None  # no log_dir: statistics only


def test_training_loop_and_figure(tmp_path) -> None:
    from matplotlib.image import imread

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleDict({n: nn.Linear(16, 1) for n in ("depth", "normals", "edges")})
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    aggregator = PCGrad(generator=torch.Generator().manual_seed(0))
    seen = []
    with GradientMonitor(tmp_path / "log", backend="csv", ema=0.8) as monitor:
        for _ in range(6):
            optimizer.zero_grad()
            z = trunk(x)
            losses = {
                n: ((h(z).squeeze(-1) - y[:, i]) ** 2).mean()
                for i, (n, h) in enumerate(heads.items())
            }
            record = mtlgrad.backward(
                losses, shared_params=trunk.parameters(), aggregator=aggregator
            )
            optimizer.step()
            monitor.update(record)
            seen.append(record)
        # An elementwise method in the same run: no Gram matrix, handled.
        optimizer.zero_grad()
        z = trunk(x)
        losses = {
            n: ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, (n, h) in enumerate(heads.items())
        }
        record = mtlgrad.backward(losses, shared_params=trunk.parameters(), aggregator=GradDrop())
        assert record.gram is None
        monitor.update(record)
        path = monitor.plot_cosines(tmp_path / "cosines.png")
    s = monitor.summary()
    assert s["names"] == ["depth", "normals", "edges"]
    assert (s["steps"], s["gram_steps"]) == (7, 6)
    torch.testing.assert_close(s["cosines_mean"], torch.stack([r.cosines for r in seen]).mean(0))
    torch.testing.assert_close(s["weights_mean"], torch.stack([r.weights for r in seen]).mean(0))
    expected_conflicts = sum(r.conflicts for r in seen) / len(seen)
    assert s["conflicts_mean"] == pytest.approx(expected_conflicts)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # The figure with one panel (EMA, no history) as well.
    monitor_no_history = GradientMonitor(history=False)
    monitor_no_history.update(seen[0])
    assert monitor_no_history.plot_cosines(tmp_path / "ema.png", which="ema").exists()


def test_errors() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        GradientMonitor(backend="wandb")
    with pytest.raises(ValueError, match=r"ema must be a number in \[0, 1\), got 1.0"):
        GradientMonitor(ema=1.0)
    monitor = GradientMonitor()
    with pytest.raises(TypeError, match="must be an mtlgrad StepRecord, got dict"):
        monitor.update({"gram": None})
    monitor.update(records()[0])
    with pytest.raises(ValueError, match=r"tasks \['a', 'c'\] differ"):
        monitor.update(StepRecord(["a", "c"], None, None))
    with pytest.raises(ValueError, match=r"record.gram has shape \(3, 3\), expected \(2, 2\)"):
        monitor.update(StepRecord(["a", "b"], None, torch.eye(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="which must be 'mean' or 'ema'"):
        monitor.plot_cosines("unused.png", which="last")
