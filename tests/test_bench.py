"""``mtlgrad bench``: the harness's timing logic, and the command end to end on tiny problems
(the figures of a tiny run mean nothing; only their form is checked, never wall time)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mtlgrad import cli
from mtlgrad.bench import _harness, _peers


class FakeClock:
    """A clock that each call of ``fn(i)`` advances by ``durations[i]``."""

    def __init__(self, durations: dict[int, float]) -> None:
        self.now = 0.0
        self.durations = durations
        self.calls: list[int] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, i: int) -> None:
        self.calls.append(i)
        self.now += self.durations[i]


def test_timer_warms_up_then_keeps_every_repetition() -> None:
    clock = FakeClock({0: 100.0, 1: 100.0, 2: 5.0, 3: 1.0, 4: 3.0})  # two warm-ups, three timed
    timer = _harness.Timer(torch.device("cpu"), warmup=2, repeat=3, clock=clock)
    assert timer.times(clock.fn) == [5.0, 1.0, 3.0]
    assert clock.calls == [0, 1, 2, 3, 4]  # the index keeps counting through the warm-up
    timing = timer(clock.fn)
    assert timing.times == (5.0, 1.0, 3.0)
    assert (timing.min, timing.median, timing.max) == (1.0, 3.0, 5.0)
    assert timing.spread == 5.0
    clock.durations[5] = 2.0
    even = _harness.Timer(torch.device("cpu"), warmup=2, repeat=4, clock=clock)
    assert even(clock.fn).median == 2.5  # mean of the two middle values of [5, 1, 3, 2]
    assert _harness.Timing((4.0,)).spread == 1.0
    assert _harness.Timing((1.0, 3.0)).scaled(0.5).times == (0.5, 1.5)
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        _harness.Timer(torch.device("cpu"), repeat=0)
    with pytest.raises(ValueError, match="at least one repetition"):
        _harness.Timing(())


def test_flags_from_a_fake_clock() -> None:
    # A floor of 2 s per repetition; an op that "ran" in 1 s (the machine was busy while the
    # floor was measured): impossible, flagged. Another op whose repetitions spread 1 to 4 s.
    timer = _harness.Timer(torch.device("cpu"), warmup=0, repeat=3)
    timer.clock = floor_clock = FakeClock({0: 2.0, 1: 2.0, 2: 2.1})
    floor = timer(floor_clock.fn)
    timer.clock = fast_clock = FakeClock({0: 1.0, 1: 1.0, 2: 1.1})
    fast = timer(fast_clock.fn)
    timer.clock = noisy_clock = FakeClock({0: 1.0, 1: 4.0, 2: 3.0})
    noisy = timer(noisy_clock.fn)

    below = _harness.ratio(fast.median, floor.median)
    assert below == 0.5
    assert _harness.flags({"": fast}, below) == [_harness.BELOW_FLOOR]
    assert _harness.BELOW_FLOOR == "below floor: noisy machine?"
    assert _harness.flags({"": noisy}, _harness.ratio(noisy.median, floor.median)) == [
        "spread 4.00x"
    ]
    assert _harness.flags({"agg": noisy, "floor": floor, "TorchJD": None}) == ["spread 4.00x (agg)"]
    assert _harness.flags({"": floor}, 1.0) == []  # at the floor, 1.05x spread: fine
    assert _harness.flags({"": noisy}, limit=5.0) == []

    # The flags reach the printed table, the markdown and the JSON.
    table = _harness.Table(
        "t",
        "a table",
        [
            _harness.Column("name", "name"),
            _harness.Column("ms", "time", "ms"),
            _harness.Column("ms_min", "min", "ms"),
            _harness.Column("ms_max", "max", "ms"),
            _harness.Column("flags", "flags"),
        ],
        rows=[
            {
                "name": "fast",
                **_harness.timed("ms", fast),
                "flags": _harness.flags({"": fast}, below),
            },
            {"name": "noisy", **_harness.timed("ms", noisy), "flags": _harness.flags({"": noisy})},
            {"name": "floor", **_harness.timed("ms", floor), "flags": []},
        ],
    )
    text = _harness.text_table(table)
    assert "min (ms)" in text and "max (ms)" in text
    fast_line = next(line for line in text.splitlines() if line.startswith("fast"))
    assert fast_line.split()[1:4] == ["1000.0", "1000.0", "1100.0"]
    assert fast_line.endswith("below floor: noisy machine?")
    assert "spread 4.00x" in text
    assert "| noisy | 3000.0 | 1000.0 | 4000.0 | spread 4.00x |" in _harness.markdown_table(table)
    rows = json.loads(json.dumps(table.to_json()))["rows"]
    assert rows[0]["flags"] == ["below floor: noisy machine?"]
    assert rows[1]["ms_times"] == [1000.0, 4000.0, 3000.0]  # every repetition, in ms
    assert _harness.flagged_rows([table]) == 2


def test_rotation() -> None:
    cpu = torch.device("cpu")
    mib = 1 << 20
    assert _harness.rotation_copies(100 * mib, cpu) == 3  # 3 x 100 MiB > 256 MiB of caches
    assert _harness.rotation_copies(1 << 30, cpu) == 1
    assert _harness.rotation_copies(1, cpu) == _harness.MAX_COPIES
    assert _harness.rotation_copies(mib, torch.device("cuda")) == 1
    with pytest.raises(ValueError, match="nbytes must be positive"):
        _harness.rotation_copies(0, cpu)

    made: list[int] = []
    rotation = _harness.Rotation(lambda k: made.append(k) or torch.full((2,), float(k)), 3)
    assert made == [0, 1, 2] and len(rotation) == 3
    picked = [int(rotation[i][0]) for i in range(7)]
    assert picked == [0, 1, 2, 0, 1, 2, 0]
    assert all(rotation[i] is not rotation[i + 1] for i in range(6))  # never the same twice


def test_split_sizes() -> None:
    sizes = _harness.split_sizes(1000, 7, torch.Generator().manual_seed(0))
    assert len(sizes) == 7 and sum(sizes) == 1000 and min(sizes) >= 1
    assert len(set(sizes)) > 1  # uneven, like a model's layers
    assert _harness.split_sizes(3, 3, torch.Generator().manual_seed(0)) == [1, 1, 1]


def test_format_and_tables() -> None:
    table = _harness.Table(
        "t",
        "a table",
        [_harness.Column("name", "name"), _harness.Column("ms", "time", "ms")],
        rows=[{"name": "x", "ms": 1234.5}, {"name": "peer", "ms": None}],
    )
    text = _harness.text_table(table)
    assert "1234.5" in text and "—" in text
    markdown = _harness.markdown_table(table)
    assert "| name | time (ms) |" in markdown and "| peer | — |" in markdown
    assert _harness.format_cell(0.0123, "ms") == "0.012"
    assert _harness.format_cell(2.0, "x") == "2.00x"


def bench(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``mtlgrad bench ...`` through the command's own parser and dispatch."""
    return cli.main(["bench", *argv])


