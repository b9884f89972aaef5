"""MTLOptimizer: the torch.optim surface, schedulers, checkpoints, AMP."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_helpers import TwoHeadNet, batch, task_losses

import mtlgrad
from mtlgrad.aggregators import PCGrad, Sum
from mtlgrad.optim import MTLOptimizer

HERE = Path(__file__).resolve().parent


def train(model, optimizer, scheduler, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(100 + step)
        optimizer.zero_grad()
        _, outputs = model(x)
        optimizer.backward(task_losses(outputs, y))
        optimizer.step()
        scheduler.step()


def test_is_an_optimizer_and_schedulers_accept_it() -> None:
    model = TwoHeadNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = MTLOptimizer(inner, Sum(), shared_params=model.trunk.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups is inner.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, scheduler, 2)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    extra = torch.nn.Parameter(torch.zeros(2))
    optimizer.add_param_group({"params": [extra]})
    assert len(inner.param_groups) == 2
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    ],
    ids=["sgd", "adam-foreach", "adamw-fused"],
)
def test_sum_wrapper_matches_plain_training(make) -> None:
    a, b = TwoHeadNet(), TwoHeadNet()
    plain = make(a.parameters())
    wrapped = MTLOptimizer(make(b.parameters()), Sum(), shared_params=b.trunk.parameters())
    for step in range(3):
        x, y = batch(step)
        plain.zero_grad()
        sum(task_losses(a(x)[1], y)).backward()
        plain.step()
        wrapped.zero_grad()
        wrapped.backward(task_losses(b(x)[1], y))
        wrapped.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_shared_parameters_are_found_when_not_given() -> None:
    model = TwoHeadNet()
    optimizer = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Sum())
    x, y = batch(0)
    optimizer.backward(task_losses(model(x)[1], y))
    assert optimizer._discover_shared(task_losses(model(x)[1], y)) == list(model.trunk.parameters())


def test_state_dict_is_torch_layout_carrying_the_aggregator_and_rejects_foreign_dicts() -> None:
    model = TwoHeadNet()
    agg = PCGrad(generator=torch.Generator().manual_seed(0))
    optimizer = MTLOptimizer(torch.optim.Adam(model.parameters()), agg)
    x, y = batch(0)
    optimizer.backward(task_losses(model(x)[1], y))
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"state", "param_groups"}
    assert set(state["state"]) == set(range(len(list(model.parameters()))))
    assert "exp_avg" in state["state"][0]
    extra = torch.load(io.BytesIO(state["param_groups"][0]["mtlgrad"]), weights_only=True)
    assert "generator" in extra["aggregator"]
    with pytest.raises(ValueError, match="missing"):
        optimizer.load_state_dict(optimizer.optimizer.state_dict())
    # The live param groups are untouched, and loading does not mutate the given dict.
    assert "mtlgrad" not in optimizer.param_groups[0]
    optimizer.load_state_dict(state)
    assert "mtlgrad" not in optimizer.param_groups[0]
    assert "mtlgrad" in state["param_groups"][0]


def test_state_dict_of_the_earlier_layout_still_loads() -> None:
    model = TwoHeadNet()
    optimizer = MTLOptimizer(
        torch.optim.Adam(model.parameters()), PCGrad(generator=torch.Generator().manual_seed(0))
    )
    earlier = {
        "optimizer": optimizer.optimizer.state_dict(),
        "aggregator": {"generator": (torch.Generator().manual_seed(5).get_state())},
    }
    optimizer.load_state_dict(earlier)
    assert torch.equal(
        optimizer.aggregator.generator.get_state(), torch.Generator().manual_seed(5).get_state()
    )


RESUME = """
import sys, torch
sys.path.insert(0, {here!r})
from test_optim import build, train
model, optimizer, scheduler = build({aggregator!r})
checkpoint = torch.load({path!r}, weights_only=False)
model.load_state_dict(checkpoint["model"])
optimizer.load_state_dict(checkpoint["optimizer"])
scheduler.load_state_dict(checkpoint["scheduler"])
train(model, optimizer, scheduler, 4, start=4)
torch.save(model.state_dict(), {out!r})
"""


def build(aggregator: str):
    model = TwoHeadNet()
    agg = {
        "Sum": lambda: Sum(),
        "PCGrad": lambda: PCGrad(generator=torch.Generator().manual_seed(7)),
    }[aggregator]()
    optimizer = MTLOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), agg, shared_params=model.trunk.parameters()
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.7)
    return model, optimizer, scheduler


@pytest.mark.parametrize("aggregator", ["Sum", "PCGrad"])
def test_checkpoint_and_resume_in_a_new_process_is_bit_identical(aggregator, tmp_path) -> None:
    model, optimizer, scheduler = build(aggregator)
    train(model, optimizer, scheduler, 4)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        path,
    )
    train(model, optimizer, scheduler, 4, start=4)
    out = tmp_path / "resumed.pt"
    code = RESUME.format(here=str(HERE), aggregator=aggregator, path=str(path), out=str(out))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    resumed = torch.load(out)
    for name, value in model.state_dict().items():
        assert torch.equal(resumed[name], value), name


def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale() -> None:
    model = TwoHeadNet(tasks=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        Sum(),
        shared_params=model.trunk.parameters(),
        scaler=scaler,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, tasks=2)
    outputs = model(x)[1]
    losses = [outputs[0].pow(2).mean() * 1e36, outputs[1].pow(2).mean()]  # overflows once scaled
    record = optimizer.backward(losses)
    assert record.skipped
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**16
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_grad_scaler_without_overflow_matches_the_unscaled_run() -> None:
    a, b = TwoHeadNet(), TwoHeadNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plain = MTLOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.1),
        PCGrad(torch.Generator().manual_seed(1)),
        shared_params=a.trunk.parameters(),
    )
    scaled = MTLOptimizer(
        torch.optim.SGD(b.parameters(), lr=0.1),
        PCGrad(torch.Generator().manual_seed(1)),
        shared_params=b.trunk.parameters(),
        scaler=scaler,
    )
    x, y = batch(1)
    plain.backward(task_losses(a(x)[1], y))
    plain.step()
    record = scaled.backward(task_losses(b(x)[1], y))
    assert not record.skipped
    scaler.step(scaled)
    scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_backward_function_is_exported() -> None:
    assert mtlgrad.backward is mtlgrad.step.backward


def test_options_are_checked_when_built() -> None:
    model = TwoHeadNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="scalr"):
        MTLOptimizer(inner, PCGrad(), scalr=None)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        MTLOptimizer(inner, PCGrad(), scaler=1024.0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        MTLOptimizer(inner, PCGrad(), engine="batched", batch_size=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        MTLOptimizer(inner, PCGrad(), engine="vmap")
    with pytest.raises(TypeError, match="model must be an mtlgrad.nn.MultiTaskModule"):
        MTLOptimizer(inner, PCGrad(), model=model)


def test_model_partition_without_a_graph_walk(monkeypatch) -> None:
    from mtlgrad.nn import MultiTaskModel
    from mtlgrad.step import _differentiate

    def build():
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        heads = {n: torch.nn.Linear(8, 1) for n in ("depth", "seg")}
        return MultiTaskModel(trunk, heads)

    def losses(model, x, y, order):
        out = model(x)
        values = {n: ((out[n].squeeze(-1) - y[:, i]) ** 2).mean() for i, n in enumerate(out)}
        return {n: values[n] for n in order}

    a, b = build(), build()
    x, y = batch(0, tasks=2)
    by_model = MTLOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), PCGrad(), model=a)
    by_params = MTLOptimizer(
        torch.optim.SGD(b.parameters(), lr=0.1), PCGrad(), shared_params=b.shared_parameters()
    )
    by_params.backward(losses(b, x, y, ["depth", "seg"]))

    def no_walk(*args, **kwargs):
        raise AssertionError("the graph was walked")

    monkeypatch.setattr(_differentiate, "_leaf_reach", no_walk)
    a.zero_grad()
    torch.manual_seed(1)
    record = by_model.backward(losses(a, x, y, ["seg", "depth"]))  # any key order
    assert record.names == ["seg", "depth"]
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="missing \\['seg'\\]"):
        by_model.backward({"depth": losses(a, x, y, ["depth"])["depth"]})


def test_torch_distributed_checkpoint_round_trip(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from mtlgrad.aggregators import GradVac

    def build(seed):
        model = TwoHeadNet(seed=seed)
        optimizer = MTLOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            GradVac(generator=torch.Generator().manual_seed(seed)),
            shared_params=model.trunk.parameters(),
        )
        return model, optimizer

    model, optimizer = build(0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, scheduler, 2)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert "state" in optimizer_state and "param_groups" in optimizer_state
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(tmp_path))
    restored, restored_optimizer = build(1)
    model_state, optimizer_state = get_state_dict(restored, restored_optimizer)
    loaded = {"model": model_state, "optim": optimizer_state}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(
        restored,
        restored_optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
    )
    assert torch.equal(restored_optimizer.aggregator._targets, optimizer.aggregator._targets)
    restored_scheduler = torch.optim.lr_scheduler.StepLR(restored_optimizer, step_size=1, gamma=0.5)
    restored_scheduler.load_state_dict(scheduler.state_dict())
    train(model, optimizer, scheduler, 2, start=2)
    train(restored, restored_optimizer, restored_scheduler, 2, start=2)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
