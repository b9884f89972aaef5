"""mtlgrad.backward: engines, .grad semantics, heads, errors."""

from __future__ import annotations

import pytest
import torch
from training_helpers import (
    NoVmap,
    TwoHeadNet,
    batch,
    gram_aggregator_classes,
    make_aggregator,
    task_losses,
)

import mtlgrad
from mtlgrad.aggregators import Mean, Sum

ENGINES = ["loop", "batched", "features"]


def run(model, x, y, aggregator, engine, **kwargs):
    z, outputs = model(x)
    losses = task_losses(outputs, y)
    mode = "loop" if engine == "features" else engine
    features = z if engine == "features" else None
    return mtlgrad.backward(
        losses,
        shared_params=model.trunk.parameters(),
        aggregator=aggregator,
        engine=mode,
        features=features,
        **kwargs,
    )


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "aggregator,reduce", [(Sum(), sum), (Mean(), lambda ls: sum(ls) / len(ls))]
)
@pytest.mark.parametrize("preexisting", [False, True])
def test_sum_and_mean_match_plain_backward(engine, aggregator, reduce, preexisting) -> None:
    x, y = batch(0)
    reference, model = TwoHeadNet(), TwoHeadNet()
    if preexisting:
        for p, q in zip(reference.parameters(), model.parameters()):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
    _, outputs = reference(x)
    losses = task_losses(outputs, y)
    if aggregator.__class__ is Mean:
        # Mean weights the shared gradient by 1/T; heads get their own task's gradient.
        reduce(losses).backward(inputs=list(reference.trunk.parameters()), retain_graph=True)
        sum(losses).backward(inputs=list(reference.heads.parameters()))
    else:
        reduce(losses).backward()
    run(model, x, y, aggregator, engine)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", gram_aggregator_classes(), ids=lambda c: c.__name__)
def test_loop_and_batched_agree(cls) -> None:
    x, y = batch(1)
    results = []
    for engine in ("loop", "batched"):
        model = TwoHeadNet()
        run(model, x, y, make_aggregator(cls), engine)
        results.append(grads(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", gram_aggregator_classes(), ids=lambda c: c.__name__)
def test_features_level_is_exact_when_the_representation_jacobian_is_identity(cls) -> None:
    torch.manual_seed(2)
    theta = torch.nn.Parameter(torch.randn(12))
    targets = torch.randn(3, 12)

    def losses(z):
        return [((z - targets[t]) ** 2).sum() * (t + 1) + z[t].sin() for t in range(3)]

    mtlgrad.backward(losses(theta * 1), shared_params=[theta], aggregator=make_aggregator(cls))
    expected = theta.grad.clone()
    theta.grad = None
    z = theta * 1  # the representation: Jacobian = identity
    mtlgrad.backward(losses(z), shared_params=[theta], aggregator=make_aggregator(cls), features=z)
    torch.testing.assert_close(theta.grad, expected, rtol=1e-6, atol=1e-7)


def test_record_has_weights_cosines_norms() -> None:
    x, y = batch(2)
    record = run(TwoHeadNet(), x, y, Sum(), "loop")
    assert record.names == ["task 0", "task 1", "task 2"]
    assert torch.equal(record.weights, torch.ones(3, dtype=torch.float64))
    G = record.gram
    torch.testing.assert_close(record.norms, G.diagonal().sqrt())
    torch.testing.assert_close(record.cosines.diagonal(), torch.ones(3, dtype=torch.float64))
    assert 0.0 <= record.conflicts <= 1.0


def test_heads_scaled_by_weights_on_request() -> None:
    x, y = batch(3)
    plain, scaled = TwoHeadNet(), TwoHeadNet()
    run(plain, x, y, Mean(), "loop")
    run(scaled, x, y, Mean(), "loop", scale_task_params=True)
    for p, q in zip(plain.heads.parameters(), scaled.heads.parameters()):
        torch.testing.assert_close(q.grad, p.grad / 3)


def test_dict_losses_name_the_tasks_in_errors_and_grad_is_untouched() -> None:
    model = TwoHeadNet(tasks=2)
    x, y = batch(4, tasks=2)
    z, outputs = model(x)
    losses = {"depth": outputs[0].mean(), "segmentation": (outputs[1] * float("nan")).mean()}
    before = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        p.grad = b.clone()
    with pytest.raises(
        mtlgrad.NonFiniteGradientError, match="task 'segmentation': parameter 'shared_params"
    ):
        mtlgrad.backward(losses, shared_params=model.trunk.parameters(), aggregator=Sum())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)


def test_unused_shared_parameter_keeps_none_and_partial_use_counts_as_zero() -> None:
    used = torch.nn.Parameter(torch.randn(4))
    partly = torch.nn.Parameter(torch.randn(4))
    unused = torch.nn.Parameter(torch.randn(4))
    losses = [(used * partly).sum(), used.pow(2).sum()]
    mtlgrad.backward(losses, shared_params=[used, partly, unused], aggregator=Sum())
    assert unused.grad is None
    torch.testing.assert_close(partly.grad, used.detach())
    torch.testing.assert_close(used.grad, partly.detach() + 2 * used.detach())


def test_errors() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    good = (p**2).sum()
    with pytest.raises(ValueError, match="no losses"):
        mtlgrad.backward([], shared_params=[p], aggregator=Sum())
    with pytest.raises(ValueError, match="the loss of task 0 must be a scalar"):
        mtlgrad.backward([p * 2], shared_params=[p], aggregator=Sum())
    with pytest.raises(ValueError, match="the loss of task 1 does not require grad"):
        mtlgrad.backward([good, torch.tensor(1.0)], shared_params=[p], aggregator=Sum())
    with pytest.raises(ValueError, match="features were given but shared_params is empty"):
        mtlgrad.backward([good], shared_params=[], aggregator=Sum(), features=p * 2)
    with pytest.raises(
        ValueError, match=r"shared_params\[1\] is the same tensor as shared_params\[0\]"
    ):
        mtlgrad.backward([good], shared_params=[p, p], aggregator=Sum())
    with pytest.raises(ValueError, match="must be a leaf tensor"):
        mtlgrad.backward([good], shared_params=[p * 2], aggregator=Sum())
    with pytest.raises(ValueError, match="engine must be one of"):
        mtlgrad.backward([good], shared_params=[p], aggregator=Sum(), engine="vmap")
    with pytest.raises(ValueError, match="is on meta but shared_params"):
        mtlgrad.backward(
            [good],
            shared_params=[p, torch.nn.Parameter(torch.empty(2, device="meta"))],
            aggregator=Sum(),
        )
    assert p.grad is None


def test_constant_loss_warns_and_counts_as_zero() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    head = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="does not depend on the shared parameters"):
        mtlgrad.backward(
            {"main": (p**2).sum(), "constant-in-trunk": head.sum()},
            shared_params=[p],
            aggregator=Sum(),
        )
    torch.testing.assert_close(p.grad, 2 * p.detach())
    torch.testing.assert_close(head.grad, torch.ones(3))


