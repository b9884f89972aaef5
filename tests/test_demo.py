"""``mtlgrad demo``: the command end to end (quick mode), the toy problem's functions against
their published definitions, and Δm against hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlgrad.cli import main
from mtlgrad.demo import DEFAULT_METHODS, DEFAULT_TOY_METHODS
from mtlgrad.demo._methods import (
    CONSTANT_WEIGHTS,
    GRADNORM_LR,
    METHODS,
    Method,
    resolve_methods,
)
from mtlgrad.demo._metrics import delta_m
from mtlgrad.demo._problem import REGRESSION_TASKS, DemoModel, make_problem, task_loss
from mtlgrad.demo._toy import STARTS, run_toy, toy_jacobian, toy_losses
from mtlgrad.demo._train import TrainConfig, _batches, epoch_length, train
from mtlgrad.weighting import DWA, FAMO, STCH, GradNorm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_outputs(folder: Path, stem: str) -> None:
    for suffix in ("png", "md", "json"):
        path = folder / f"{stem}.{suffix}"
        assert path.is_file(), f"{path} was not written"
        assert path.stat().st_size > 0, f"{path} is empty"
    assert (folder / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC


def markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# ---- the command, end to end ----------------------------------------------------------------


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    check_outputs(tmp_path, "demo")
    labels = [METHODS[key].label for key in DEFAULT_METHODS]
    rows = markdown_rows(tmp_path / "demo.md")
    assert [row[0] for row in rows] == labels
    printed = capsys.readouterr().out
    for label in labels:
        assert f"\n{label} " in printed
    assert "lower is better" in printed

    report = json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))
    methods = {row["method"]: row for row in report["methods"]}
    assert list(methods) == labels
    assert methods["Sum"]["delta_m_percent"] == 0.0
    loss_based = {METHODS[key].label for key in DEFAULT_METHODS if METHODS[key].loss_based}
    assert loss_based == {"UW", "GradNorm", "DWA", "FAMO"}
    tasks = report["tasks"]
    for label, row in methods.items():
        assert len(row["test_metrics"]) == len(tasks)
        assert all(math.isfinite(v) for v in row["test_metrics"])
        if label in loss_based:
            assert row["conflicts"] is None
        else:
            assert 0.0 <= row["conflicts"] <= 1.0
        # Δm in the file agrees with the metrics in the file.
        expected = delta_m(
            row["test_metrics"],
            methods["Sum"]["test_metrics"],
            [t["kind"] == "regression" for t in tasks],
        )
        assert row["delta_m_percent"] == pytest.approx(expected)


def test_demo_subset_adds_the_baseline(tmp_path, capsys):
    argv = ["demo", "--quick", "--steps", "5", "--methods", "Nash-MTL,uw", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert [row[0] for row in markdown_rows(tmp_path / "demo.md")] == ["Sum", "Nash-MTL", "UW"]
    assert "baseline" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["gradnorm", "dwa", "famo", "gls", "stch"])
def test_loss_weighting_quick(key, tmp_path, capsys):
    assert main(["demo", "--quick", "--methods", key, "--out", str(tmp_path)]) == 0
    check_outputs(tmp_path, "demo")
    label = METHODS[key].label
    rows = markdown_rows(tmp_path / "demo.md")
    assert [row[0] for row in rows] == ["Sum", label]
    assert rows[1][-1] == "-"  # no task gradients aggregated: no conflicts
    assert f"\n{label} " in capsys.readouterr().out
    report = json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))
    row = report["methods"][1]
    assert row["method"] == label and row["conflicts"] is None
    values = row["test_metrics"] + row["test_losses"] + row["final_weights"]
    assert len(row["final_weights"]) == len(report["tasks"])
    assert all(math.isfinite(v) for v in values + [row["delta_m_percent"], row["ms_per_step"]])
    assert row["ms_per_step"] > 0


def built(key: str) -> tuple[Method, list]:
    """The method, with its weighting kept once built (to read its state after training)."""
    made: list = []

    def make_weighting(model, tasks, seed):
        made.append(METHODS[key].make_weighting(model, tasks, seed))
        return made[-1]

    return dataclasses.replace(METHODS[key], make_weighting=make_weighting), made


@pytest.fixture(scope="module")
def problem_and_init():
    problem = make_problem(0)
    torch.manual_seed(0)
    return problem, DemoModel(problem).state_dict()


def test_famo_updates_after_every_step(problem_and_init):
    problem, init = problem_and_init
    method, made = built("famo")
    result = train(method, problem, init, TrainConfig(steps=20, evaluations=2))
    famo = made[0]
    assert isinstance(famo, FAMO)
    assert int(famo.num_updates) == 20  # update called once per step
    assert famo.logits.abs().min() > 0  # moved away from the initial zeros
    assert result.weights is not None and sum(result.weights) == pytest.approx(1.0, rel=1e-5)


def test_famo_update_sees_the_same_batch_after_the_step(problem_and_init):
    # One step by hand: FAMO's logits after the loop's step equal those from the losses of the
    # first batch before and after that step.
    problem, init = problem_and_init
    method, made = built("famo")
    config = TrainConfig(steps=1, evaluations=1)
    train(method, problem, init, config)

    model = DemoModel(problem)
    model.load_state_dict(init)
    index = next(_batches(problem.train_inputs.shape[0], config.batch_size, config.seed))

    def losses() -> list[torch.Tensor]:
        predictions = model(problem.train_inputs[index])
        return [
            task_loss(task, p, y[index])
            for task, p, y in zip(problem.tasks, predictions, problem.train_targets)
        ]

    famo = FAMO(len(problem.tasks))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    famo(losses()).backward()
    optimizer.step()
    with torch.no_grad():
        famo.update(losses())
    torch.testing.assert_close(made[0].logits, famo.logits, rtol=0, atol=0)


def test_dwa_ends_an_epoch_every_pass_over_the_training_set(problem_and_init):
    problem, init = problem_and_init
    per_epoch = epoch_length(problem.train_inputs.shape[0], 128)
    assert per_epoch == 2048 // 128
    method, made = built("dwa")
    steps = 2 * per_epoch + 5
    result = train(method, problem, init, TrainConfig(steps=steps, evaluations=2))
    dwa = made[0]
    assert isinstance(dwa, DWA)
    assert int(dwa.num_epochs) == 2 and int(dwa.num_steps) == 5
    # From the third epoch on, the weights are DWA's softmax of the loss ratios: not all 1, sum T.
    weights = dwa.epoch_weights
    assert (weights - 1).abs().max() > 1e-4
    assert float(weights.sum()) == pytest.approx(len(problem.tasks))
    np.testing.assert_allclose(result.weights, weights.numpy(), rtol=1e-6)


def test_stch_records_its_reference_after_the_warm_up(problem_and_init):
    problem, init = problem_and_init
    per_epoch = epoch_length(problem.train_inputs.shape[0], 128)
    made: list[STCH] = []
    seen: list[torch.Tensor] = []

    def make_weighting(model, tasks, seed):
        made.append(METHODS["stch"].make_weighting(model, tasks, seed))
        made[-1].register_forward_hook(
            lambda module, args, out: seen.append(torch.stack(list(args[0].values())).detach())
        )
        return made[-1]

    method = dataclasses.replace(METHODS["stch"], make_weighting=make_weighting)
    # Epochs 0-3: warm-up, epoch 4: the reference epoch, then three steps of STCH proper.
    steps = 5 * per_epoch + 3
    result = train(method, problem, init, TrainConfig(steps=steps, evaluations=2))
    stch = made[0]
    assert isinstance(stch, STCH) and stch.warmup_epochs == 4 and stch.mu == 1.0
    assert int(stch.num_epochs) == 5 and int(stch.num_steps) == 0
    reference = stch.reference_losses
    torch.testing.assert_close(
        reference, torch.stack(seen[4 * per_epoch : 5 * per_epoch]).double().mean(0)
    )
    # The last step's weights are STCH's, T softmax(log(L / r)) / L, not the warm-up's 1 / L.
    losses = seen[-1].double()
    T = len(problem.tasks)
    expected = T * torch.softmax((losses / reference).log(), 0) / losses
    np.testing.assert_allclose(result.weights, expected.numpy(), rtol=1e-5)
    assert (expected * losses - 1).abs().max() > 0.01


def test_constant_quick(tmp_path):
    inverse_scales = [1 / sigma**2 for _, sigma, _ in REGRESSION_TASKS] + [1.0]
    assert inverse_scales == pytest.approx(list(CONSTANT_WEIGHTS), rel=1e-15)
    assert len(CONSTANT_WEIGHTS) == len(make_problem(0).tasks)
    assert main(["demo", "--quick", "--methods", "constant", "--out", str(tmp_path)]) == 0
    rows = markdown_rows(tmp_path / "demo.md")
    assert [row[0] for row in rows] == ["Sum", "Constant"]
    report = json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))
    assert report["methods"][1]["final_weights"] == pytest.approx(CONSTANT_WEIGHTS)
    assert 0.0 <= report["methods"][1]["conflicts"] <= 1.0


def test_gradnorm_weights_train_at_their_own_rate(problem_and_init):
    problem, init = problem_and_init
    method, made = built("gradnorm")
    steps = 30
    result = train(method, problem, init, TrainConfig(steps=steps, evaluations=2))
    gradnorm = made[0]
    assert isinstance(gradnorm, GradNorm) and gradnorm.alpha == 1.5
    assert gradnorm.shared_params[0].shape == (64, 64)  # the trunk's last layer
    # Adam moves a weight by about lr per step at most, and the renormalisation to sum T rescales
    # them by little: at the model's 1e-3 the weights stay within about 2 x 30 x 1e-3 = 0.06 of 1
    # (0.047 measured); GradNorm's own rate moves one of them by far more.
    moved = max(abs(w - 1) for w in result.weights)
    assert 0.3 < moved <= 2 * steps * GRADNORM_LR
    assert sum(result.weights) == pytest.approx(len(problem.tasks), rel=1e-5)


def test_method_needs_exactly_one_factory():
    with pytest.raises(ValueError, match="exactly one of make"):
        Method("x", "X")
    with pytest.raises(ValueError, match="exactly one of make"):
        Method("x", "X", make=METHODS["sum"].make, make_weighting=METHODS["uw"].make_weighting)


def test_training_is_deterministic():
    # Same seed: same data, initialisation, batches and random draws (PCGrad's order).
    problem = make_problem(1)
    torch.manual_seed(1)
    init = DemoModel(problem).state_dict()
    config = TrainConfig(steps=6, evaluations=2, seed=1)
    for key in ("sum", "pcgrad", "uw", "gradnorm", "famo"):
        a = train(METHODS[key], problem, init, config)
        b = train(METHODS[key], problem, init, config)
        assert a.metrics == b.metrics and a.curves == b.curves and a.weights == b.weights
        assert a.eval_steps == [3, 6]
        if METHODS[key].loss_based:
            assert a.cosines is None and a.conflicts is None
        else:
            assert len(a.cosines) == 2 and a.cosines[0].shape == (5, 5)
            torch.testing.assert_close(a.cosines[0].diagonal(), torch.ones(5, dtype=torch.float64))


def test_toy_quick(tmp_path, capsys):
    assert main(["demo", "toy", "--quick", "--steps", "60", "--out", str(tmp_path)]) == 0
    check_outputs(tmp_path, "toy")
    labels = [METHODS[key].label for key in DEFAULT_TOY_METHODS]
    rows = markdown_rows(tmp_path / "toy.md")
    assert len(rows) == len(labels) * len(STARTS)
    assert [row[0] for row in rows if row[0]] == labels
    report = json.loads((tmp_path / "toy.json").read_text(encoding="utf-8"))
    for row in report["methods"]:
        assert row["starts"] == [list(s) for s in STARTS]
        np.testing.assert_allclose(row["final_losses"], toy_losses(np.array(row["final"])))
    printed = capsys.readouterr().out
    assert "(-8.5, 7.5)" in printed and "(9, -1)" in printed


def test_module_subprocess(tmp_path):
    out = tmp_path / "tmp"
    completed = subprocess.run(
        [sys.executable, "-m", "mtlgrad", "demo", "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    check_outputs(out, "demo")
    assert len(markdown_rows(out / "demo.md")) == len(DEFAULT_METHODS)


def test_parser_imports_no_plotting():
    # `mtlgrad` builds every subcommand's parser: matplotlib and tqdm wait for `run` (torch
    # itself may import tqdm).
    code = (
        "import sys, torch; before = 'tqdm' in sys.modules; "
        "from mtlgrad.cli import build_parser; build_parser(); "
        "print('matplotlib' in sys.modules, ('tqdm' in sys.modules) != before)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["False", "False"]


def test_missing_cli_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "mtlgrad\[cli\]"'):
        main(["demo", "--quick", "--out", str(tmp_path)])


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_method(tmp_path, capsys):
    assert main(["demo", "--methods", "sum,sgd,pcgard", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown methods 'sgd', 'pcgard'" in err
    assert "choose from sum, mean, pcgrad" in err
    assert not (tmp_path / "x").exists()


def test_toy_refuses_loss_weighting(tmp_path, capsys):
    assert main(["demo", "toy", "--methods", "mgda,uw,famo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown methods 'uw', 'famo'" in err and "loss weighting" in err


def test_toy_refuses_constant(tmp_path, capsys):
    # Its weights are set for the multi-task problem's five tasks; the toy has two.
    assert main(["demo", "toy", "--methods", "constant", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'constant'" in err
    assert "constant, krum, trimmedmean: set for the multi-task problem's five tasks" in err


def test_scale_is_for_the_toy(tmp_path, capsys):
    assert main(["demo", "--scale", "1", "--out", str(tmp_path)]) == 2
    assert "--scale applies to the toy problem only" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-3", "many"])
def test_bad_steps(steps, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", steps])
    assert "--steps: expected a positive integer" in capsys.readouterr().err


def test_method_names():
    allowed = list(METHODS)
    methods = resolve_methods(["Nash-MTL", "IMTL_G", "uncertainty", "nashmtl"], allowed)
    assert [m.key for m in methods] == ["nashmtl", "imtlg", "uw"]
    with pytest.raises(ValueError, match="no method given"):
        resolve_methods([], allowed)


# ---- Δm ---------------------------------------------------------------------------------------


def test_delta_m_hand_computed():
    # Task 1 (error) improves by 50 %, task 2 (error) worsens by 25 %, the accuracy drops from
    # 100 to 80, i.e. by 20 %: the mean drop is (-50 + 25 + 20) / 3 = -5/3 %.
    value = delta_m([0.5, 2.0, 80.0], [1.0, 1.6, 100.0], [True, True, False])
    assert value == pytest.approx(-5.0 / 3.0)
    # Higher accuracy is a negative drop.
    assert delta_m([90.0], [60.0], [False]) == pytest.approx(-50.0)
    assert delta_m([0.3, 70.0], [0.3, 70.0], [True, False]) == 0.0


def test_delta_m_errors():
    with pytest.raises(ValueError, match="one metric, one baseline value and one direction"):
        delta_m([1.0, 2.0], [1.0], [True, True])
    with pytest.raises(ValueError, match="task 1 is 0"):
        delta_m([1.0, 2.0], [1.0, 0.0], [True, True])


# ---- the problems -----------------------------------------------------------------------------


def test_problem_is_seeded_and_scaled():
    a, b = make_problem(3), make_problem(3)
    torch.testing.assert_close(a.train_inputs, b.train_inputs)
    for ya, yb in zip(a.test_targets, b.test_targets):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert not torch.equal(make_problem(4).train_inputs, a.train_inputs)
    regression = [(t, y) for t, y in zip(a.tasks, a.train_targets) if t.kind == "regression"]
    for task, y in regression:
        # y = σ (tanh(·) + noise · N(0, 1)): its spread is of the order of σ.
        assert 0.3 * task.scale < float(y.std()) < 1.5 * task.scale
    scales = [t.scale for t, _ in regression]
    assert max(scales) / min(scales) >= 100
    labels = a.train_targets[-1]
    assert a.tasks[-1].kind == "classification"
    assert set(labels.tolist()) == set(range(a.tasks[-1].outputs))


LOWER = 0.000005


def published_toy(x1: float, x2: float, scale: float) -> tuple[float, float]:
    """CAGrad's toy objectives as published (``toy.py`` of the official code), in plain math."""
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), LOWER)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), LOWER)) + 6
    c1 = max(math.tanh(x2 * 0.5), 0.0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(math.tanh(-x2 * 0.5), 0.0)
    return scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2


SAMPLE_POINTS = [
    *STARTS,
    (1.0, 2.0),
    (3.0, -4.0),
    (-2.5, 6.0),
    (7.0, -8.3552),
    (-7.0, -8.3552),
    (2 * math.tanh(1.0) - 7, 1.0),  # the first logarithm's argument is 0: clamped at LOWER
]


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_toy_matches_published_functions(scale):
    points = np.array(SAMPLE_POINTS)
    expected = np.array([published_toy(x1, x2, scale) for x1, x2 in SAMPLE_POINTS])
    np.testing.assert_allclose(toy_losses(points, scale), expected, rtol=1e-12, atol=1e-12)


def test_toy_hand_computed():
    # x = (3, -4): tanh(-2) = -0.9640276, so c1 = 0 and c2 = 0.9640276;
    # q1 = ((3 - 7)² + 0.1 · 4²) / 10 - 20 = -18.24 and q2 = (10² + 1.6) / 10 - 20 = -9.84.
    c2 = 0.9640275800758169
    np.testing.assert_allclose(toy_losses(np.array([3.0, -4.0]), 1.0), [-18.24 * c2, -9.84 * c2])
    # x = (1, 2): c1 = tanh(1) = 0.7615942, c2 = 0; the first argument is
    # |-4 + tanh(2)| = 3.0359724, the second |1 - tanh(2) + 2| = 2.0359724.
    c1 = 0.7615941559557649
    expected = [c1 * (math.log(3.0359724199241) + 6), c1 * (math.log(2.0359724199241) + 6)]
    np.testing.assert_allclose(toy_losses(np.array([1.0, 2.0]), 1.0), expected, rtol=1e-12)
    # At the clamp (x2 = 1, x1 = 2 tanh(1) - 7): the gate is tanh(1/2) = 0.4621172 and the
    # logarithm log(5e-6) + 6 = -6.2060...
    x1 = 2 * math.tanh(1.0) - 7
    first = toy_losses(np.array([x1, 1.0]), 1.0)[0]
    assert first == pytest.approx(0.46211715726000974 * (math.log(5e-6) + 6), rel=1e-9)


def test_toy_jacobian_is_autograds():
    def objectives(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
        f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
        c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
        c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
        f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
        f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
        return torch.stack([0.1 * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2], dim=1)

    points = torch.tensor(SAMPLE_POINTS, dtype=torch.float64, requires_grad=True)
    values = objectives(points)
    rows = [torch.autograd.grad(values[:, i].sum(), points, retain_graph=True)[0] for i in (0, 1)]
    expected = torch.stack(rows, dim=1).numpy()
    np.testing.assert_allclose(toy_jacobian(points.detach().numpy(), 0.1), expected, atol=1e-12)


def test_toy_run_shapes_and_start():
    results = run_toy([METHODS["mgda"], METHODS["nashmtl"]], steps=30, record_every=10)
    for result in results:
        assert result.trajectories.shape == (len(STARTS), 4, 2)
        np.testing.assert_array_equal(result.trajectories[:, 0], np.array(STARTS))
        np.testing.assert_array_equal(result.trajectories[:, -1], result.final)
        # Adam moves each coordinate by about lr per step (bounded by (1 - β1) / sqrt(1 - β2)
        # times lr).
        moved = np.abs(result.final - np.array(STARTS))
        assert moved.min() > 0 and moved.max() <= 30 * 1e-3 * 0.1 / math.sqrt(0.001)
    with pytest.raises(ValueError, match="UW is a loss weighting"):
        run_toy([METHODS["uw"]], steps=1)
