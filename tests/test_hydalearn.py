from __future__ import annotations

import pytest
import torch
from aggregator_checks import (
    assert_finite_and_shaped,
    assert_linear_under_scaling,
    assert_matrix_call_is_weighted_sum,
    matrices,
    matrix_ids,
    scale_of,
)

from mtlgrad.aggregators import HydaLearn


def reference_hydalearn(J: torch.Tensor, main: int, lr: float = 1e-6) -> torch.Tensor:
    """Weights proportional to the main-task gain of a trial step −η g_k on the linear model
    L_main(θ) = g_mainᵀθ (exactly the first-order gain), clipped at 0 and summing to 1."""
    theta = torch.zeros(J.shape[1], dtype=torch.float64)

    def main_loss(t: torch.Tensor) -> torch.Tensor:
        return J[main] @ t

    gains = torch.stack([main_loss(theta) - main_loss(theta - lr * J[k]) for k in range(len(J))])
    gains = gains.clamp_min(0)
    if gains.sum() == 0:
        return torch.nn.functional.one_hot(torch.tensor(main), len(J)).double()
    return gains / gains.sum()


@pytest.mark.parametrize("J", matrices(), ids=matrix_ids())
def test_properties(J: torch.Tensor) -> None:
    main = J.shape[0] // 2
    agg = HydaLearn(main=main)
    d = assert_finite_and_shaped(agg, J)
    assert_linear_under_scaling(agg, J)
    assert_matrix_call_is_weighted_sum(lambda: HydaLearn(main), J)
    w = agg.weights(J @ J.T)
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    # Never conflicts with the main task.
    assert J[main] @ d >= -1e-12 * scale_of(J) ** 2
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(1))
    permuted = HydaLearn(main=int((perm == main).nonzero()))(J[perm])
    torch.testing.assert_close(permuted, d, rtol=1e-7, atol=1e-7 * scale_of(J))


@pytest.mark.parametrize("T", [2, 3, 8, 64])
def test_matches_the_gains(T: int) -> None:
    J = torch.randn(T, 50, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    for main in {0, T // 2, T - 1}:
        torch.testing.assert_close(
            HydaLearn(main).weights(J @ J.T), reference_hydalearn(J, main), rtol=1e-9, atol=1e-12
        )


def test_ratios_are_the_gain_ratios() -> None:
    J = torch.tensor([[2.0, 0.0], [1.0, 1.0], [3.0, -5.0], [-1.0, 0.0]], dtype=torch.float64)
    # gains g_0ᵀg_k = 4, 2, 6, −2  ->  4 : 2 : 6 : 0
    torch.testing.assert_close(
        HydaLearn(0).weights(J @ J.T), torch.tensor([4, 2, 6, 0], dtype=torch.float64) / 12
    )


def test_zero_main_gradient() -> None:
    J = torch.randn(3, 10, dtype=torch.float64)
    J[1] = 0
    torch.testing.assert_close(
        HydaLearn(1).weights(J @ J.T), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    )


def test_single_task_returns_the_gradient() -> None:
    J = torch.randn(1, 100)
    torch.testing.assert_close(HydaLearn()(J), J[0])


def test_checks_and_repr() -> None:
    assert repr(HydaLearn(main=2)) == "HydaLearn(main=2)"
    assert HydaLearn().state_dict() == {}
    with pytest.raises(ValueError, match="main must be a non-negative int"):
        HydaLearn(main=-1)
    with pytest.raises(ValueError, match="HydaLearn: main task 2 is out of range for 2 tasks"):
        HydaLearn(main=2)(torch.randn(2, 5))


def test_opcheck() -> None:
    J = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    torch.library.opcheck(torch.ops.mtlgrad.hydalearn_weights.default, (G, 2))
