"""Deep relationship networks: the tensor-normal penalty and covariance updates against
Kronecker-product references, the learned task covariance, partition, training, state."""

from __future__ import annotations

import copy

import pytest
import torch
from nn_checks import (
    check_gradient_flow,
    check_partition,
    check_step_matches_aggregation,
    regression_losses,
)
from nn_model_checks import check_state_dict_round_trip, check_training_with_model
from torch import nn

from mtlgrad.aggregators import UPGrad
from mtlgrad.nn import DeepRelationshipNetwork
from mtlgrad.regularizers import tensor_normal_covariances, tensor_normal_penalty

TASKS = ["a", "b", "c"]


def make_model(seed: int = 0, **options) -> DeepRelationshipNetwork:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
    heads = {name: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)) for name in TASKS}
    return DeepRelationshipNetwork(trunk, heads, **options).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)


def kron(*matrices: torch.Tensor) -> torch.Tensor:
    result = matrices[0]
    for m in matrices[1:]:
        result = torch.kron(result, m)
    return result


def reference_penalty(weights, covs) -> torch.Tensor:
    """vec(W)ᵀ (Σ_1 ⊗ ... ⊗ Ω)⁻¹ vec(W), W = stack(weights, -1) vectorised row-major."""
    v = torch.stack(weights, dim=-1).reshape(-1)
    return v @ torch.linalg.solve(kron(*covs), v)


def reference_update(weights, covs, eps):
    covs = [c.clone() for c in covs]
    W = torch.stack([w.detach() for w in weights], dim=-1)
    for k in range(W.dim()):
        unfolded = torch.movedim(W, k, 0).reshape(W.shape[k], -1)  # others in mode order
        others = kron(*[c for m, c in enumerate(covs) if m != k])
        new = unfolded @ torch.linalg.solve(others, unfolded.T) / unfolded.shape[1]
        covs[k] = new + eps * torch.eye(W.shape[k], dtype=W.dtype)
    return covs


def test_penalty_and_update_match_kronecker_references():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 4, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    covs = [spd(n, g) for n in (3, 4, 2, 3)]
    torch.testing.assert_close(
        tensor_normal_penalty(weights, covs), reference_penalty(weights, covs)
    )
    got = tensor_normal_covariances(weights, covs, eps=1e-2)
    for c, e in zip(got, reference_update(weights, covs, 1e-2), strict=True):
        torch.testing.assert_close(c, e)


def test_model_penalty_uses_each_related_weight_and_its_covariances():
    model = make_model(strength=0.1)
    assert model.related == ["0.weight", "2.weight"]  # 2-D parameters; the biases are not
    g = torch.Generator().manual_seed(2)
    expected = 0.0
    for name in model.related:
        covs = model.covariances(name)
        for c in covs:
            c.copy_(spd(c.shape[0], g))
        weights = [dict(model.heads[t].named_parameters())[name] for t in TASKS]
        expected = expected + reference_penalty(weights, covs)
    torch.testing.assert_close(model.relationship_penalty(), 0.1 * expected)
    assert model.task_covariance("2.weight").shape == (3, 3)
    # The penalty reaches the related weights of the heads, nothing else.
    model.relationship_penalty().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached == {f"heads.{t}.{r}" for t in TASKS for r in model.related}


def test_update_learns_the_task_relationships():
    model = make_model(eps=1e-6)
    with torch.no_grad():  # task "b" copies "a"; "c" is unrelated
        for p_a, p_b in zip(model.heads["a"].parameters(), model.heads["b"].parameters()):
            p_b.copy_(p_a)
    for _ in range(5):
        model.update_covariances()
    omega = model.task_covariance("0.weight")
    correlation = omega / torch.sqrt(torch.outer(omega.diag(), omega.diag()))
    assert correlation[0, 1] > 0.999
    assert abs(correlation[0, 2]) < 0.9
    torch.testing.assert_close(omega, omega.T)
    assert torch.linalg.eigvalsh(omega).min() > 0


def test_forward_partition_and_gradient_flow():
    model = make_model()
    x, losses = problem()
    out = model(x)
    for name in TASKS:
        expected = model.heads[name](model.trunk(x))
        torch.testing.assert_close(out[name], expected)
    check_partition(model)
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.trunk.parameters()}
    check_gradient_flow(model, x, losses)


def test_step_is_the_aggregation():
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


def test_training_with_the_model_partition():
    model = make_model(strength=1e-2)
    x, losses = problem()

    def penalty():
        model.update_covariances()  # the paper's alternation: covariances, then a weight step
        return model.relationship_penalty()

    check_training_with_model(model, x, losses, UPGrad(), extra_loss=penalty)


def test_state_dict_round_trip_carries_the_covariances():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)
    source = make_model(0)
    source.update_covariances()
    target = make_model(1)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    torch.testing.assert_close(
        target.task_covariance("0.weight"), source.task_covariance("0.weight")
    )
    assert not torch.equal(source.task_covariance("0.weight"), torch.eye(3, dtype=torch.float64))


def test_errors():
    trunk = nn.Linear(5, 4)
    heads = {"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)}
    with pytest.raises(ValueError, match="'weight' has shape \\[3, 4\\] in task 'b'"):
        DeepRelationshipNetwork(trunk, heads)
    same = {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)}
    with pytest.raises(ValueError, match="task 'a'.s head has no parameter 'nope'"):
        DeepRelationshipNetwork(trunk, same, related=["nope"])
    with pytest.raises(ValueError, match="strength must be a number >= 0"):
        DeepRelationshipNetwork(trunk, same, strength=-1)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        DeepRelationshipNetwork(trunk, same, eps=0)
    with pytest.raises(ValueError, match="no parameter of 2 dimensions or more"):
        DeepRelationshipNetwork(trunk, {"a": nn.Identity(), "b": nn.Identity()})
    model = DeepRelationshipNetwork(trunk, same)
    with pytest.raises(KeyError, match="'bias' is not a related parameter"):
        model.covariances("bias")
    with pytest.raises(ValueError, match="expected 3 covariances"):
        tensor_normal_penalty([torch.ones(2, 2)], [torch.eye(2)])
    with pytest.raises(ValueError, match="the task covariance must be 1 x 1"):
        tensor_normal_penalty([torch.ones(2, 2)], [torch.eye(2), torch.eye(2), torch.eye(2)])
    with pytest.raises(ValueError, match="eps must be positive"):
        tensor_normal_covariances([torch.ones(2)], [torch.eye(2), torch.eye(1)], eps=0.0)
