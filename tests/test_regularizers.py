"""mtlgrad.regularizers against float64 references: hand-computed norms, the proximal operators'
optimality (subgradient conditions and perturbations), exact row sparsity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mtlgrad.regularizers import (
    block_sparse_norm,
    l2_coupling,
    prox_block_sparse,
    stack_task_weights,
    trace_norm,
)

F64 = torch.float64


def test_block_sparse_norm_hand_computed():
    W = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 2.0]], dtype=F64)
    assert block_sparse_norm(W).item() == pytest.approx(5.0 + 0.0 + math.sqrt(5.0), rel=1e-15)
    assert block_sparse_norm(W, q=math.inf).item() == pytest.approx(4.0 + 0.0 + 2.0)
    assert block_sparse_norm(W, q=1).item() == pytest.approx(7.0 + 0.0 + 3.0)
    assert block_sparse_norm(W, q=3).item() == pytest.approx(91 ** (1 / 3) + 9 ** (1 / 3))


def objective(P: torch.Tensor, W: torch.Tensor, step: float, q: float) -> float:
    return float(0.5 * (P - W).pow(2).sum() + step * block_sparse_norm(P, q))


def random_matrix(seed: int, d: int = 12, T: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, T, generator=g, dtype=F64)
    W[::3] *= 0.1  # small rows, thresholded to zero
    return W


@pytest.mark.parametrize("q", [2, math.inf, 1])
@pytest.mark.parametrize("seed", range(4))
def test_prox_minimises_the_objective(q, seed):
    W = random_matrix(seed)
    step = 0.6
    P = prox_block_sparse(W, step, q)
    best = objective(P, W, step, q)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(200):
        scale = 10 ** torch.empty(1).uniform_(-6, 0, generator=g).item()
        direction = torch.randn(W.shape, generator=g, dtype=F64)
        assert objective(P + scale * direction, W, step, q) >= best - 1e-13
        # Perturbing only the zero rows must not help either.
        zero = P.abs().sum(dim=1) == 0
        sparse_direction = direction * zero.unsqueeze(1)
        assert objective(P + scale * sparse_direction, W, step, q) >= best - 1e-13


def test_prox_l2_optimality_conditions_and_exact_zero_rows():
    W = random_matrix(0)
    step = 0.6
    P = prox_block_sparse(W, step, 2)
    norms = W.norm(dim=1)
    for i in range(W.shape[0]):
        if norms[i] <= step:
            # 0 ∈ P_i - W_i + step ∂||0||: ||W_i|| <= step, and the row is exactly zero.
            assert torch.equal(P[i], torch.zeros_like(P[i]))
        else:
            # P_i - W_i + step P_i / ||P_i|| = 0.
            residual = P[i] - W[i] + step * P[i] / P[i].norm()
            torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-14, rtol=0)
    assert (P.abs().sum(dim=1) == 0).sum() >= 3  # the scaled-down rows


def test_prox_linf_optimality_conditions():
    W = random_matrix(1)
    step = 0.6
    P = prox_block_sparse(W, step, math.inf)
    for i in range(W.shape[0]):
        residual = W[i] - P[i]  # must be step times a subgradient of ||·||_∞ at P_i
        if W[i].abs().sum() <= step:
            assert torch.equal(P[i], torch.zeros_like(P[i]))
            continue
        assert residual.abs().sum().item() == pytest.approx(step, rel=1e-12)  # ||v||_1 = 1
        m = P[i].abs().max()
        for j in range(W.shape[1]):
            if residual[j].abs() > 1e-14:  # support on the maximal entries, with their sign
                assert P[i, j].abs().item() == pytest.approx(m.item(), rel=1e-12)
                assert torch.sign(residual[j]) == torch.sign(P[i, j])


def test_prox_hand_computed():
    W = torch.tensor([[3.0, 4.0], [0.3, 0.4], [2.0, -0.5]], dtype=F64)
    # q = 2, step 1: row 0 scaled by 1 - 1/5, row 1 (norm 0.5) zero.
    expected = torch.tensor([[2.4, 3.2], [0.0, 0.0], [2.0, -0.5]], dtype=F64)
    expected[2] *= 1 - 1 / math.sqrt(4.25)
    torch.testing.assert_close(prox_block_sparse(W, 1.0, 2), expected, rtol=1e-15, atol=0)
    # q = inf, step 1: row 0 clipped at θ with (3 - θ) + (4 - θ) = 1 → θ = 3; row 1 (l1 norm
    # 0.7 <= 1) zero; row 2: (2 - θ) = 1 → θ = 1 (|-0.5| < 1 is kept).
    expected = torch.tensor([[3.0, 3.0], [0.0, 0.0], [1.0, -0.5]], dtype=F64)
    torch.testing.assert_close(prox_block_sparse(W, 1.0, math.inf), expected, rtol=1e-15, atol=0)
    # step 0 is the identity.
    torch.testing.assert_close(prox_block_sparse(W, 0.0, 2), W)
    torch.testing.assert_close(prox_block_sparse(W, 0.0, math.inf), W)


def test_prox_float32_zero_rows_are_exact():
    W = random_matrix(2).float()
    for q in (2, math.inf):
        P = prox_block_sparse(W, 0.6, q)
        dual = 2 if q == 2 else 1
        small = W.norm(p=dual, dim=1) <= 0.6
        assert small.any()
        assert (P[small] == 0).all()
        assert P.dtype == torch.float32


def test_prox_errors():
    W = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"q must be 1, 2 or math.inf .* got 3.0"):
        prox_block_sparse(W, 0.1, q=3)
    with pytest.raises(ValueError, match="step must be a finite number >= 0"):
        prox_block_sparse(W, -1.0)
    with pytest.raises(ValueError, match=r"d x T matrix .* got \[3\]"):
        prox_block_sparse(torch.ones(3), 0.1)
    W_bad = torch.ones(4, 2)
    W_bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in rows \[2\]"):
        prox_block_sparse(W_bad, 0.1)
    with pytest.raises(ValueError, match="q must be a number >= 1"):
        block_sparse_norm(W, q=0.5)


def test_stack_task_weights():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    W = stack_task_weights([a, b])
    assert W.shape == (6, 2)
    torch.testing.assert_close(W[:, 1], b.reshape(-1))
    with pytest.raises(
        ValueError, match=r"task 2 has shape \[3, 2\] but task 0 has shape \[2, 3\]"
    ):
        stack_task_weights([a, b, torch.randn(3, 2)])
    with pytest.raises(ValueError, match="no tensors"):
        stack_task_weights([])
    with pytest.raises(TypeError, match="task 1 is torch.float64"):
        stack_task_weights([a, b.double()])


def test_couplings_match_references():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=g, dtype=F64) for _ in range(4)]
    pairs = sum(float(((u - v) ** 2).sum()) for u, v in itertools.combinations(ws, 2))
    assert l2_coupling(ws).item() == pytest.approx(pairs, rel=1e-12)
    M = torch.stack([w.reshape(-1) for w in ws])
    nuclear = float(torch.linalg.eigvalsh(M @ M.T).clamp_min(0).sqrt().sum())
    assert trace_norm(ws).item() == pytest.approx(nuclear, rel=1e-12)
    # Rank one across tasks: the trace norm is the Frobenius norm.
    base = torch.randn(3, 4, generator=g, dtype=F64)
    scaled = [base, 2 * base, -base]
    assert trace_norm(scaled).item() == pytest.approx(float(torch.stack(scaled).norm()), rel=1e-12)


def test_trace_norm_gradient_is_u_vt():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(5, generator=g, dtype=F64, requires_grad=True) for _ in range(3)]
    trace_norm(ws).backward()
    U, _, Vh = torch.linalg.svd(torch.stack([w.detach() for w in ws], dim=1), full_matrices=False)
    expected = U @ Vh  # 5 x 3, column t = task t
    for t, w in enumerate(ws):
        torch.testing.assert_close(w.grad, expected[:, t])
