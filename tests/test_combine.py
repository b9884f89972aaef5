"""mtlgrad.ops.combine against a float64 reference, on every CPU kernel set."""

from __future__ import annotations

import pytest
import torch
from conftest import random_task_grads, task_matrix

from mtlgrad import ops

ODD_SHAPES = [(1,), (7,), (1023,), (33, 31), (0,), (4, 0, 3), (2049,)]
# Output rounding dominates for 16-bit outputs; fp32 accumulation for the rest.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_combine_close(out, grads, num_tasks, weights, out_old=None) -> None:
    """out == out_old + sum_t w_t g_t (out_old: the outputs' values before an accumulate)."""
    J = task_matrix(grads, num_tasks)
    w = torch.as_tensor(weights, dtype=torch.float64)
    expected = w @ J
    scale = w.abs() @ J.abs()
    if out_old is not None:
        old = torch.cat([o.reshape(-1).double() for o in out_old])
        expected = expected + old
        scale = scale + old.abs()
    got = torch.cat([o.reshape(-1).double() for o in out]) if out else torch.zeros(0)
    error = (got - expected).abs()
    finfo = torch.finfo(grads[0].dtype)
    subnormal_spacing = finfo.smallest_normal * finfo.eps  # fp16 outputs below 6e-5 are coarse
    bound = RTOL[grads[0].dtype] * num_tasks * scale + subnormal_spacing
    assert (error <= bound).all(), f"max error / bound = {(error / bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 64])
