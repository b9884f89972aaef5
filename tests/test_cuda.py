"""The CUDA ops, aggregators and training step (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE, random_task_grads, task_matrix
from training_helpers import (
    TwoHeadNet,
    batch,
    gram_aggregator_classes,
    make_aggregator,
    task_losses,
)

import mtlgrad
from mtlgrad import ops
from mtlgrad.aggregators import Mean, Sum

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and mtlgrad._C.with_cuda),
        reason="needs a CUDA device and mtlgrad built with CUDA",
    ),
]

ODD_SHAPES = [(1,), (7,), (1023,), (33, 31), (0,), (4, 0, 3), (16385,), (2049,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def cuda(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.cuda() for g in grads]


def assert_gram_close(result: torch.Tensor, grads: list[torch.Tensor], num_tasks: int) -> None:
    J = task_matrix([g.cpu() for g in grads], num_tasks)
    expected = J @ J.T
    assert result.dtype == torch.float64 and result.device.type == "cuda"
    norms = expected.diagonal().clamp_min(0).sqrt()
    bound = TOLERANCE[grads[0].dtype] * torch.outer(norms, norms) + 1e-300
    error = (result.cpu() - expected).abs()
    assert (error <= bound).all(), f"max error / bound = {(error / bound).max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 9, 32, 64, 256])
def test_gram_matches_float64_reference(dtype: torch.dtype, num_tasks: int) -> None:
    shapes = ODD_SHAPES if num_tasks <= 64 else [(517,), (3, 5), (0,)]
    grads = cuda(random_task_grads(shapes, num_tasks, dtype, seed=num_tasks))
    assert_gram_close(ops.gram(grads, num_tasks), grads, num_tasks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_many_tensors_large_tensor_non_contiguous(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(int(n),) for n in torch.randint(0, 300, (300,), generator=gen)] + [(10**6 + 3,)]
    grads = cuda(random_task_grads(shapes, 8, dtype, seed=3))
    assert_gram_close(ops.gram(grads, 8), grads, 8)
    base = cuda(random_task_grads([(40, 30)], 3, dtype, seed=4))
    transposed = [b.T for b in base]
    assert_gram_close(ops.gram(transposed, 3), transposed, 3)


@pytest.mark.parametrize("num_tasks", [4, 40])
def test_gram_deterministic_and_agrees_with_cpu(num_tasks: int) -> None:
    grads = random_task_grads([(300_001,), (77,)], num_tasks, seed=5)
    on_gpu = cuda(grads)
    first = ops.gram(on_gpu, num_tasks)
    for _ in range(3):
        assert torch.equal(ops.gram(on_gpu, num_tasks), first)
    cpu = ops.gram(grads, num_tasks)
    norms = cpu.diagonal().sqrt()
    assert ((first.cpu() - cpu).abs() <= 2e-5 * torch.outer(norms, norms)).all()


@pytest.mark.parametrize("num_tasks", [3, 12])
def test_gram_nonfinite_is_reported(num_tasks: int) -> None:
    grads = cuda(random_task_grads([(10,), (50000,), (7,)], num_tasks, seed=6))
    grads[1 * 3 + 1][4321] = float("nan")
    grads[2 * 3 + 2][3] = float("inf")
    _, nonfinite = torch.ops.mtlgrad.gram(grads, num_tasks)
    expected = [-1] * num_tasks
    expected[1], expected[2] = 1, 2
    assert nonfinite.tolist() == expected
    with pytest.raises(ops.NonFiniteGradientError):
        ops.gram(grads, num_tasks)


@pytest.mark.parametrize("num_tasks", [1, 8])
def test_gram_fp32_overflow_is_recomputed(num_tasks: int) -> None:
    big = torch.full((1000,), 1e20, device="cuda")
    grads = [big] * num_tasks
    G = ops.gram(grads, num_tasks)
    assert torch.isfinite(G).all()
    torch.testing.assert_close(G[0, 0].item(), 1e43, rtol=1e-5, atol=0)


MIXED_DTYPES = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float64]
MIXED_SHAPES = [(33, 31), (7,), (16385,), (0,), (2049,)]


def mixed_task_grads(num_tasks: int, seed: int) -> list[torch.Tensor]:
    grads = random_task_grads(MIXED_SHAPES, num_tasks, seed=seed)
    return [g.to(MIXED_DTYPES[i % len(MIXED_SHAPES)]) for i, g in enumerate(grads)]


@pytest.mark.parametrize("num_tasks", [1, 3, 8, 9, 40])
def test_gram_mixed_dtypes_match_reference_and_cpu(num_tasks: int) -> None:
    grads = mixed_task_grads(num_tasks, seed=11)
    on_gpu = ops.gram(cuda(grads), num_tasks)
    J = task_matrix(grads, num_tasks)
    expected = J @ J.T
    bound = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for dtype in set(MIXED_DTYPES):
        part = [g for i, g in enumerate(grads) if MIXED_DTYPES[i % len(MIXED_SHAPES)] == dtype]
        norms = task_matrix(part, num_tasks).norm(dim=1)
        bound += TOLERANCE[dtype] * torch.outer(norms, norms)
    assert ((on_gpu.cpu() - expected).abs() <= bound).all()
    assert ((on_gpu.cpu() - ops.gram(grads, num_tasks)).abs() <= 2 * bound).all()
    assert torch.equal(ops.gram(cuda(grads), num_tasks), on_gpu)


@pytest.mark.parametrize("num_tasks", [3, 12])
def test_gram_mixed_dtypes_nonfinite_names_the_tensor_in_the_whole_list(num_tasks: int) -> None:
    grads = mixed_task_grads(num_tasks, seed=12)
    k = len(MIXED_SHAPES)
    grads[1 * k + 4][100] = float("inf")  # task 1, tensor 4 (fp64)
    grads[1 * k + 2][7] = float("nan")  # task 1, tensor 2 (fp16)
    grads[2 * k + 1][1] = float("nan")  # task 2, tensor 1 (fp32)
    _, nonfinite = torch.ops.mtlgrad.gram(cuda(grads), num_tasks)
    expected = [-1] * num_tasks
    expected[1], expected[2] = 2, 1
    assert nonfinite.tolist() == expected


@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_combine_mixed_dtypes_match_cpu(num_tasks: int) -> None:
    grads = mixed_task_grads(num_tasks, seed=13)
    weights = torch.randn(num_tasks, dtype=torch.float64)
    on_cpu = ops.combine(grads, num_tasks, weights)
    on_gpu = ops.combine(cuda(grads), num_tasks, weights.cuda())
    for a, b, dtype in zip(on_cpu, on_gpu, MIXED_DTYPES):
        assert b.dtype == dtype
        tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-20, 1e-25, 1e-30, 1e-35])
@pytest.mark.parametrize("num_tasks", [1, 4, 8, 9, 40])
def test_gram_fp32_underflow_is_recomputed(
    dtype: torch.dtype, scale: float, num_tasks: int
) -> None:
    scales = [scale] * num_tasks
    scales[num_tasks // 2] = 1.0  # an ordinary task next to the tiny ones
    grads = random_task_grads([(40000,), (7,)], num_tasks, dtype, seed=15, scales=scales)
    grads[0] = torch.zeros_like(grads[0])  # task 0 does not reach tensor 0
    G = ops.gram(cuda(grads), num_tasks)
    assert_gram_close(G, grads, num_tasks)
    J = task_matrix(grads, num_tasks)
    torch.testing.assert_close(G.diagonal().cpu(), (J * J).sum(dim=1), rtol=1e-6, atol=0)
    norms = J.norm(dim=1)
    bound = 2 * TOLERANCE[dtype] * torch.outer(norms, norms)
    assert ((G.cpu() - ops.gram(grads, num_tasks)).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [1, 3, 8, 64])
def test_combine_matches_reference_and_cpu(dtype: torch.dtype, num_tasks: int) -> None:
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    weights = torch.randn(
        num_tasks, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    on_cpu = ops.combine(grads, num_tasks, weights)
    on_gpu = ops.combine(cuda(grads), num_tasks, weights.cuda())
    for a, b in zip(on_cpu, on_gpu):
        assert b.device.type == "cuda" and b.dtype == dtype
        tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tolerance, atol=tolerance)


def test_combine_unaligned_aliased_and_non_contiguous() -> None:
    base = torch.randn(3, 10_001, device="cuda")
    grads = [base[t, 1:] for t in range(3)]  # 4-byte offset: the scalar path
    weights = torch.tensor([1.0, -2.0, 0.5], device="cuda", dtype=torch.float64)
    out = ops.combine(grads, 3, weights)
    torch.testing.assert_close(out[0], grads[0] - 2 * grads[1] + 0.5 * grads[2])
    aliased = [g.clone() for g in grads]
    expected = ops.combine(aliased, 3, weights)[0]
    ops.combine(aliased, 3, weights, out=aliased[2:3])
    torch.testing.assert_close(aliased[2], expected)
    transposed_out = [torch.zeros(20, 30, device="cuda").T]
    inputs = [torch.randn(30, 20, device="cuda") for _ in range(3)]
    ops.combine(inputs, 3, weights, transposed_out)
    torch.testing.assert_close(transposed_out[0], inputs[0] - 2 * inputs[1] + 0.5 * inputs[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_combine_accumulate_matches_reference_and_cpu(dtype: torch.dtype, num_tasks: int) -> None:
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    out_old = random_task_grads(ODD_SHAPES, 1, dtype, seed=50 + num_tasks)
    weights = torch.randn(num_tasks, dtype=torch.float64)
    on_cpu = ops.combine(grads, num_tasks, weights, [o.clone() for o in out_old], accumulate=True)
    on_gpu = cuda(out_old)
    ops.combine(cuda(grads), num_tasks, weights.cuda(), on_gpu, accumulate=True)
    J = task_matrix(grads, num_tasks)
    old = torch.cat([o.reshape(-1).double() for o in out_old])
    expected = old + weights @ J
    scale = old.abs() + weights.abs() @ J.abs()
    got = torch.cat([o.cpu().reshape(-1).double() for o in on_gpu])
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-14}.get(dtype, 1e-6)
    finfo = torch.finfo(dtype)
    assert ((got - expected).abs() <= rtol * num_tasks * scale + finfo.smallest_normal).all()
    for a, b in zip(on_cpu, on_gpu):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_accumulate_aliased_and_non_contiguous(dtype: torch.dtype) -> None:
    grads = cuda(random_task_grads([(5000,), (40, 30)], 3, dtype, seed=14))
    inputs = [g.clone() for g in grads]
    weights = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64, device="cuda")
    expected = ops.combine(inputs, 3, weights, [g.clone() for g in inputs[:2]], accumulate=True)
    ops.combine(grads, 3, weights, out=grads[0:2], accumulate=True)  # out aliases task 0
    for a, b in zip(grads[:2], expected):
        torch.testing.assert_close(a, b)
    out = [
        torch.randn(5000, device="cuda").to(dtype),
        torch.randn(30, 40, device="cuda").to(dtype).T,
    ]
    reference = [o.clone(memory_format=torch.contiguous_format) for o in out]
    ops.combine(inputs, 3, weights, out, accumulate=True)
    ops.combine(inputs, 3, weights, reference, accumulate=True)
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine_weights_beyond_float32s_range(dtype: torch.dtype, accumulate: bool) -> None:
    # Weights 1e60 and 1e-60 are summed in fp64; products with rows of 1e-30 and 1e30 fit.
    gen = torch.Generator().manual_seed(16)
    n = 20000
    masks = torch.rand(3, n, generator=gen) < torch.tensor([[0.3], [0.5], [0.7]])
    J = torch.randn(3, n, generator=gen, dtype=torch.float64) * masks
    if dtype != torch.float16:
        J[0] *= 1e-30
        J[1] *= 1e30
    weights = torch.tensor([1e60, -1e-60, 1.0], dtype=torch.float64)
    grads = [J[t].to(dtype) for t in range(3)]
    out = [torch.ones(n, dtype=dtype, device="cuda")]
    ops.combine(cuda(grads), 3, weights.cuda(), out, accumulate=accumulate)
    on_cpu = ops.combine(grads, 3, weights, [torch.ones(n, dtype=dtype)], accumulate=accumulate)
    got = out[0].cpu().double()
    exact = weights @ task_matrix(grads, 3) + float(accumulate)
    expected = exact.to(dtype).double()
    assert not got.isnan().any()
    assert torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    scale = (weights.abs() @ task_matrix(grads, 3).abs() + float(accumulate))[finite]
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
    finfo = torch.finfo(dtype)
    assert ((got - exact)[finite].abs() <= rtol * scale + finfo.smallest_normal * finfo.eps).all()
    assert torch.equal(got.isfinite(), on_cpu[0].double().isfinite())
    torch.testing.assert_close(got[finite], on_cpu[0].double()[finite], rtol=rtol, atol=0)


def test_pcgrad_on_badly_scaled_rows_on_cuda() -> None:
    from mtlgrad.aggregators import PCGrad

    gen = torch.Generator().manual_seed(17)
    J = torch.randn(3, 2000, generator=gen, dtype=torch.float64)
    J[1] = -J[0] + 0.3 * J[1]
    J[2] = -0.5 * J[1] + J[2]
    J = (
        J
        / J.norm(dim=1, keepdim=True)
        * torch.tensor([[1e30], [1e-30], [1.0]], dtype=torch.float64)
    )
    J = J.float()
    on_gpu = PCGrad(generator=torch.Generator().manual_seed(0))(J.cuda()).cpu().double()
    reference = PCGrad(generator=torch.Generator().manual_seed(0))(J.double())
    assert torch.isfinite(on_gpu).all()
    assert (on_gpu - reference).norm() <= 1e-5 * reference.norm()


def test_combine_deterministic() -> None:
    grads = cuda(random_task_grads([(300_001,)], 8, seed=7))
    weights = torch.rand(8, dtype=torch.float64, device="cuda")
    first = ops.combine(grads, 8, weights)[0]
    assert torch.equal(ops.combine(grads, 8, weights)[0], first)


def test_combine_weights_on_another_device_are_rejected() -> None:
    grads = cuda(random_task_grads([(10,)], 2))
    with pytest.raises(ValueError, match="weights are on cpu"):
        ops.combine(grads, 2, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("cls", gram_aggregator_classes(), ids=lambda c: c.__name__)
def test_aggregators_on_cuda_match_cpu(cls) -> None:
    # 6 rows: also 2 sub-batches of 3 tasks for the double-sampling methods.
    J = torch.randn(6, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    on_cpu = make_aggregator(cls, tasks=6)(J)
    on_gpu = make_aggregator(cls, tasks=6)(J.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("aggregator", [Sum(), Mean()], ids=repr)
def test_training_step_on_cuda_matches_cpu(engine: str, aggregator) -> None:
    x, y = batch(0)
    on_cpu, on_gpu = TwoHeadNet(), TwoHeadNet().cuda()
    for model, (xb, yb) in ((on_cpu, (x, y)), (on_gpu, (x.cuda(), y.cuda()))):
        _, outputs = model(xb)
        mtlgrad.backward(
            task_losses(outputs, yb),
            shared_params=model.trunk.parameters(),
            aggregator=aggregator,
            engine=engine,
        )
    for p, q in zip(on_cpu.parameters(), on_gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_a_gram_step_synchronises_once(engine: str) -> None:
    # G, the non-finite flags and the losses come to the host in one transfer; the weights go
    # back without a wait; nothing else in the step reads the device.
    import warnings

    from mtlgrad.aggregators import UPGrad

    model = TwoHeadNet().cuda()
    x, y = (t.cuda() for t in batch(3))
    losses = task_losses(model(x)[1], y)
    heads = [list(h.parameters()) for h in model.heads]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            record = mtlgrad.backward(
                losses,
                shared_params=model.trunk.parameters(),
                task_params=heads,
                aggregator=UPGrad(),
                engine=engine,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs
    assert record.gram.device.type == "cpu" and record.losses.device.type == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_graddrop_matches_cpu(dtype: torch.dtype, num_tasks: int) -> None:
    # Same Philox uniforms on both devices: the kept signs agree exactly, so the results agree
    # up to the rounding of the sums.
    grads = random_task_grads(ODD_SHAPES, num_tasks, dtype, seed=num_tasks)
    leak = torch.linspace(0, 1, num_tasks, dtype=torch.float64)
    on_cpu = ops.graddrop(grads, num_tasks, leak, seed=1234)
    on_gpu = ops.graddrop(cuda(grads), num_tasks, leak.cuda(), seed=1234)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-5)
    for a, b in zip(on_cpu, on_gpu):
        torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tolerance, atol=tolerance)


def test_graddrop_deterministic_and_nonfinite_leaves_out_untouched() -> None:
    grads = cuda(random_task_grads([(100_003,), (9,)], 3, seed=10))
    first = ops.graddrop(grads, 3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(ops.graddrop(grads, 3, seed=7), first))
    grads[1 * 2 + 0][17] = float("nan")
    out = [torch.full_like(g, 5.0) for g in grads[:2]]
    with pytest.raises(ops.NonFiniteGradientError):
        ops.graddrop(grads, 3, seed=7, out=out)
    assert all((o == 5.0).all() for o in out)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_gram_engine_on_cuda_equals_the_loop_engine(name: str) -> None:
    """G on the device, one transfer to the host, then one backward: the same G and .grad as
    the loop engine on the same device, in float64."""
    import test_gram_engine as cases

    from mtlgrad.aggregators import UPGrad

    results = []
    for engine_name in ("loop", "gram"):
        model = cases.build(name).cuda()
        engine = mtlgrad.GramEngine(model) if engine_name == "gram" else "loop"
        x = cases.inputs(name).cuda()
        outputs = model(x)
        y = torch.randn(
            outputs[0].shape[0], len(outputs), generator=cases.gen(1), dtype=torch.float64
        ).cuda()
        losses = [((o - y[:, t]) ** 2).mean() * (t + 1) for t, o in enumerate(outputs)]
        record = mtlgrad.backward(
            losses, shared_params=cases.shared_of(model), aggregator=UPGrad(), engine=engine
        )
        results.append((record, [p.grad for p in model.parameters()]))
    (loop, loop_grads), (gram, gram_grads) = results
    scale = float(loop.gram.abs().max())
    torch.testing.assert_close(gram.gram, loop.gram, rtol=0, atol=1e-10 * scale)
    for a, b in zip(gram_grads, loop_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.device.type == "cuda"
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