def check_figures(table: dict) -> None:
    assert table["rows"], f"table {table['name']} is empty"
    units = {c["key"]: c["unit"] for c in table["columns"]}
    for row in table["rows"]:
        # Beyond the columns, a timed column's fastest, slowest and every repetition (ms).
        timed = [key for key, unit in units.items() if unit == "ms" and f"{key}_times" in row]
        extra = {f"{key}_{part}" for key in timed for part in ("min", "max", "times")}
        assert set(row) <= set(units) | extra, (table["name"], row)
        for key in timed:
            times = row[f"{key}_times"]
            if times is None:  # not measured, or derived (the combine floor: read + write)
                assert row[f"{key}_min"] is None and row[f"{key}_max"] is None
                continue
            assert times and all(math.isfinite(t) and t > 0 for t in times)
            assert row[f"{key}_min"] == min(times) and row[f"{key}_max"] == max(times)
            assert min(times) <= row[key] <= max(times)
        assert isinstance(row.get("flags", []), list)
        for key, value in row.items():
            if key not in units or value is None or units[key] == "":  # text, or not measured
                continue
            assert math.isfinite(value), (table["name"], row)
            if units[key] in ("ms", "x", "%"):
                assert value > 0, (table["name"], row)


def test_bench_all_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "LibMTL", None)  # LibMTL missing, whatever is installed
    monkeypatch.setitem(sys.modules, "LibMTL.weighting", None)
    assert bench(["all", "--size", "tiny", "--out", str(tmp_path)], monkeypatch) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "LibMTL: not installed" in printed
    assert "min (ms)" in printed and "flags" in printed
    assert "\r" not in captured.err and "run/s" not in captured.err  # no bar outside a terminal

    torchjd = importlib.util.find_spec("torchjd") is not None
    for suite in ("kernels", "aggregators", "step", "distributed"):
        (json_path,) = tmp_path.glob(f"bench-{suite}-*.json")
        (md_path,) = tmp_path.glob(f"bench-{suite}-*.md")
        result = json.loads(json_path.read_text())
        assert result["suite"] == suite and result["settings"]["size"] == "tiny"
        machine = result["machine"]
        for key in ("cpu", "cores", "torch", "cpu_kernels", "device", "date"):
            assert machine[key], key
        assert machine["torch"] == torch.__version__ and machine["device"] == "cpu"
        assert result["peers"]["LibMTL"]["installed"] is False
        assert result["peers"]["TorchJD"]["installed"] is torchjd
        for table in result["tables"]:
            check_figures(table)
        markdown = md_path.read_text()
        assert markdown.startswith(f"# mtlgrad bench {suite}")
        assert "LibMTL: not installed" in markdown
        for table in result["tables"]:
            assert f"### {table['title']}" in markdown
        assert markdown.count("\n| ") >= sum(len(t["rows"]) + 1 for t in result["tables"])

    kernels = json.loads(next(tmp_path.glob("bench-kernels-*.json")).read_text())
    by_name = {r["measurement"]: r for r in kernels["tables"][0]["rows"]}
    assert by_name["mtlgrad.ops.gram"]["ratio_of"] == "floor"
    assert by_name["mtlgrad.ops.gram"]["ratio"] == pytest.approx(
        by_name["mtlgrad.ops.gram"]["ms"] / by_name["gram floor (read T*P once)"]["ms"]
    )

    aggregators = json.loads(next(tmp_path.glob("bench-aggregators-*.json")).read_text())
    per_method = {r["method"]: r for r in aggregators["tables"][0]["rows"]}
    assert per_method["UPGrad"]["agg_over_floor"] == pytest.approx(
        per_method["UPGrad"]["agg_ms"] / per_method["UPGrad"]["floor_ms"]
    )
    no_peer = "no TorchJD version" if torchjd else "TorchJD not installed"
    assert per_method["HydaLearn"]["peer_status"] == no_peer
    assert per_method["GradDrop"]["weights_ms"] is None  # elementwise: no weights(G)
    if torchjd:
        assert per_method["UPGrad"]["peer_over_ours"] > 0
    else:
        assert per_method["UPGrad"]["peer_status"] == "TorchJD not installed"

    step = json.loads(next(tmp_path.glob("bench-step-*.json")).read_text())
    rows = {r["step"]: r for r in step["tables"][0]["rows"]}
    assert rows["summed loss"]["x_summed"] == 1.0
    for variant in ("loop", "batched", "loop, features=z"):
        assert rows[f"mtlgrad PCGrad {variant}"]["ms"] > 0  # measured in its own process
    assert rows["mtlgrad UPGrad loop, torch.compile(fullgraph=True)"]["ms"] > 0
    compiled_pcgrad = rows["mtlgrad PCGrad loop, torch.compile(fullgraph=True)"]
    assert compiled_pcgrad["ms"] is None and "torch.Generator" in compiled_pcgrad["status"]
    assert rows["mtlgrad PCGrad loop"]["aggregation_share"] > 0
    libmtl = rows["LibMTL PCGrad"]
    assert libmtl["status"] == "LibMTL not installed" and libmtl["ms"] is None
    torchjd_row = rows["TorchJD PCGrad (mtl_backward + jac_to_grad)"]
    assert (torchjd_row["ms"] is not None) is torchjd

    # What each distributed mode sends, counted (T=3 tasks, 2 ranks): a ring all-reduce of the
    # T x P task gradients sends T x P per rank; sharded, (T + 1) / 2 x P; features, about P;
    # the gram engine, T x P in per-layer pieces, then P for the update.
    distributed = json.loads(next(tmp_path.glob("bench-distributed-*.json")).read_text())
    modes = {r["mode"]: r for r in distributed["tables"][0]["rows"]}
    assert sorted(modes) == ["features", "gram", "naive", "replicated", "sharded", "sharded_owned"]
    assert modes["naive"]["x_naive"] == 1.0
    for mode in ("naive", "replicated"):
        assert 1.0 <= modes[mode]["ring_over_tp"] < 1.1, mode
    assert modes["sharded"]["ring_over_tp"] == pytest.approx(4 / 6, abs=0.05)
    assert modes["features"]["ring_over_tp"] == pytest.approx(1 / 3, abs=0.05)
    assert modes["gram"]["ring_over_tp"] == pytest.approx(4 / 3, abs=0.05)
    assert modes["sharded_owned"]["ring_over_tp"] == pytest.approx(1 / 2, abs=0.05)
    assert "all_gather_into_tensor" not in modes["sharded_owned"]["collectives"]
    assert "all_gather_into_tensor x1" in modes["sharded"]["collectives"]
    assert "reduce_scatter_tensor x1" in modes["sharded"]["collectives"]
    naive_calls = int(modes["naive"]["collectives"].split("all_reduce x")[1].split(",")[0])
    assert naive_calls >= 3  # one per task at least

    engines = step["tables"][1]
    assert engines["name"] == "engines"
    by_case: dict[str, dict[str, dict]] = {}
    for row in engines["rows"]:
        by_case.setdefault(row["case"], {})[row["engine"]] = row
    assert sorted(by_case) == ["cnn", "mlp", "transformer"]
    for case, rows in by_case.items():
        assert rows["summed loss"]["x_summed"] == 1.0 and rows["summed loss"]["extra_mib"] == 0
        gram, loop = rows["mtlgrad GramEngine"], rows["mtlgrad loop engine"]
        assert gram["ms"] > 0 and loop["x_loop"] == 1.0, case
        assert gram["x_loop"] == pytest.approx(gram["ms"] / loop["ms"])
        assert gram["extra_tp"] is not None, case
        for peer in ("TorchJD autogram", "TorchJD autojac"):
            assert (rows[peer]["ms"] is not None) is torchjd, (case, peer)
            if not torchjd:
                assert rows[peer]["status"] == "TorchJD not installed"
        if torchjd:
            assert rows["TorchJD autogram"]["x_autogram"] == 1.0
            assert gram["x_autogram"] == pytest.approx(gram["ms"] / rows["TorchJD autogram"]["ms"])