def test_batched_engine_chunks_tasks() -> None:
    x, y = batch(5)
    a, b = TwoHeadNet(), TwoHeadNet()
    run(a, x, y, Sum(), "batched")
    run(b, x, y, Sum(), "batched", batch_size=2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_compiled_forward() -> None:
    x, y = batch(6)
    eager, compiled = TwoHeadNet(), TwoHeadNet()
    run(eager, x, y, Mean(), "loop")
    forward = torch.compile(compiled, backend="aot_eager")
    z, outputs = forward(x)
    mtlgrad.backward(
        task_losses(outputs, y), shared_params=compiled.trunk.parameters(), aggregator=Mean()
    )
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


def test_batched_engine_suggests_loop_when_vmap_fails() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    z = NoVmap.apply(p)
    losses = [z.sum(), (z**2).sum()]
    with pytest.raises(RuntimeError, match="Use engine='loop'"):
        mtlgrad.backward(losses, shared_params=[p], aggregator=Sum(), engine="batched")
    assert p.grad is None


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_nothing_shared(engine: str) -> None:
    # Soft parameter sharing: every parameter is one task's own and gets that task's gradient.
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3))
    record = mtlgrad.backward(
        {"a": (a**2).sum(), "b": (3 * b).sum()}, shared_params=[], aggregator=Sum(), engine=engine
    )
    torch.testing.assert_close(a.grad, 2 * a.detach())
    torch.testing.assert_close(b.grad, torch.full((3,), 3.0))
    torch.testing.assert_close(record.weights, torch.ones(2, dtype=torch.float64))
    assert record.gram is None


def test_owned_params_need_sharded_mode() -> None:
    model = TwoHeadNet()
    x, y = batch(0)
    z, outputs = model(x)
    with pytest.raises(ValueError, match="owned_params= is for distributed='sharded'"):
        mtlgrad.backward(
            task_losses(outputs, y),
            shared_params=model.trunk.parameters(),
            aggregator=Sum(),
            owned_params=model.trunk.parameters(),
        )
    assert all(p.grad is None for p in model.parameters())
