from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from mtlgrad import ops

TOLERANCE = {
    # Products of 16- and 32-bit inputs are exact in fp32 up to rounding of the accumulation, which
    # runs over at most a few thousand elements per chunk: errors stay far below 1e-5 of the norms.
    torch.float32: 1e-5,
    torch.float16: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float64: 1e-12,
}


@pytest.fixture(params=ops.supported_cpu_kernels())
def cpu_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once per CPU kernel set this machine supports (generic, avx2, avx512)."""
    previous = ops.set_cpu_kernels(request.param)
    try:
        yield request.param
    finally:
        ops.set_cpu_kernels(previous)


def random_task_grads(
    shapes: Sequence[tuple[int, ...]],
    num_tasks: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scales: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Task-major gradient list with one tensor per shape per task; task t scaled by scales[t]."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(num_tasks):
        scale = 1.0 if scales is None else scales[t]
        for shape in shapes:
            grads.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype))
    return grads


def task_matrix(grads: Sequence[torch.Tensor], num_tasks: int) -> torch.Tensor:
    """The float64 T x P matrix J of the flattened task gradients (reference only)."""
    per_task = len(grads) // num_tasks
    rows = []
    for t in range(num_tasks):
        parts = [g.reshape(-1).double() for g in grads[t * per_task : (t + 1) * per_task]]
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(rows)
