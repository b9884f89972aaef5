"""The step's stages: one graph walk, the partition, names, frozen and misplaced parameters,
the GradScaler in the aggregation, accumulation into .grad in one pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from training_helpers import TwoHeadNet, batch, task_losses

import mtlgrad
from mtlgrad.aggregators import MGDA, GradDrop, GradVac, NashMTL, PCGrad, Sum, UPGrad
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import _differentiate


def count_walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    walk = _differentiate._leaf_reach

    def counting(*args, **kwargs):
        calls[0] += 1
        return walk(*args, **kwargs)

    monkeypatch.setattr(_differentiate, "_leaf_reach", counting)
    return calls


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_the_graph_is_walked_once_per_step(monkeypatch, engine) -> None:
    calls = count_walks(monkeypatch)
    model = TwoHeadNet()
    x, y = batch(0)
    mtlgrad.backward(
        task_losses(model(x)[1], y),
        shared_params=model.trunk.parameters(),
        aggregator=UPGrad(),
        engine=engine,
    )
    assert calls[0] == 1
    optimizer = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), engine=engine)
    optimizer.backward(task_losses(model(x)[1], y))  # shared parameters found in the graph
    assert calls[0] == 2


def test_given_partition_needs_no_walk(monkeypatch) -> None:
    calls = count_walks(monkeypatch)
    model = TwoHeadNet()
    x, y = batch(0)
    mtlgrad.backward(
        task_losses(model(x)[1], y),
        shared_params=model.trunk.parameters(),
        task_params=[list(h.parameters()) for h in model.heads],
        aggregator=UPGrad(),
    )
    assert calls[0] == 0


def test_partition_from_one_walk() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Parameter(torch.randn(3))
    neck = torch.nn.Parameter(torch.randn(3))  # used by tasks 0 and 1 only
    heads = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    frozen = torch.randn(3)  # requires no grad: never found
    z = trunk.tanh()
    losses = [
        (z * neck * heads[0]).sum(),
        (z * neck * heads[1] * frozen).sum(),
        (z * heads[2]).sum() + heads[2].sum(),
    ]
    found = _differentiate.partition(losses, shared=None, candidates=[trunk, neck, *heads])
    assert found.shared == [trunk, neck]
    assert [[id(p) for p in h] for h in found.heads] == [[id(h)] for h in heads]
    assert found.reach == [[0, 1, 2], [0, 1]]
    # With features, the heads are what the losses reach above them; the trunk is not visited.
    given = _differentiate.partition(losses, shared=[trunk], features=[z])
    assert [{id(p) for p in h} for h in given.heads] == [
        {id(neck), id(heads[0])},
        {id(neck), id(heads[1])},
        {id(heads[2])},
    ]


def test_frozen_shared_parameters_are_skipped() -> None:
    model, reference = TwoHeadNet(), TwoHeadNet()
    for m in (model, reference):
        m.trunk[0].weight.requires_grad_(False)
    x, y = batch(1)
    mtlgrad.backward(
        task_losses(model(x)[1], y), shared_params=model.trunk.parameters(), aggregator=Sum()
    )
    sum(task_losses(reference(x)[1], y)).backward()
    assert model.trunk[0].weight.grad is None
    for p, q in zip(reference.parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad)


def test_heads_passed_as_shared_are_warned_about_by_name() -> None:
    model = TwoHeadNet()
    x, y = batch(2)
    losses = dict(zip(["depth", "normals", "seg"], task_losses(model(x)[1], y)))
    with pytest.warns(UserWarning, match=r"reached by the loss of 'depth' only.*a head"):
        mtlgrad.backward(losses, shared_params=model.parameters(), aggregator=Sum())


def test_no_warning_for_a_proper_partition() -> None:
    model = TwoHeadNet()
    x, y = batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtlgrad.backward(
            task_losses(model(x)[1], y), shared_params=model.trunk.parameters(), aggregator=Sum()
        )


def test_a_1d_tensor_of_losses() -> None:
    a, b = TwoHeadNet(), TwoHeadNet()
    x, y = batch(3)
    mtlgrad.backward(
        torch.stack(task_losses(a(x)[1], y)), shared_params=a.trunk.parameters(), aggregator=MGDA()
    )
    mtlgrad.backward(task_losses(b(x)[1], y), shared_params=b.trunk.parameters(), aggregator=MGDA())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="got a scalar tensor"):
        scalar = torch.zeros((), requires_grad=True)
        mtlgrad.backward(scalar, shared_params=a.trunk.parameters(), aggregator=Sum())


def test_a_2d_tensor_of_losses_makes_each_entry_a_task() -> None:
    a, b = TwoHeadNet(), TwoHeadNet()
    b.load_state_dict(a.state_dict())
    x, y = batch(4)
    grid = torch.stack(task_losses(a(x)[1], y)[:2]).reshape(1, 2).expand(2, 2) * torch.tensor(
        [[1.0, 2.0], [3.0, 4.0]]
    )
    record = mtlgrad.backward(grid, shared_params=a.trunk.parameters(), aggregator=Sum())
    assert record.names == ["losses[0, 0]", "losses[0, 1]", "losses[1, 0]", "losses[1, 1]"]
    flat = list(torch.stack(task_losses(b(x)[1], y)[:2]).reshape(1, 2).expand(2, 2).reshape(-1))
    flat = [loss * k for loss, k in zip(flat, (1.0, 2.0, 3.0, 4.0))]
    mtlgrad.backward(flat, shared_params=b.trunk.parameters(), aggregator=Sum())
    for p, q in zip(a.trunk.parameters(), b.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize(
    "make",
    [lambda: GradVac(beta=0.3), lambda: NashMTL(update_weights_every=2)],
    ids=["GradVac", "NashMTL"],
)
def test_stateful_aggregators_follow_the_task_names_when_the_dict_order_changes(make) -> None:
    names = ["a", "b", "c"]
    orders = [names, ["c", "a", "b"], ["b", "c", "a"], names]
    results = []
    for rotate in (False, True):
        torch.manual_seed(0)
        model = TwoHeadNet()
        agg = make()
        if hasattr(agg, "generator") and agg.generator is not None:
            agg.generator.manual_seed(3)
        optimizer = MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05),
            agg,
            shared_params=model.trunk.parameters(),
        )
        weights = []
        for step, order in enumerate(orders):
            x, y = batch(10 + step)
            losses = dict(zip(names, task_losses(model(x)[1], y)))
            if rotate:
                losses = {n: losses[n] for n in order}
            optimizer.zero_grad()
            record = optimizer.backward(losses)
            optimizer.step()
            weights.append(dict(zip(record.names, record.weights.tolist())))
        results.append(([p.detach().clone() for p in model.parameters()], weights))
    (params_a, weights_a), (params_b, weights_b) = results
    for wa, wb in zip(weights_a, weights_b):
        for n in names:
            # G's entries are summed in another order when the tasks come in another order.
            assert wa[n] == pytest.approx(wb[n], rel=1e-6, abs=1e-9)
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_stateful_aggregator_refuses_other_tasks() -> None:
    agg = GradVac()
    p = torch.nn.Parameter(torch.randn(4))
    mtlgrad.backward({"a": p.sum(), "b": (p**2).sum()}, shared_params=[p], aggregator=agg)
    with pytest.raises(ValueError, match=r"keeps per-task state for the tasks \['a', 'b'\]"):
        mtlgrad.backward({"a": p.sum(), "z": (p**2).sum()}, shared_params=[p], aggregator=agg)
    agg.reset()
    mtlgrad.backward({"a": p.sum(), "z": (p**2).sum()}, shared_params=[p], aggregator=agg)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_nonfinite_gradient_is_blamed_on_its_own_task(engine) -> None:
    model = TwoHeadNet()
    x, y = batch(4)
    outputs = model(x)[1]
    losses = {
        "reg1": outputs[0].pow(2).mean(),
        "reg2": (outputs[1] * float("inf")).mean(),
        "reg3": outputs[2].pow(2).mean(),
    }
    with pytest.raises(mtlgrad.NonFiniteGradientError) as caught:
        mtlgrad.backward(
            losses, shared_params=model.trunk.parameters(), aggregator=UPGrad(), engine=engine
        )
    assert caught.value.tasks == [1]
    assert "reg2" in str(caught.value)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_accumulation_adds_into_grad() -> None:
    model, reference = TwoHeadNet(), TwoHeadNet()
    agg = PCGrad(generator=torch.Generator().manual_seed(0))
    reference_agg = PCGrad(generator=torch.Generator().manual_seed(0))
    expected = [torch.zeros_like(p) for p in reference.trunk.parameters()]
    for micro in range(2):
        x, y = batch(20 + micro)
        mtlgrad.backward(
            task_losses(model(x)[1], y), shared_params=model.trunk.parameters(), aggregator=agg
        )
        mtlgrad.backward(
            task_losses(reference(x)[1], y),
            shared_params=reference.trunk.parameters(),
            aggregator=reference_agg,
        )
        for e, p in zip(expected, reference.trunk.parameters()):
            e += p.grad
            p.grad = None
    for e, p in zip(expected, model.trunk.parameters()):
        torch.testing.assert_close(p.grad, e)


def test_the_update_is_added_into_the_existing_grad_tensor() -> None:
    model = TwoHeadNet()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.grad for p in model.trunk.parameters()]
    x, y = batch(5)
    mtlgrad.backward(
        task_losses(model(x)[1], y), shared_params=model.trunk.parameters(), aggregator=UPGrad()
    )
    assert all(p.grad is b for p, b in zip(model.trunk.parameters(), before))


def test_grad_scaler_overflow_with_an_elementwise_method_skips_the_step() -> None:
    model = TwoHeadNet(tasks=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = batch(6, tasks=2)
    outputs = model(x)[1]
    losses = [outputs[0].pow(2).mean() * 1e36, outputs[1].pow(2).mean()]
    record = mtlgrad.backward(
        losses,
        shared_params=model.trunk.parameters(),
        aggregator=GradDrop(generator=torch.Generator().manual_seed(0)),
        scaler=scaler,
    )
    assert record.skipped
    assert all(torch.isnan(p.grad).all() for p in model.trunk.parameters())


def test_grad_scaler_gives_the_unscaled_weights_and_a_scaled_grad() -> None:
    a, b = TwoHeadNet(), TwoHeadNet()
    x, y = batch(7)
    plain = mtlgrad.backward(
        task_losses(a(x)[1], y), shared_params=a.trunk.parameters(), aggregator=MGDA()
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = mtlgrad.backward(
        task_losses(b(x)[1], y),
        shared_params=b.trunk.parameters(),
        aggregator=MGDA(),
        scaler=scaler,
    )
    torch.testing.assert_close(scaled.weights, plain.weights)
    torch.testing.assert_close(scaled.gram, plain.gram)
    for p, q in zip(a.trunk.parameters(), b.trunk.parameters()):
        torch.testing.assert_close(q.grad, p.grad * 2.0**10)


def test_record_statistics_are_computed_once_on_the_host() -> None:
    model = TwoHeadNet()
    x, y = batch(8)
    record = mtlgrad.backward(
        task_losses(model(x)[1], y), shared_params=model.trunk.parameters(), aggregator=UPGrad()
    )
    assert record.gram.device.type == "cpu" and record.weights.device.type == "cpu"
    assert record.cosines is record.cosines
    G = record.gram
    expected = G / torch.outer(G.diagonal().sqrt(), G.diagonal().sqrt())
    torch.testing.assert_close(record.cosines, expected)
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert record.conflicts == sum(float(G[i, j] < 0) for i, j in pairs) / 3


def test_a_bf16_trunk_with_fp32_norm_layers() -> None:
    # The usual mixed-precision model: gradients of different dtypes in one step.
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 16).to(torch.bfloat16)
    norm = torch.nn.LayerNorm(16)
    heads = [torch.nn.Linear(16, 1) for _ in range(3)]
    x, y = batch(9)

    def losses():
        z = norm(linear(x.to(torch.bfloat16)).float())
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() * (t + 1) for t, h in enumerate(heads)]

    shared = list(linear.parameters()) + list(norm.parameters())
    rows = []
    for loss in losses():
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([g.double().reshape(-1) for g in grads]))
    J = torch.stack(rows)
    expected = UPGrad()(J)
    mtlgrad.backward(losses(), shared_params=shared, aggregator=UPGrad())
    assert linear.weight.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    got = torch.cat([p.grad.double().reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
