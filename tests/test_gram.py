"""mtlgrad.ops.gram against a float64 reference, on every CPU kernel set."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE, random_task_grads, task_matrix

from mtlgrad import ops

ODD_SHAPES = [(1,), (7,), (1023,), (33, 31), (0,), (4, 0, 3), (2049,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_gram_close(result: torch.Tensor, grads: list[torch.Tensor], num_tasks: int) -> None:
    J = task_matrix(grads, num_tasks)
    expected = J @ J.T
    assert result.dtype == torch.float64
    assert result.shape == (num_tasks, num_tasks)
    norms = expected.diagonal().clamp_min(0).sqrt()
    bound = TOLERANCE[grads[0].dtype] * torch.outer(norms, norms) + 1e-300
    error = (result - expected).abs()
    assert (error <= bound).all(), f"max error / bound = {(error / bound).max():.3g}"
    assert torch.equal(result, result.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 8, 13, 64])
def test_matches_float64_reference(cpu_kernels: str, dtype: torch.dtype, num_tasks: int) -> None:
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    assert_gram_close(ops.gram(grads, num_tasks), grads, num_tasks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensor(cpu_kernels: str, dtype: torch.dtype) -> None:
    num_tasks = 8
    grads = random_task_grads([(10**6 + 3,), (5,)], num_tasks, dtype, seed=1)
    assert_gram_close(ops.gram(grads, num_tasks), grads, num_tasks)


def test_many_tensors_and_large_task_count(cpu_kernels: str) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(int(n),) for n in torch.randint(0, 300, (300,), generator=gen)]
    grads = random_task_grads(shapes, 8, seed=3)
    assert_gram_close(ops.gram(grads, 8), grads, 8)
    grads = random_task_grads([(517,), (3, 5)], 256, seed=4)
    assert_gram_close(ops.gram(grads, 256), grads, 256)


def test_badly_scaled_tasks(cpu_kernels: str) -> None:
    scales = [1e-20, 1.0, 1e15, 3e-3]
    grads = random_task_grads([(5000,), (17,)], 4, scales=scales, seed=5)
    assert_gram_close(ops.gram(grads, 4), grads, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(cpu_kernels: str, dtype: torch.dtype) -> None:
    num_tasks = 3
    base = random_task_grads([(40, 30), (50,)], num_tasks, dtype, seed=6)
    grads = []
    for t in range(num_tasks):
        matrix, vector = base[2 * t], base[2 * t + 1]
        grads += [matrix.T, vector[::3], matrix[:, 5:17]]
    assert not grads[0].is_contiguous()
    assert_gram_close(ops.gram(grads, num_tasks), grads, num_tasks)


def test_zero_size_and_empty(cpu_kernels: str) -> None:
    grads = random_task_grads([(0,), (3, 0)], 4)
    assert torch.equal(ops.gram(grads, 4), torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(ops.gram([], 3), torch.zeros(3, 3, dtype=torch.float64))


def test_zero_gradient_and_rank_deficient(cpu_kernels: str) -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(7))
    grads = [g, torch.zeros(1000), 2 * g, -g]
    result = ops.gram(grads, 4)
    assert_gram_close(result, grads, 4)
    assert (result[1] == 0).all()


def test_deterministic(cpu_kernels: str) -> None:
    grads = random_task_grads([(300_001,), (77,)], 8, seed=8)
    first = ops.gram(grads, 8)
    for _ in range(3):
        assert torch.equal(ops.gram(grads, 8), first)


MIXED = [
    ((33, 31), torch.bfloat16),
    ((7,), torch.float32),
    ((1023,), torch.bfloat16),
    ((5, 3), torch.float64),
    ((0,), torch.float16),
    ((2049,), torch.float16),
    ((3000,), torch.float32),
]


def mixed_task_grads(num_tasks: int, seed: int = 0) -> list[torch.Tensor]:
    """A task-major list whose tensor k has the dtype MIXED[k] for every task."""
    grads = random_task_grads([shape for shape, _ in MIXED], num_tasks, seed=seed)
    return [g.to(MIXED[i % len(MIXED)][1]) for i, g in enumerate(grads)]


def group_of(grads: list[torch.Tensor], num_tasks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    k = len(grads) // num_tasks
    return [g for i, g in enumerate(grads) if MIXED[i % k][1] == dtype]


@pytest.mark.parametrize("num_tasks", [1, 3, 9])
def test_mixed_dtypes_across_tensors(cpu_kernels: str, num_tasks: int) -> None:
    # E.g. a bf16 trunk with fp32 norm layers: tensor k has its own dtype, the same in every task.
    grads = mixed_task_grads(num_tasks, seed=14)
    result = ops.gram(grads, num_tasks)
    J = task_matrix(grads, num_tasks)
    expected = J @ J.T
    bound = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    summed = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.float16):  # first-seen order
        part = group_of(grads, num_tasks, dtype)
        norms = task_matrix(part, num_tasks).norm(dim=1)
        bound += TOLERANCE[dtype] * torch.outer(norms, norms)
        summed += ops.gram(part, num_tasks)
    assert ((result - expected).abs() <= bound).all()
    # One pass per dtype, added in a fixed order: exactly the per-dtype results summed.
    assert torch.equal(result, summed)
    assert torch.equal(ops.gram(grads, num_tasks), result)


def test_mixed_dtypes_nonfinite_names_the_tensor_in_the_whole_list(cpu_kernels: str) -> None:
    grads = mixed_task_grads(3, seed=15)
    k = len(MIXED)
    grads[1 * k + 5][100] = float("inf")  # task 1, tensor 5 (fp16)
    grads[1 * k + 6][7] = float("nan")  # task 1, tensor 6 (fp32)
    grads[2 * k + 2][1] = float("nan")  # task 2, tensor 2 (bf16)
    grads[2 * k + 3][0, 0] = float("-inf")  # task 2, tensor 3 (fp64)
    _, nonfinite = torch.ops.mtlgrad.gram(grads, 3)
    assert nonfinite.tolist() == [-1, 5, 2]


def test_kernel_sets_agree() -> None:
    grads = random_task_grads(ODD_SHAPES + [(100_000,)], 6, seed=9)
    results = {}
    previous = ops.cpu_kernels()
    try:
        for name in ops.supported_cpu_kernels():
            ops.set_cpu_kernels(name)
            results[name] = ops.gram(grads, 6)
    finally:
        ops.set_cpu_kernels(previous)
    reference = results["generic"]
    norms = reference.diagonal().sqrt()
    bound = 2 * TOLERANCE[torch.float32] * torch.outer(norms, norms)
    for name, result in results.items():
        assert ((result - reference).abs() <= bound).all(), name


def test_fp32_overflow_within_a_chunk_is_recomputed_in_fp64(cpu_kernels: str) -> None:
    # Squares of 1e20 overflow fp32; the inputs are finite, so the result must be too.
    big = torch.full((1000,), 1e20, dtype=torch.float32)
    small = torch.ones(1000, dtype=torch.float32)
    result = ops.gram([big, small], 2)
    expected = torch.tensor([[1e43, 1e23], [1e23, 1000.0]], dtype=torch.float64)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-20, 1e-25, 1e-30, 1e-35])
@pytest.mark.parametrize("num_tasks", [1, 4, 9])
def test_fp32_underflow_within_a_chunk_is_recomputed_in_fp64(
    cpu_kernels: str, dtype: torch.dtype, scale: float, num_tasks: int
) -> None:
    # Products of two 1e-25 values are below fp32's subnormals: the chunk is summed in fp64.
    scales = [scale] * num_tasks
    scales[num_tasks // 2] = 1.0  # an ordinary task next to the tiny ones
    grads = random_task_grads([(5000,), (7,), (300, 3)], num_tasks, dtype, seed=16, scales=scales)
    assert_gram_close(ops.gram(grads, num_tasks), grads, num_tasks)
    tiny = random_task_grads([(5000,), (7,)], num_tasks, dtype, seed=17, scales=[scale] * num_tasks)
    zero = [torch.zeros_like(g) for g in tiny[:2]]  # a task that reaches no parameter
    for grads in (tiny, zero + tiny[2:]):
        result = ops.gram(grads, num_tasks)
        assert_gram_close(result, grads, num_tasks)
        J = task_matrix(grads, num_tasks)
        torch.testing.assert_close(result.diagonal(), (J * J).sum(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-25, 1e-30, 1e-35])
def test_aggregators_are_unchanged_by_tiny_gradients(dtype: torch.dtype, scale: float) -> None:
    from mtlgrad.aggregators import IMTLG, MGDA, ConFIG, NashMTL, UPGrad

    gen = torch.Generator().manual_seed(18)
    J = torch.randn(4, 5000, generator=gen, dtype=torch.float64)
    J[1] -= 1.5 * J[0] * (J[0] @ J[1]).sign()  # conflicting tasks
    J[3] = -0.5 * J[2] + 0.1 * J[3]
    # The outputs are rounded to the input's dtype: bf16 directions agree to about 2^-9.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 5e-3}[dtype]
    for make in (UPGrad, MGDA, IMTLG, ConFIG, NashMTL):
        tiny = make()((J * scale).to(dtype)).double()
        assert torch.isfinite(tiny).all() and tiny.norm() > 0, make.__name__
        direction = tiny / tiny.norm()
        # The same input rows in float64 (whose Gram matrix does not underflow), and for fp32
        # the rows at scale 1 (bf16 rounds the scaled rows differently).
        expected = make()((J * scale).to(dtype).double())
        error = (direction - expected / expected.norm()).norm()
        assert error <= tolerance, f"{make.__name__}: {error:.3g}"
        if dtype == torch.float32:
            at_one = make()(J.to(dtype)).double()
            error = (direction - at_one / at_one.norm()).norm()
            assert error <= 1e-4, f"{make.__name__} against scale 1: {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_reported_per_task_and_tensor(
    cpu_kernels: str, dtype: torch.dtype, bad: float
) -> None:
    shapes = [(10,), (5000,), (3, 3), (7,)]
    grads = random_task_grads(shapes, 3, dtype, seed=10)
    grads[1 * 4 + 1][4321] = bad  # task 1, tensor 1
    grads[2 * 4 + 3][6] = bad  # task 2, tensor 3
    grads[2 * 4 + 2][2, 2] = bad  # task 2, tensor 2 (the first bad one of task 2)
    _, nonfinite = torch.ops.mtlgrad.gram(grads, 3)
    assert nonfinite.tolist() == [-1, 1, 2]
    with pytest.raises(ops.NonFiniteGradientError) as info:
        ops.gram(grads, 3, names=["a", "b", "c", "d"])
    assert info.value.tasks == [1, 2]
    assert info.value.tensor_indices == [1, 2]
    assert "task 1: parameter 'b' (tensor 1)" in str(info.value)
    assert "task 2: parameter 'c' (tensor 2)" in str(info.value)
    unchecked = ops.gram(grads, 3, check_finite=False)
    assert torch.isfinite(unchecked[0, 0])
    assert not torch.isfinite(unchecked[1, 1])


def test_single_thread_result_matches(cpu_kernels: str) -> None:
    grads = random_task_grads([(200_003,)], 5, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.gram(grads, 5)
    finally:
        torch.set_num_threads(threads)
    assert_gram_close(single, grads, 5)
    assert_gram_close(ops.gram(grads, 5), grads, 5)


def test_finite_float64_input_whose_gram_overflows(cpu_kernels: str) -> None:
    # Squares of 1e160 overflow float64, the gradients themselves are finite.
    grads = random_task_grads([(100,), (7,)], 3, torch.float64, seed=12, scales=[1.0, 1e160, 1.0])
    _, nonfinite = torch.ops.mtlgrad.gram(grads, 3)
    assert nonfinite.tolist() == [-1, -1, -1]
    with pytest.raises(ops.GramOverflowError) as info:
        ops.gram(grads, 3)
    assert not isinstance(info.value, ops.NonFiniteGradientError)
    assert isinstance(info.value, ValueError)
    assert info.value.tasks == [1]
    assert "task 1" in str(info.value) and "1e154" in str(info.value)
    with pytest.raises(ops.GramOverflowError, match="task 'depth'") as info:
        ops.gram(grads, 3, task_names=["seg", "depth", "normals"])
    assert info.value.task_names == ["depth"]
    assert not torch.isfinite(ops.gram(grads, 3, check_finite=False)[1, 1])


def test_nonfinite_error_names_the_task() -> None:
    grads = random_task_grads([(10,), (20,)], 3, seed=13)
    grads[2 * 2 + 1][3] = float("nan")
    with pytest.raises(ops.NonFiniteGradientError) as info:
        ops.gram(grads, 3, names=["w", "b"], task_names=["seg", "depth", "normals"])
    assert info.value.tasks == [2]
    assert info.value.task_names == ["normals"]
    assert "task 'normals': parameter 'b' (tensor 1)" in str(info.value)
    with pytest.raises(ops.NonFiniteGradientError, match="task 'normals': tensor 1"):
        ops.graddrop(grads, 3, task_names=["seg", "depth", "normals"])
    with pytest.raises(ValueError, match="got 2 task names for 3 tasks"):
        ops.gram(grads, 3, task_names=["seg", "depth"])


def test_check_gram_on_host_outputs() -> None:
    G = torch.eye(2, dtype=torch.float64)
    ops.check_gram(G, torch.tensor([-1, -1]))
    with pytest.raises(ops.NonFiniteGradientError, match="task 'b': tensor 4"):
        ops.check_gram(G, torch.tensor([-1, 4]), task_names=["a", "b"])
    G[0, 1] = G[1, 0] = float("inf")  # every squared norm fits, their product does not
    with pytest.raises(ops.GramOverflowError) as info:
        ops.check_gram(G, torch.tensor([-1, -1]))
    assert info.value.tasks == [0, 1]