def test_progress_bar_only_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import mtlgrad.bench

    monkeypatch.setattr(mtlgrad.bench, "_interactive", lambda: True)
    assert bench(["kernels", "--size", "tiny", "--out", str(tmp_path)], monkeypatch) == 0
    assert "run" in capsys.readouterr().err  # tqdm's bar, counting runs
    monkeypatch.setattr(mtlgrad.bench, "_interactive", lambda: False)
    assert bench(["kernels", "--size", "tiny", "--out", str(tmp_path)], monkeypatch) == 0
    assert capsys.readouterr().err == ""


def test_missing_torchjd_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchjd", None)  # `import torchjd` now fails
    monkeypatch.setitem(sys.modules, "torchjd.aggregation", None)
    assert bench(["aggregators", "--size", "tiny", "--out", str(tmp_path)], monkeypatch) == 0
    result = json.loads(next(tmp_path.glob("bench-aggregators-*.json")).read_text())
    assert result["peers"]["TorchJD"]["installed"] is False
    for table in result["tables"]:
        check_figures(table)
        for row in table["rows"]:
            assert row["peer_ms"] is None and row["peer_over_ours"] is None
            assert row["peer_status"] in ("TorchJD not installed", "no TorchJD version")
    markdown = next(tmp_path.glob("bench-aggregators-*.md")).read_text()
    assert "TorchJD: not installed" in markdown
    assert "| UPGrad |" in markdown and "TorchJD not installed |" in markdown