def test_matches_float64_reference(cpu_kernels: str, dtype: torch.dtype, num_tasks: int) -> None:
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    weights = torch.randn(
        num_tasks, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    out = ops.combine(grads, num_tasks, weights)
    assert [o.shape for o in out] == [g.shape for g in grads[: len(ODD_SHAPES)]]
    assert all(o.dtype == dtype for o in out)
    assert_combine_close(out, grads, num_tasks, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensor_in_place(cpu_kernels: str, dtype: torch.dtype) -> None:
    grads = random_task_grads([(10**6 + 3,), (5,)], 8, dtype, seed=2)
    out = [torch.full_like(g, 123.0) for g in grads[:2]]
    weights = [0.5, -1.0, 2.0, 0.0, 1e-3, 3.0, 1.0, -0.25]
    returned = ops.combine(grads, 8, weights, out)
    assert returned[0] is out[0] and returned[1] is out[1]
    assert_combine_close(out, grads, 8, weights)


def test_output_may_alias_an_input(cpu_kernels: str) -> None:
    grads = random_task_grads([(5000,), (3, 7)], 6, seed=3)
    reference_inputs = [g.clone() for g in grads]
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)
    # Write the result over task 4's gradients (read by a later pass over the tasks).
    ops.combine(grads, 6, weights, out=grads[8:10])
    assert_combine_close(grads[8:10], reference_inputs, 6, weights)


def test_non_contiguous_inputs_and_outputs(cpu_kernels: str) -> None:
    base = random_task_grads([(40, 30)], 3, seed=4)
    grads = [b.T for b in base]
    out = [torch.zeros(40, 30).T]  # a transposed (non-contiguous) view
    assert not out[0].is_contiguous() and out[0].shape == grads[0].shape
    weights = [1.0, 2.0, 3.0]
    ops.combine(grads, 3, weights, out)
    assert_combine_close(out, grads, 3, weights)


def test_weights_accept_any_float_dtype_and_sequences(cpu_kernels: str) -> None:
    grads = random_task_grads([(100,)], 2, seed=5)
    for weights in ([0.25, 0.75], (0.25, 0.75), torch.tensor([0.25, 0.75], dtype=torch.float32)):
        out = ops.combine(grads, 2, weights)
        torch.testing.assert_close(out[0], 0.25 * grads[0] + 0.75 * grads[1])


def test_zero_size_and_empty(cpu_kernels: str) -> None:
    grads = random_task_grads([(0,), (2, 0)], 3)
    out = ops.combine(grads, 3, [1.0, 2.0, 3.0])
    assert [o.shape for o in out] == [(0,), (2, 0)]
    assert ops.combine([], 2, [1.0, 1.0]) == []


MIXED_DTYPES = [torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("num_tasks", [1, 3, 9])
def test_mixed_dtypes_across_tensors(cpu_kernels: str, num_tasks: int) -> None:
    # Tensor k has its own dtype (the same in every task), and so has out[k].
    shapes = [(33, 31), (7,), (5, 3), (1023,), (2049,)]
    grads = random_task_grads(shapes, num_tasks, seed=8)
    grads = [g.to(MIXED_DTYPES[i % len(shapes)]) for i, g in enumerate(grads)]
    weights = torch.randn(
        num_tasks, dtype=torch.float64, generator=torch.Generator().manual_seed(9)
    )
    out = ops.combine(grads, num_tasks, weights)
    assert [o.dtype for o in out] == MIXED_DTYPES
    for k, dtype in enumerate(MIXED_DTYPES):
        column = grads[k :: len(shapes)]
        assert_combine_close(out[k : k + 1], column, num_tasks, weights)
        alone = ops.combine(column, num_tasks, weights)[0]
        assert torch.equal(out[k], alone), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tasks", [1, 3, 5, 8])
def test_accumulate_adds_to_out(cpu_kernels: str, dtype: torch.dtype, num_tasks: int) -> None:
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    out = random_task_grads(ODD_SHAPES, 1, dtype, seed=100 + num_tasks)
    out_old = [o.clone() for o in out]
    weights = torch.randn(
        num_tasks, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    returned = ops.combine(grads, num_tasks, weights, out, accumulate=True)
    assert all(r is o for r, o in zip(returned, out))
    assert_combine_close(out, grads, num_tasks, weights, out_old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_into_task_0s_gradient_and_non_contiguous_out(
    cpu_kernels: str, dtype: torch.dtype
) -> None:
    grads = random_task_grads([(5000,), (40, 30)], 3, dtype, seed=10)
    inputs = [g.clone() for g in grads]
    weights = [0.5, -2.0, 1.5]
    ops.combine(grads, 3, weights, out=grads[0:2], accumulate=True)  # out aliases task 0
    assert_combine_close(grads[0:2], inputs, 3, weights, out_old=inputs[0:2])
    out = [torch.randn(5000, dtype=torch.float64).to(dtype)[::1], torch.randn(30, 40).to(dtype).T]
    assert not out[1].is_contiguous()
    out_old = [o.clone() for o in out]
    ops.combine(inputs, 3, weights, out, accumulate=True)
    assert_combine_close(out, inputs, 3, weights, out_old)


def test_accumulate_needs_out() -> None:
    grads = random_task_grads([(10,)], 2)
    with pytest.raises(ValueError, match="accumulate=True adds to out, so out must be given"):
        ops.combine(grads, 2, [1.0, 1.0], accumulate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_weights_beyond_float32s_range(
    cpu_kernels: str, dtype: torch.dtype, accumulate: bool
) -> None:
    # w = 1e60 and 1e-60 cannot be cast to fp32; products with gradients of 1e-30 and 1e30 fit.
    gen = torch.Generator().manual_seed(11)
    n = 3000
    masks = torch.rand(3, n, generator=gen) < torch.tensor([[0.3], [0.5], [0.7]])
    J = torch.randn(3, n, generator=gen, dtype=torch.float64) * masks
    tiny, huge = (1e-30, 1e30) if dtype != torch.float16 else (1.0, 1.0)
    J[0] *= tiny
    J[1] *= huge
    for weights in ([1e60, 1e-60, 1.0], [-1e60, 2e-60, -0.5], [0.0, 1e-60, 1.0]):
        grads = [J[t].to(dtype)[: n - 1] for t in range(3)] + [
            J[t].to(dtype)[n - 1 :] for t in range(3)
        ]
        grads = grads[0::3] + grads[1::3] + grads[2::3]  # task-major: 2 tensors per task
        out = [torch.ones(n - 1, dtype=dtype), torch.ones(1, dtype=dtype)]
        ops.combine(grads, 3, weights, out, accumulate=accumulate)
        got = torch.cat([o.double() for o in out])
        w = torch.tensor(weights, dtype=torch.float64)
        exact = w @ task_matrix(grads, 3) + (1.0 if accumulate else 0.0)
        expected = exact.to(dtype).double()  # fp16: 1e60 * g overflows to inf, 1e-60 * g to 0
        assert torch.equal(got.isnan(), expected.isnan()) and not got.isnan().any()
        assert torch.equal(got.isinf(), expected.isinf())
        finite = expected.isfinite()
        scale = (w.abs() @ task_matrix(grads, 3).abs() + float(accumulate))[finite]
        error = (got[finite] - exact[finite]).abs()
        finfo = torch.finfo(dtype)
        assert (error <= 3 * RTOL[dtype] * scale + finfo.smallest_normal * finfo.eps).all()
        if dtype != torch.float16:
            assert finite.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pcgrad_on_badly_scaled_conflicting_rows(cpu_kernels: str, dtype: torch.dtype) -> None:
    # Rows of norms 1e30, 1e-30 and 1 that conflict: PCGrad's weights reach about 1e60, while the
    # update J^T w fits in fp32 easily.
    from mtlgrad.aggregators import PCGrad

    gen = torch.Generator().manual_seed(12)
    J = torch.randn(3, 2000, generator=gen, dtype=torch.float64)
    J[1] = -J[0] + 0.3 * J[1]
    J[2] = -0.5 * J[1] + J[2]
    J = (
        J
        / J.norm(dim=1, keepdim=True)
        * torch.tensor([[1e30], [1e-30], [1.0]], dtype=torch.float64)
    )
    J = J.to(dtype)
    d = PCGrad(generator=torch.Generator().manual_seed(0))(J).double()
    w = PCGrad(generator=torch.Generator().manual_seed(0)).weights(ops.gram(list(J), 3))
    assert w.abs().max() > 1e50
    expected = w @ J.double()
    assert torch.isfinite(d).all()
    error = (d - expected).abs()
    assert (error <= 3 * RTOL[dtype] * (w.abs() @ J.double().abs())).all()
    # And against the float64 rows (whose Gram matrix and sum are float64 throughout).
    d64 = PCGrad(generator=torch.Generator().manual_seed(0))(J.double())
    assert (d - d64).norm() <= 1e-5 * d64.norm() + RTOL[dtype] * expected.norm()


def test_deterministic(cpu_kernels: str) -> None:
    grads = random_task_grads([(300_001,)], 8, seed=6)
    weights = torch.rand(8, dtype=torch.float64)
    first = ops.combine(grads, 8, weights)[0]
    assert torch.equal(ops.combine(grads, 8, weights)[0], first)


def test_sum_of_identical_tasks_is_exact(cpu_kernels: str) -> None:
    g = torch.randn(4097)
    out = ops.combine([g, g, g, g], 4, [0.25, 0.25, 0.25, 0.25])[0]
    assert torch.equal(out, g)
