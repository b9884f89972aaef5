"""Gradient accumulation that aggregates once (``aggregate=False`` and ``GradientAccumulator``).

The reference is independent of the step: each task's float64 gradient of the summed
micro-batch losses, from ``torch.autograd.grad`` on the whole model, the aggregator applied to
that matrix (``agg(J)``), and the heads' own summed gradients.
"""

from __future__ import annotations

import pytest
import torch
from training_helpers import TwoHeadNet, batch, task_losses

import mtlgrad
from mtlgrad import aggregators
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import GradientAccumulator

MICRO = 3


def micro_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(seed + k, n=8) for k in range(MICRO)]


def losses_of(model: TwoHeadNet, data: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    x, y = data
    _, outputs = model(x.double())
    return [loss / MICRO for loss in task_losses(outputs, y.double())]


def reference(model: TwoHeadNet, aggregator_matrix) -> dict[str, torch.Tensor]:
    """The aggregation of the summed per-task gradients, computed on the matrix J (T x P)."""
    shared = list(model.trunk.parameters())
    rows = []
    heads = {}
    for t in range(3):
        total = [torch.zeros_like(p) for p in shared]
        head = [torch.zeros_like(p) for p in model.heads[t].parameters()]
        for data in micro_batches():
            loss = losses_of(model, data)[t]
            grads = torch.autograd.grad(loss, shared + list(model.heads[t].parameters()))
            total = [a + g for a, g in zip(total, grads[: len(shared)])]
            head = [a + g for a, g in zip(head, grads[len(shared) :])]
        rows.append(torch.cat([g.reshape(-1) for g in total]))
        for (name, _), g in zip(model.heads[t].named_parameters(), head):
            heads[f"heads.{t}.{name}"] = g
    d = aggregator_matrix(torch.stack(rows))
    out, offset = {}, 0
    for name, p in model.trunk.named_parameters():
        out[f"trunk.{name}"] = d[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return {**out, **heads}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


AGGREGATORS = [
    lambda: aggregators.UPGrad(),
    lambda: aggregators.MGDA(),
    lambda: aggregators.IMTLG(),
    lambda: aggregators.PCGrad(generator=torch.Generator().manual_seed(3)),
]


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("make", AGGREGATORS, ids=["upgrad", "mgda", "imtlg", "pcgrad"])
def test_accumulation_aggregates_the_summed_task_gradients(engine, make):
    model = TwoHeadNet().double()
    optimizer = MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        make(),
        shared_params=model.trunk.parameters(),
        engine=engine,
    )
    for k, data in enumerate(micro_batches()):
        record = optimizer.backward(losses_of(model, data), aggregate=k == MICRO - 1)
        if k < MICRO - 1:
            assert record is None
            assert all(p.grad is None for p in model.parameters())  # .grad untouched
            assert len(optimizer.accumulator) == k + 1
    assert len(optimizer.accumulator) == 0
    expected = reference(model, make())
    got = grads_of(model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # The record is that of the aggregation of the sums: its losses are the summed losses.
    summed = torch.zeros(3, dtype=torch.float64)
    for data in micro_batches():
        summed += torch.stack([v.detach() for v in losses_of(model, data)])
    torch.testing.assert_close(optimizer.last_record.losses, summed)


def test_per_micro_batch_aggregation_is_not_the_same_step():
    """What ``aggregate=False`` fixes: aggregating each micro-batch and summing the updates
    gives another update (the test above would fail without accumulation)."""
    model = TwoHeadNet().double()
    upgrad = aggregators.UPGrad()
    for data in micro_batches():
        mtlgrad.backward(
            losses_of(model, data), shared_params=model.trunk.parameters(), aggregator=upgrad
        )
    summed_updates = model.trunk[0].weight.grad.clone()
    expected = reference(model, aggregators.UPGrad())["trunk.0.weight"]
    assert (summed_updates - expected).abs().max() > 1e-4 * expected.abs().max()


def test_accumulating_halves_is_one_step_on_the_whole_batch():
    """Two micro-batches of the mean losses divided by two are the whole batch's step."""
    x, y = batch(7, n=16)
    whole = TwoHeadNet().double()
    _, outputs = whole(x.double())
    mtlgrad.backward(
        task_losses(outputs, y.double()),
        shared_params=whole.trunk.parameters(),
        aggregator=aggregators.MGDA(),
    )
    split = TwoHeadNet().double()
    accumulator = GradientAccumulator()
    for k, rows in enumerate((slice(0, 8), slice(8, 16))):
        _, outputs = split(x[rows].double())
        losses = [loss / 2 for loss in task_losses(outputs, y[rows].double())]
        mtlgrad.backward(
            losses,
            shared_params=split.trunk.parameters(),
            aggregator=aggregators.MGDA(),
            accumulator=accumulator,
            aggregate=k == 1,
        )
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-13, msg=name)


def test_heads_weighted_by_the_final_weights():
    model = TwoHeadNet().double()
    optimizer = MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        aggregators.IMTLG(),
        shared_params=model.trunk.parameters(),
        scale_task_params=True,
    )
    for k, data in enumerate(micro_batches()):
        optimizer.backward(losses_of(model, data), aggregate=k == MICRO - 1)
    weights = optimizer.last_record.weights
    expected = reference(model, aggregators.IMTLG())
    for t in range(3):
        got = model.heads[t].weight.grad
        torch.testing.assert_close(got, weights[t] * expected[f"heads.{t}.weight"])