def test_cuda_without_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench(["kernels", "--device", "cuda", "--out", str(tmp_path)], monkeypatch) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bad_arguments(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(SystemExit):
        bench(["everything"], monkeypatch)
    assert "invalid choice: 'everything'" in capsys.readouterr().err
    assert bench(["kernels", "--repeat", "0"], monkeypatch) == 2
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err


def test_a_peer_that_cannot_be_imported_is_told_apart_from_a_missing_one(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "LibMTL.weighting":
            raise ModuleNotFoundError(
                "No module named 'torchvision.models.utils'", name="torchvision.models.utils"
            )
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_peers.importlib, "import_module", fake_import)
    note = _peers.detect()["LibMTL"]["note"]
    assert note.startswith("installed but cannot be imported (ModuleNotFoundError:"), note
    assert "torchvision.models.utils" in note


def test_engine_cases_are_checked() -> None:
    from mtlgrad.bench._step import StepConfig

    with pytest.raises(ValueError, match="'gpt:8'.*among \\['mlp', 'cnn', 'transformer'\\]"):
        StepConfig(engine_cases=["gpt:8"]).validate()
    with pytest.raises(ValueError, match="'mlp'"):
        StepConfig(engine_cases=["mlp"]).validate()
    with pytest.raises(ValueError, match="engine_size"):
        StepConfig(engine_size="huge").validate()


def test_step_peak_counts_what_the_step_holds_not_what_came_before() -> None:
    from mtlgrad.bench._step import step_peak_mib

    kept = torch.ones(32 << 18)  # 32 MiB in use before the step: not the step's
    cpu = torch.device("cpu")

    def holds_64_mib(i: int) -> None:
        x = torch.ones(64 << 18)
        del x

    assert 60 < step_peak_mib(cpu, holds_64_mib) < 80
    assert step_peak_mib(cpu, lambda i: None) < 8
    assert kept.sum() > 0


def test_the_gram_engine_profile_script_runs() -> None:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_gram_engine.py"
    result = subprocess.run(
        [sys.executable, str(script), "--size", "tiny", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("summed", "loop", "gram", "heads", "backward", "layer", "write", "the rest"):
        assert line in result.stdout, result.stdout
