"""MTLOptimizer: the torch.optim surface, schedulers, checkpoints, AMP."""

from __future__ import annotations

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


def test_state_dict_carries_the_aggregator_and_rejects_foreign_dicts() -> None:
    model = TwoHeadNet()
    agg = PCGrad(generator=torch.Generator().manual_seed(0))
    optimizer = MTLOptimizer(torch.optim.Adam(model.parameters()), agg)
    state = optimizer.state_dict()
    assert set(state) == {"optimizer", "aggregator"}
    assert "generator" in state["aggregator"]
    with pytest.raises(ValueError, match="missing"):
        optimizer.load_state_dict(state["optimizer"])


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
