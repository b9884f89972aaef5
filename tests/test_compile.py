"""The ops under the dispatcher's checks (torch.library.opcheck) and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import random_task_grads

from mtlgrad import ops


def mixed_task_grads(shapes, num_tasks, dtypes):
    """Tensor k of every task in dtypes[k] (e.g. a bf16 trunk with fp32 norm layers)."""
    grads = random_task_grads(shapes, num_tasks)
    return [g.to(dtypes[i % len(shapes)]) for i, g in enumerate(grads)]


def gram_samples():
    yield random_task_grads([(3, 4), (7,)], 2), 2
    yield random_task_grads([(1,), (1023,), (0,)], 5, dtype=torch.float64), 5
    yield random_task_grads([(33,)], 3, dtype=torch.bfloat16), 3
    mixed = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
    yield mixed_task_grads([(3, 4), (7,), (5,), (2,)], 3, mixed), 3


@pytest.mark.parametrize("sample", list(gram_samples()), ids=["fp32", "fp64", "bf16", "mixed"])
def test_opcheck_gram(sample) -> None:
    grads, num_tasks = sample
    torch.library.opcheck(torch.ops.mtlgrad.gram.default, (grads, num_tasks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_combine(dtype: torch.dtype) -> None:
    grads = random_task_grads([(3, 4), (7,)], 3, dtype=dtype)
    out = [torch.empty(3, 4, dtype=dtype), torch.empty(7, dtype=dtype)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    torch.library.opcheck(torch.ops.mtlgrad.combine.default, (grads, 3, weights, out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_combine_accumulate(dtype: torch.dtype) -> None:
    grads = random_task_grads([(3, 4), (7,)], 3, dtype=dtype)
    out = [torch.randn(3, 4).to(dtype), torch.randn(7).to(dtype)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    torch.library.opcheck(torch.ops.mtlgrad.combine.default, (grads, 3, weights, out, True))
    # Into task 0's gradients: the outputs alias an input.
    torch.library.opcheck(torch.ops.mtlgrad.combine.default, (grads, 3, weights, grads[:2], True))


def test_opcheck_combine_mixed_dtypes() -> None:
    dtypes = [torch.bfloat16, torch.float32, torch.float64]
    grads = mixed_task_grads([(3, 4), (7,), (2,)], 3, dtypes)
    out = [
        torch.empty(3, 4, dtype=torch.bfloat16),
        torch.empty(7),
        torch.empty(2, dtype=torch.float64),
    ]
    weights = torch.tensor([0.5, -1.0, 2.0])
    torch.library.opcheck(torch.ops.mtlgrad.combine.default, (grads, 3, weights, out))


def test_compile_fullgraph() -> None:
    def step(grads: list[torch.Tensor], num_tasks: int) -> list[torch.Tensor]:
        G = ops.gram(grads, num_tasks, check_finite=False)
        weights = 1.0 / G.diagonal().sqrt()  # normalise each task's gradient
        return ops.combine(grads, num_tasks, weights)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    mixed = mixed_task_grads([(30, 4), (5,)], 3, [torch.bfloat16, torch.float32])
    for grads in (random_task_grads([(30, 4), (5,)], 3), mixed):
        expected = step(grads, 3)
        got = compiled(grads, 3)
        for e, g in zip(expected, got):
            assert g.dtype == e.dtype
            torch.testing.assert_close(g, e)


def test_meta_tensors_give_shapes() -> None:
    grads = [torch.empty(3, 4, device="meta") for _ in range(2)]
    G, nonfinite = torch.ops.mtlgrad.gram(grads, 2)
    assert G.shape == (2, 2) and G.dtype == torch.float64 and G.device.type == "meta"
    assert nonfinite.shape == (2,) and nonfinite.dtype == torch.int64


def test_compile_fullgraph_accumulate() -> None:
    def step(grads: list[torch.Tensor], num_tasks: int, out: list[torch.Tensor]) -> None:
        G = ops.gram(grads, num_tasks, check_finite=False)
        ops.combine(grads, num_tasks, 1.0 / G.diagonal().sqrt(), out, accumulate=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = random_task_grads([(30, 4), (5,)], 3)
    out = [torch.ones(30, 4), torch.ones(5)]
    expected = [o.clone() for o in out]
    step(grads, 3, expected)
    compiled(grads, 3, out)
    for e, g in zip(expected, out):
        torch.testing.assert_close(g, e)