def test_existing_grad_is_accumulated_into():
    model = TwoHeadNet().double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer = MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        aggregators.UPGrad(),
        shared_params=model.trunk.parameters(),
    )
    for k, data in enumerate(micro_batches()):
        optimizer.backward(losses_of(model, data), aggregate=k == MICRO - 1)
    expected = reference(model, aggregators.UPGrad())
    torch.testing.assert_close(model.trunk[0].weight.grad, 1 + expected["trunk.0.weight"])


def test_step_with_unaggregated_micro_batches_raises_and_zero_grad_drops_them():
    model = TwoHeadNet().double()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        aggregators.UPGrad(),
        shared_params=model.trunk.parameters(),
    )
    optimizer.backward(losses_of(model, micro_batches()[0]), aggregate=False)
    with pytest.raises(RuntimeError, match="1 micro-batch.*never aggregated"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.zero_grad()
    assert len(optimizer.accumulator) == 0
    record = optimizer.backward(losses_of(model, micro_batches()[1]))
    assert record is not None and optimizer.last_record is record
    optimizer.step()


def test_errors_name_what_is_wrong():
    model = TwoHeadNet().double()
    shared = list(model.trunk.parameters())
    data = micro_batches()[0]
    with pytest.raises(ValueError, match="aggregate=False needs accumulator"):
        mtlgrad.backward(
            losses_of(model, data),
            shared_params=shared,
            aggregator=aggregators.UPGrad(),
            aggregate=False,
        )
    with pytest.raises(TypeError, match="accumulator must be"):
        mtlgrad.backward(
            losses_of(model, data),
            shared_params=shared,
            aggregator=aggregators.UPGrad(),
            accumulator=[],
        )
    accumulator = GradientAccumulator()
    z, outputs = model(data[0].double())
    with pytest.raises(ValueError, match="features= cannot accumulate"):
        mtlgrad.backward(
            task_losses(outputs, data[1].double()),
            shared_params=shared,
            aggregator=aggregators.UPGrad(),
            features=z,
            accumulator=accumulator,
            aggregate=False,
        )
    engine = mtlgrad.GramEngine(model.trunk)
    _, outputs = model(data[0].double())
    with pytest.raises(ValueError, match="gram engine cannot accumulate"):
        mtlgrad.backward(
            task_losses(outputs, data[1].double()),
            shared_params=shared,
            aggregator=aggregators.UPGrad(),
            engine=engine,
            accumulator=accumulator,
            aggregate=False,
        )
    engine.remove()
    mtlgrad.backward(
        losses_of(model, data),
        shared_params=shared,
        aggregator=aggregators.UPGrad(),
        accumulator=accumulator,
        aggregate=False,
    )
    losses = losses_of(model, data)
    with pytest.raises(ValueError, match="same tasks, in the same order"):
        mtlgrad.backward(
            {"a": losses[0], "b": losses[1], "c": losses[2]},
            shared_params=shared,
            aggregator=aggregators.UPGrad(),
            accumulator=accumulator,
        )
    with pytest.raises(ValueError, match="shared_params differ"):
        mtlgrad.backward(
            losses_of(model, data),
            shared_params=shared[:2],
            aggregator=aggregators.UPGrad(),
            accumulator=accumulator,
        )
    assert all(p.grad is None for p in model.parameters())
