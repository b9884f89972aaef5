from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_permutation_invariant,
    matrices,
    matrix_ids,
)

from mtlgrad import ops
from mtlgrad.aggregators import TrimmedMean, _trimmed_mean


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_trimmed_mean(J: torch.Tensor, b: int) -> torch.Tensor:
    """Yin et al. (2018), Definition 2, coordinate by coordinate in float64: drop the b largest
    and b smallest of the T values, average the others."""
    T, P = J.shape
    out = torch.empty(P, dtype=torch.float64)
    for p in range(P):
        values = sorted(J[:, p].double().tolist())
        kept = values[b : T - b]
        out[p] = sum(kept) / len(kept)
    return out


@pytest.mark.parametrize("J", matrices((1, 3, 8)), ids=matrix_ids((1, 3, 8)))
def test_properties(J: torch.Tensor) -> None:
    agg = TrimmedMean((J.shape[0] - 1) // 2)
    assert_finite_and_shaped(agg, J)
    assert_permutation_invariant(agg, J, rtol=1e-12)
    assert_linear_under_scaling(agg, J)
    torch.testing.assert_close(agg(J), reference_trimmed_mean(J, agg.trim_number))


@pytest.mark.parametrize("T,b", [(3, 0), (3, 1), (5, 2), (8, 1), (8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_matches_the_paper(T: int, b: int, dtype: torch.dtype, scale: float) -> None:
    if dtype == torch.bfloat16 and scale != 1.0:
        pytest.skip("bfloat16 holds neither 1e-30 nor 1e30 values well enough to compare")
    J = (torch.randn(T, 70, generator=gen(T + b), dtype=torch.float64) * scale).to(dtype)
    d = TrimmedMean(b)(J)
    assert d.dtype == dtype
    rtol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}[dtype]
    expected = reference_trimmed_mean(J, b)
    torch.testing.assert_close(d.double(), expected, rtol=rtol, atol=rtol * scale)


def test_removes_an_outlier_in_every_coordinate() -> None:
    J = torch.randn(7, 20, generator=gen(1), dtype=torch.float64)
    J[3] = 1e6
    J[5] = -1e6
    assert float(TrimmedMean(1)(J).abs().max()) < 10


def test_task_major_lists_chunks_outputs_and_accumulate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several tensors per task, chunks smaller than a tensor, out= and accumulate=.
    monkeypatch.setattr(_trimmed_mean, "_CHUNK_VALUES", 17)
    T, shapes = 5, [(3, 4), (10,), (2, 3, 5)]
    grads = [
        torch.randn(s, generator=gen(10 * t + k)) for t in range(T) for k, s in enumerate(shapes)
    ]
    K = len(shapes)
    expected = [
        reference_trimmed_mean(torch.stack([grads[t * K + k].reshape(-1) for t in range(T)]), 2)
        .float()
        .view(shapes[k])
        for k in range(K)
    ]
    agg = TrimmedMean(2)
    result = agg.aggregate(grads, T)
    assert result.weights is None and result.gram is None
    for r, e in zip(result.out, expected):
        torch.testing.assert_close(r, e)
    out = [torch.ones(s) for s in shapes]
    written = agg.aggregate(grads, T, [out[0], None, out[2]], accumulate=True).out
    assert written[0] is out[0] and written[2] is out[2]
    for r, e in zip(written, [expected[0] + 1, expected[1], expected[2] + 1]):
        torch.testing.assert_close(r, e)


def test_non_finite_gradients_name_the_task_and_parameter() -> None:
    grads = [torch.randn(4) for _ in range(6)]  # T = 3, K = 2
    grads[3] = grads[3].clone()
    grads[3][1] = float("inf")
    out = [torch.zeros(4), torch.zeros(4)]
    with pytest.raises(ops.NonFiniteGradientError, match="task 'b': parameter 'w'"):
        TrimmedMean(1).aggregate(grads, 3, out, names=["v", "w"], task_names=["a", "b", "c"])
    assert all((o == 0).all() for o in out)  # nothing written
    skipped = TrimmedMean(1).aggregate(grads, 3, out, scale=1024.0)
    assert skipped.skipped and all(o.isnan().all() for o in out)


def test_scaled_gradients_give_the_scaled_update() -> None:
    J = torch.randn(5, 30, generator=gen(3))
    result = TrimmedMean(1).aggregate(list((J * 512).unbind(0)), 5, scale=512.0)
    assert not result.skipped
    torch.testing.assert_close(result.out[0], TrimmedMean(1)(J) * 512)


@pytest.mark.parametrize("T,b", [(3, 1), (5, 0), (8, 3)])
def test_matches_torchjd(T: int, b: int) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = torch.randn(T, 300, generator=gen(T), dtype=torch.float64)
    torch.testing.assert_close(
        TrimmedMean(b)(J), torchjd_aggregation.TrimmedMean(b)(J), rtol=1e-13, atol=1e-15
    )


def test_bad_arguments() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="trim_number must be a non-negative int"):
            TrimmedMean(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2 \* trim_number \+ 1 = 5 tasks, got 4"):
        TrimmedMean(2)(torch.randn(4, 3))
    with pytest.raises(TypeError, match="mixed dtypes: tensor 0 of task 1"):
        TrimmedMean(0).aggregate([torch.randn(3), torch.randn(3, dtype=torch.float64)], 2)
    with pytest.raises(ValueError, match="tensor 0 of task 1 has shape"):
        TrimmedMean(0).aggregate([torch.randn(3), torch.randn(4)], 2)
    with pytest.raises(ValueError, match="output 0"):
        TrimmedMean(0).aggregate([torch.randn(3), torch.randn(3)], 2, [torch.zeros(4)])
    with pytest.raises(ValueError, match="got 2 task names for 3 tasks"):
        TrimmedMean(1).aggregate([torch.randn(3)] * 3, 3, task_names=["a", "b"])


def test_repr_and_state() -> None:
    assert repr(TrimmedMean(2)) == "TrimmedMean(trim_number=2)"
    assert TrimmedMean(1).state_dict() == {}
    assert not hasattr(TrimmedMean(1), "weights")
