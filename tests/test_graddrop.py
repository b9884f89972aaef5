from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_owns_its_generator,
    matrices,
    matrix_ids,
)
from conftest import random_task_grads, task_matrix

from mtlgrad import NonFiniteGradientError, ops
from mtlgrad.aggregators import GradDrop

MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 (Salmon et al., 2011), written from the Random123 specification."""
    c, k = list(counter), list(key)
    for round_ in range(10):
        if round_:
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK32]
    return c


def uniforms(seed: int, numel: int) -> torch.Tensor:
    """GradDrop's U for elements 0..numel-1: word e mod 4 of Philox with key seed and counter
    (0, 0, e // 4), as (word >> 8) · 2⁻²⁴ (float64, exact)."""
    key = [seed & MASK32, seed >> 32]
    words = []
    for block in range((numel + 3) // 4):
        words += philox4x32_10([0, 0, block & MASK32, block >> 32], key)
    return torch.tensor(words[:numel], dtype=torch.float64).div(256).floor().mul(2.0**-24)


def reference_graddrop(J: torch.Tensor, leak: list[float], U: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Chen et al. (2020) on J (T x P) with the given uniforms, sums over the
    tasks in order in the kernel's accumulation type (fp32 for 16/32-bit input, else fp64)."""
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    Jc = J.to(acc)
    S, A = torch.zeros_like(Jc[0]), torch.zeros_like(Jc[0])
    for g in Jc:
        S, A = S + g, A + g.abs()
    P = torch.where(A > 0, 0.5 * (1 + S / torch.where(A > 0, A, 1)), 0.5)
    keep_positive = U.to(acc) < P
    out = torch.zeros_like(Jc[0])
    for g, ell in zip(Jc, leak):
        M = torch.where(keep_positive, g > 0, g < 0)
        out = out + torch.where(M, g, ell * g)
    return out.to(J.dtype)


def test_philox_known_answers() -> None:
    # Random123's kat_vectors for philox4x32 with 10 rounds.
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([MASK32] * 4, [MASK32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for counter, key, expected in cases:
        assert philox4x32_10(counter, key) == expected


SHAPES = [(3, 5), (7,), (1,), (2, 3, 2), (0,), (9,)]  # tensor boundaries off the blocks of 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 64])
def test_matches_the_reference(T: int, dtype: torch.dtype) -> None:
    grads = random_task_grads(SHAPES, T, dtype=dtype, seed=T)
    leak = ([0.0, 0.25, 1.0, 0.5, 0.0, 0.1, 0.9, 0.3] * 8)[:T]
    seed = 0x1234_5678_9ABC_DEF1
    out = ops.graddrop(grads, T, leak, seed)
    J = task_matrix(grads, T).to(dtype)
    expected = reference_graddrop(J, leak, uniforms(seed, J.shape[1]))
    got = torch.cat([o.reshape(-1) for o in out])
    rtol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol)


def test_large_tensors_and_thread_count() -> None:
    # Spread over threads in blocks that do not align with tensors or Philox blocks: the result
    # must be the same bits whatever the thread count.
    T = 4
    grads = random_task_grads([(70001,), (3,), (40000,)], T, seed=1)
    seed = 2**62 - 3
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 3, max(previous, 2)):
            torch.set_num_threads(threads)
            results.append(torch.cat([o.reshape(-1) for o in ops.graddrop(grads, T, None, seed)]))
    finally:
        torch.set_num_threads(previous)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    J = task_matrix(grads, T).float()
    U = uniforms(seed, 4000)  # the first blocks against the Python Philox
    torch.testing.assert_close(
        results[0][:4000], reference_graddrop(J[:, :4000], [0.0] * T, U), rtol=1e-6, atol=1e-6
    )


def test_keeps_the_positive_sign_with_probability_p() -> None:
    # g_1 = 1, g_2 = −1/3 everywhere: P = ½ (1 + (2/3) / (4/3)) = 0.75.
    n = 40000
    grads = [torch.ones(n), torch.full((n,), -1 / 3)]
    (out,) = ops.graddrop(grads, 2, None, 7)
    positive = (out == 1).double().mean()
    assert ((out == 1) | (out == grads[1])).all()
    assert abs(float(positive) - 0.75) < 0.01


def test_leak() -> None:
    grads = random_task_grads([(500,)], 3, seed=2)
    J = task_matrix(grads, 3).float()
    (everything,) = ops.graddrop(grads, 3, [1.0, 1.0, 1.0], 5)
    torch.testing.assert_close(everything, J.sum(0))  # leak 1 for all: the plain sum
    (dropped,) = ops.graddrop(grads, 3, None, 5)
    (partial,) = ops.graddrop(grads, 3, [1.0, 0.0, 0.0], 5)
    # Leak 1 for task 0 brings back exactly its dropped values.
    diff = partial - dropped
    back = diff != 0
    assert back.any() and (~back).any()
    torch.testing.assert_close(diff[back], J[0][back])
    assert (torch.sign(J[0][back]) != torch.sign(dropped[back])).all()


def test_out_may_alias_an_input_or_be_strided() -> None:
    grads = random_task_grads([(4, 6), (5,)], 3, seed=3)
    expected = ops.graddrop(grads, 3, [0.2, 0.0, 0.7], 11)
    aliased = [g.clone() for g in grads]
    ops.graddrop(aliased, 3, [0.2, 0.0, 0.7], 11, out=aliased[:2])  # over task 0's gradients
    for a, e in zip(aliased[:2], expected):
        assert torch.equal(a, e)
    strided = [torch.empty(6, 4).t(), torch.empty(10)[::2]]
    ops.graddrop(grads, 3, [0.2, 0.0, 0.7], 11, out=strided)
    for s, e in zip(strided, expected):
        assert torch.equal(s, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonfinite_gradients_are_found(dtype: torch.dtype) -> None:
    grads = random_task_grads([(40,), (3000,), (5,)], 3, dtype=dtype, seed=6)
    grads[4][2999] = float("inf")  # task 1, tensor 1
    grads[6][7] = float("-inf")  # task 2, tensor 0
    grads[8][0] = float("nan")  # task 2, tensor 2
    with pytest.raises(NonFiniteGradientError) as info:
        ops.graddrop(grads, 3)
    assert info.value.tasks == [1, 2] and info.value.tensor_indices == [1, 0]
    grads[4][2999] = torch.finfo(dtype).max  # large but finite
    grads[6][7] = grads[8][0] = 0
    ops.graddrop(grads, 3)


def test_nonfinite_gradients_raise_before_writing() -> None:
    grads = random_task_grads([(4,), (6,)], 2, seed=4)
    grads[3][2] = float("nan")  # task 1, tensor 1
    out = [torch.zeros(4), torch.zeros(6)]
    with pytest.raises(NonFiniteGradientError, match="task 1: parameter 'b'") as info:
        ops.graddrop(grads, 2, None, 0, out=out, names=["a", "b"])
    assert info.value.tasks == [1] and info.value.tensor_indices == [1]
    assert all((o == 0).all() for o in out)
    grads[3][2] = float("inf")
    with pytest.raises(NonFiniteGradientError):
        GradDrop().aggregate(grads, 2, out=out)
    assert all((o == 0).all() for o in out)
    unchecked = ops.graddrop(grads, 2, None, 0, check_finite=False)
    assert not torch.isfinite(unchecked[1][2])


def test_bad_arguments() -> None:
    grads = random_task_grads([(4,)], 2)
    with pytest.raises(ValueError, match=r"leak must have shape \[2\]"):
        ops.graddrop(grads, 2, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"leak\[1\] = 1.5 is outside \[0, 1\]"):
        ops.graddrop(grads, 2, [0.0, 1.5])
    with pytest.raises(ValueError, match="seed must be an int"):
        ops.graddrop(grads, 2, None, -1)
    with pytest.raises(ValueError, match="tensor 0 of task 1 has shape"):
        ops.graddrop([torch.ones(4), torch.ones(5)], 2)
    with pytest.raises(ValueError, match="output 0 has shape"):
        ops.graddrop(grads, 2, out=[torch.empty(3)])
    with pytest.raises(TypeError, match="mixed dtypes"):
        ops.graddrop([torch.ones(4), torch.ones(4, dtype=torch.float64)], 2)


# ---- the aggregator ----------------------------------------------------------------------------


def seeded(seed: int = 0, leak: list[float] | None = None) -> GradDrop:
    return GradDrop(leak=leak, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    d = assert_finite_and_shaped(seeded(), J)
    # Linear under scaling for a given seed (P and the masks are scale-free).
    torch.testing.assert_close(seeded(3)(7.0 * J), 7.0 * seeded(3)(J))
    # Without leak every value is the sum of the positive or of the negative task values.
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    scale = float(J.abs().max()) or 1.0
    close = lambda a, b: torch.isclose(a, b, rtol=1e-12, atol=1e-12 * scale)  # noqa: E731
    assert (close(d, positive) | close(d, negative)).all()


def test_aggregator_matches_the_op_with_its_seed() -> None:
    J = torch.randn(3, 1000, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))  # what draw_seed takes from g
    expected = ops.graddrop(list(J.unbind(0)), 3, [0.5, 0.0, 0.0], seed)[0]
    torch.testing.assert_close(seeded(9, [0.5, 0.0, 0.0])(J), expected, rtol=0, atol=0)


def test_seeded_runs_reproduce_and_differ_per_call() -> None:
    J = torch.randn(4, 500)
    a, b = seeded(5), seeded(5)
    first = a(J)
    assert torch.equal(first, b(J))
    assert not torch.equal(first, a(J))


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(seeded()(J), J[0])


def test_constructor_checks_and_repr() -> None:
    assert repr(GradDrop()) == "GradDrop()"
    assert repr(GradDrop(leak=[0.0, 0.5])) == "GradDrop(leak=[0.0, 0.5])"
    with pytest.raises(ValueError, match=r"leak values must lie in \[0, 1\]"):
        GradDrop(leak=[0.0, -1.0])
    with pytest.raises(ValueError, match="non-empty sequence"):
        GradDrop(leak=[[0.0]])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        GradDrop(generator=1)
    with pytest.raises(ValueError, match="2 leak values but got 3 tasks"):
        GradDrop(leak=[0.0, 0.0])(torch.randn(3, 4))
    assert GradDrop().state_dict().keys() == {"generator"}


def test_owns_its_generator() -> None:
    assert_owns_its_generator(
        GradDrop, torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    )


def test_matches_torchjd_with_the_same_uniforms(monkeypatch: pytest.MonkeyPatch) -> None:
    # TorchJD draws U with torch.rand; hand it ours and the results must agree.
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(4, 2000, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    leak = [0.0, 0.3, 0.0, 1.0]
    seed = 77
    U = uniforms(seed, J.shape[1])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: U.clone())
    expected = torchjd_aggregation.GradDrop(leak=torch.tensor(leak, dtype=torch.float64))(J)
    monkeypatch.undo()
    got = ops.graddrop(list(J.unbind(0)), 4, leak, seed)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---- dispatcher checks -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype: torch.dtype) -> None:
    grads = random_task_grads([(3, 4), (7,)], 3, dtype=dtype)
    out = [torch.empty(3, 4, dtype=dtype), torch.empty(7, dtype=dtype)]
    leak = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.mtlgrad.graddrop.default, (grads, 3, leak, 42, True, out))


def test_compile_fullgraph() -> None:
    def step(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return ops.graddrop(grads, 2, [0.0, 0.5], 3, check_finite=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = random_task_grads([(30, 4), (5,)], 2)
    for e, g in zip(step(grads), compiled(grads)):
        assert torch.equal(g, e)
