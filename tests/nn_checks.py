"""Checks every multi-task model of mtlgrad.nn must pass: an exact parameter partition, gradient
flow confined to each task's own parameters, and training through mtlgrad.backward and
MTLOptimizer with the shared gradient equal to the aggregation of hand-built task gradients."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import pytest
import torch

import mtlgrad
from mtlgrad.aggregators import Aggregator
from mtlgrad.nn import MultiTaskModule
from mtlgrad.optim import MTLOptimizer

LossFn = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def check_partition(model: MultiTaskModule) -> None:
    """shared and the task sets are pairwise disjoint, duplicate-free, and together exactly
    set(model.parameters()); unknown task names raise a KeyError naming the known tasks."""
    names = parameter_names(model)
    groups = {"shared": list(model.shared_parameters())}
    groups.update({f"task {t}": list(model.task_parameters(t)) for t in model.task_names})
    owner: dict[int, str] = {}
    for label, params in groups.items():
        ids = [id(p) for p in params]
        assert len(ids) == len(set(ids)), f"{label} lists a parameter twice"
        for p in params:
            assert id(p) not in owner, f"{names.get(id(p))} is in {owner.get(id(p))} and {label}"
            owner[id(p)] = label
    everything = {id(p) for p in model.parameters()}
    missing = sorted(names[i] for i in everything - set(owner))
    assert not missing, f"parameters in no group: {missing}"
    assert set(owner) == everything
    with pytest.raises(KeyError, match=rf"unknown task 'nope'.*{model.task_names[0]}"):
        list(model.task_parameters("nope"))


def _nonzero(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def check_gradient_flow(model: MultiTaskModule, x: object, loss_fn: LossFn) -> None:
    """A backward of one task's loss alone gives a nonzero gradient to every shared parameter and
    every parameter of that task, and none (None or zero) to the other tasks' parameters."""
    names = parameter_names(model)
    shared = list(model.shared_parameters())
    for task in model.task_names:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x))[task].backward()
        for p in shared + list(model.task_parameters(task)):
            assert _nonzero(p), f"{names[id(p)]} gets no gradient from task {task!r}"
        for other in model.task_names:
            if other != task:
                for p in model.task_parameters(other):
                    assert not _nonzero(p), (
                        f"{names[id(p)]} (task {other!r}) gets a gradient from task {task!r}"
                    )
    model.zero_grad(set_to_none=True)


def hand_jacobian(
    model: MultiTaskModule, x: object, loss_fn: LossFn
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """J (T x P over the shared parameters, in shared_parameters() order) and, per task, the
    gradient of its own parameters, by plain torch.autograd.grad."""
    shared = list(model.shared_parameters())
    losses = loss_fn(model(x))
    rows, own = [], {}
    for task in model.task_names:
        mine = list(model.task_parameters(task))
        grads = torch.autograd.grad(
            losses[task], shared + mine, retain_graph=True, allow_unused=True
        )
        flat = [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(shared, grads[: len(shared)])
        ]
        rows.append(torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64))
        own[task] = [
            torch.zeros_like(p) if g is None else g for p, g in zip(mine, grads[len(shared) :])
        ]
    return torch.stack(rows), own


def check_step_matches_aggregation(
    model: MultiTaskModule,
    x: object,
    loss_fn: LossFn,
    aggregator: Aggregator,
    *,
    features: bool = False,
) -> None:
    """mtlgrad.backward writes aggregator(J) into the shared .grad and each task's own gradient
    into its parameters (run in float64 for tight tolerances)."""
    reference_aggregator = copy.deepcopy(aggregator)
    J, own = hand_jacobian(model, x, loss_fn)
    expected = reference_aggregator(J)
    model.zero_grad(set_to_none=True)
    shared = list(model.shared_parameters())
    mtlgrad.backward(loss_fn(model(x)), shared_params=shared, aggregator=aggregator)
    got = torch.cat([p.grad.reshape(-1) for p in shared]) if shared else J.new_zeros(0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    for task in model.task_names:
        for p, g in zip(model.task_parameters(task), own[task]):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)


def check_training(
    model: MultiTaskModule,
    x: object,
    loss_fn: LossFn,
    aggregator: Aggregator,
    steps: int = 15,
    lr: float = 2e-2,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    with_model: bool = False,
) -> None:
    """A few MTLOptimizer steps lower every task's loss (a tiny fixed-batch problem). The
    optimizer gets ``shared_params=model.shared_parameters()`` (its graph walk finds the heads),
    or with ``with_model`` the model itself (its exact partition, no walk; the losses go as a
    dict keyed by the task names)."""
    partition = {"model": model} if with_model else {"shared_params": model.shared_parameters()}
    optimizer = MTLOptimizer(torch.optim.Adam(model.parameters(), lr=lr), aggregator, **partition)
    with torch.no_grad():
        before = {k: v.item() for k, v in loss_fn(model(x)).items()}
    for _ in range(steps):
        optimizer.zero_grad()
        if extra_loss is not None:
            extra_loss().backward()
        optimizer.backward(loss_fn(model(x)))
        optimizer.step()
    with torch.no_grad():
        after = {k: v.item() for k, v in loss_fn(model(x)).items()}
    for task in model.task_names:
        assert after[task] < 0.9 * before[task], (task, before[task], after[task])


def regression_losses(targets: Mapping[str, torch.Tensor]) -> LossFn:
    """Mean squared errors, task t scaled by t + 1 so the task gradients differ."""

    def losses(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: (k + 1) * (outputs[name] - targets[name]).pow(2).mean()
            for k, name in enumerate(targets)
        }

    return losses
