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
    with pytest.raises(ValueError, match=r"prox_block_sparse: q must be a number >= 1 .* got 0.5"):
        prox_block_sparse(W, 0.1, q=0.5)
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


# General q: references written from the definitions, independently of the library.
LQ = [1.5, 3, 4.5]


def lq_norms(P: torch.Tensor, q: float) -> torch.Tensor:
    """Row lq norms, entries of moderate size (no scaling needed)."""
    return P.abs().pow(q).sum(dim=1).pow(1 / q)


def lq_gradient(p: torch.Tensor, q: float) -> torch.Tensor:
    """∇||p||_q = sign(p) |p|^(q-1) / ||p||_q^(q-1) for p != 0, scale-free, so computed on
    p / max|p| (rows near the threshold have tiny p)."""
    p = p / p.abs().max()
    return p.sign() * p.abs().pow(q - 1) / lq_norms(p[None], q)[0] ** (q - 1)


def lq_objective(P: torch.Tensor, W: torch.Tensor, step: float, q: float) -> float:
    return float(0.5 * (P - W).pow(2).sum() + step * lq_norms(P, q).sum())


def lq_matrix(seed: int, q: float, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 14 x 4 matrix whose rows have dual norms ||W_i||_{q*} = ratio_i * step, ratios spanning
    far below, just below, just above and far above the threshold; returns W and the ratios."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(14, 4, generator=g, dtype=F64)
    W[3, 1] = 0.0  # a zero entry in a kept row
    dual = q / (q - 1)
    ratios = torch.tensor(
        [0.2, 0.9, 1 - 1e-9, 1 + 1e-9, 1 + 1e-6, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0, 1e3, 0.5, 1e6],
        dtype=F64,
    )
    W = W * (ratios * step / lq_norms(W, dual)).unsqueeze(1)
    return W, ratios


@pytest.mark.parametrize("q", LQ)
@pytest.mark.parametrize("seed", range(3))
def test_prox_lq_zero_rows_exactly_at_the_dual_threshold(q, seed):
    step = 0.7
    W, ratios = lq_matrix(seed, q, step)
    P = prox_block_sparse(W, step, q)
    zero = lq_norms(W, q / (q - 1)) <= step
    assert torch.equal(zero, ratios < 1)  # the construction is far from rounding
    for i in range(W.shape[0]):
        if zero[i]:
            assert torch.equal(P[i], torch.zeros_like(P[i]))
        else:  # sign(P) = sign(W) entrywise, every nonzero entry kept (x != 0 there)
            assert torch.equal(P[i].sign(), W[i].sign())


@pytest.mark.parametrize("q", LQ)
@pytest.mark.parametrize("seed", range(3))
def test_prox_lq_optimality_condition(q, seed):
    step = 0.7
    W, _ = lq_matrix(seed, q, step)
    P = prox_block_sparse(W, step, q)
    for i in range(W.shape[0]):
        if (P[i] == 0).all():
            # 0 is optimal iff (W_i - 0) / step lies in the dual unit ball.
            assert lq_norms(W[i : i + 1], q / (q - 1)).item() <= step
            continue
        gradient = lq_gradient(P[i], q)
        residual = (W[i] - P[i]) / step - gradient
        # Relative to the gradient (||(W - P) / step||_{q*} = 1), plus the rounding of W - P
        # itself when the row is far above the threshold (P close to W).
        tol = 1e-10 * gradient.abs().max().item() + 1e-15 * W[i].abs().max().item() / step
        assert residual.abs().max().item() <= tol, (i, residual)


@pytest.mark.parametrize("q", LQ)
@pytest.mark.parametrize("seed", range(3))
def test_prox_lq_perturbations_do_not_help(q, seed):
    step = 0.7
    W, _ = lq_matrix(seed, q, step)
    W = W[[0, 1, 3, 4, 6, 8, 12]]  # zero rows, a row near the threshold and ordinary rows
    P = prox_block_sparse(W, step, q)
    best = lq_objective(P, W, step, q)
    g = torch.Generator().manual_seed(200 + seed)
    for _ in range(150):
        scale = 10 ** torch.empty(1).uniform_(-7, 0, generator=g).item()
        direction = torch.randn(W.shape, generator=g, dtype=F64)
        assert lq_objective(P + scale * direction, W, step, q) >= best - 1e-13
        row = torch.zeros_like(direction)
        i = int(torch.randint(W.shape[0], (1,), generator=g))
        row[i] = direction[i]  # one row only, so its change is not drowned by the others
        assert lq_objective(P + scale * row, W, step, q) >= best - 1e-13


@pytest.mark.parametrize("q", [1.01, 1.5, 3, 4.5, 40])
def test_prox_lq_recovers_x_from_its_optimality_condition(q):
    # For any x != 0, v = x + step ∇||x||_q has prox(v) = x: an exact reference.
    g = torch.Generator().manual_seed(7)
    X = torch.randn(6, 5, generator=g, dtype=F64)
    X[1] *= 1e-3
    X[2, 0] = 0.0
    X[3] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    step = 0.4
    V = X + step * torch.stack([lq_gradient(x, q) for x in X])
    P = prox_block_sparse(V, step, q)
    torch.testing.assert_close(P, X, rtol=1e-12, atol=1e-14 * float(V.abs().max()))


def test_prox_lq_hand_computed():
    # Equal entries c in T columns: by symmetry P = (c - step T^(-1/q*)) 1, zero iff
    # ||v||_{q*} = c T^(1/q*) <= step. One column: soft-thresholding for every q.
    q, T, step = 3.0, 4, 0.5
    dual = q / (q - 1)
    W = torch.tensor([[1.0] * T, [-0.1] * T, [0.3] * T], dtype=F64)
    expected = torch.tensor([[1.0 - step * T ** (-1 / dual)] * T, [0.0] * T, [0.0] * T], dtype=F64)
    # ||v||_{q*}: 0.1 * 4^(2/3) = 0.252 <= 0.5 (zero), 0.3 * 4^(2/3) = 0.756 > 0.5 (kept).
    expected[2] = 0.3 - step * T ** (-1 / dual)
    torch.testing.assert_close(prox_block_sparse(W, step, q), expected, rtol=1e-14, atol=1e-15)
    column = torch.tensor([[2.0], [-0.3], [-1.5]], dtype=F64)
    expected = torch.tensor([[1.5], [0.0], [-1.0]], dtype=F64)
    for q in (1.5, 3.0, 7.0):
        torch.testing.assert_close(prox_block_sparse(column, step, q), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(prox_block_sparse(W, 0.0, 3.0), W)


def test_prox_lq_is_continuous_at_q_2():
    W = random_matrix(3)
    closed_form = prox_block_sparse(W, 0.6, 2)
    for q in (2 - 1e-9, 2 + 1e-9):
        torch.testing.assert_close(prox_block_sparse(W, 0.6, q), closed_form, rtol=0, atol=1e-8)
    # And it moves smoothly away from it: O(q - 2), not a jump.
    gap = (prox_block_sparse(W, 0.6, 2 + 1e-4) - closed_form).abs().max().item()
    assert 1e-7 < gap < 1e-3


def test_prox_lq_rows_are_independent_and_scale_covariant():
    W, _ = lq_matrix(1, 3.0, 0.7)
    P = prox_block_sparse(W, 0.7, 3)
    for i in (0, 3, 6, 13):
        torch.testing.assert_close(
            prox_block_sparse(W[i : i + 1], 0.7, 3)[0], P[i], rtol=1e-13, atol=1e-16
        )
    # prox_{s λ}(s W) = s prox_λ(W), far into float64's range (powers of 2: exact scalings).
    for s in (2.0**-500, 2.0**500):
        torch.testing.assert_close(prox_block_sparse(s * W, s * 0.7, 3), s * P, rtol=1e-13, atol=0)


def test_prox_lq_rows_on_the_threshold_to_rounding():
    # ||W_i||_{q*} = step up to rounding: the exact prox has size O(eps) there, or is zero.
    g = torch.Generator().manual_seed(5)
    for q in (1.5, 3.0):
        W = torch.randn(300, 5, generator=g, dtype=F64)
        W = W / lq_norms(W, q / (q - 1)).unsqueeze(1)
        P = prox_block_sparse(W, 1.0, q)
        assert P.abs().max().item() <= 1e-13
        far_below = prox_block_sparse(W * (1 - 1e-12), 1.0, q)
        assert (far_below == 0).all()
        above = prox_block_sparse(W * (1 + 1e-12), 1.0, q)
        assert (above != 0).all() and above.abs().max().item() <= 1e-10


def test_prox_lq_float32():
    W = random_matrix(2).float()
    q, step = 3.0, 0.6
    P = prox_block_sparse(W, step, q)
    assert P.dtype == torch.float32
    small = lq_norms(W.double(), q / (q - 1)) <= step
    assert small.any() and not small.all()
    assert (P[small] == 0).all() and (P[~small] != 0).all()
    torch.testing.assert_close(P, prox_block_sparse(W.double(), step, q).float())


def test_block_sparse_norm_is_safe_for_large_q_and_large_entries():
    # |w|^q overflows here; the norm itself does not.
    W = torch.tensor([[1e200, -1e200], [0.0, 0.0], [3e-200, 4e-200]], dtype=F64, requires_grad=True)
    value = block_sparse_norm(W, q=3)
    expected = 1e200 * 2 ** (1 / 3) + 1e-200 * 91 ** (1 / 3)
    assert value.item() == pytest.approx(expected, rel=1e-14)
    value.backward()
    # The gradient is the norm's: sign(w) |w|^(q-1) / ||w||^(q-1) per row, 0 on a zero row.
    assert torch.isfinite(W.grad).all()
    torch.testing.assert_close(W.grad[0], torch.tensor([1.0, -1.0], dtype=F64) * 2 ** (-2 / 3))
    torch.testing.assert_close(W.grad[1], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(W.grad[2], torch.tensor([9.0, 16.0], dtype=F64) / 91 ** (2 / 3))


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
