"""Tensor-factorised multi-task layers: each factorisation against its defining formula in
float64, the ranks of the stacked tensor, partition, gradient flow, training, state."""

from __future__ import annotations

import pytest
import torch
from nn_checks import (
    check_gradient_flow,
    check_partition,
    check_step_matches_aggregation,
    regression_losses,
)
from nn_model_checks import check_state_dict_round_trip, check_training_with_model

from mtlgrad.aggregators import UPGrad
from mtlgrad.nn import TensorFactorisedNetwork

TASKS = ["a", "b", "c"]
RANKS = {"tucker": (3, 2, 2), "tt": (3, 2), "laf": (2,)}


def make_model(seed: int = 0, factorisation: str = "tucker") -> TensorFactorisedNetwork:
    torch.manual_seed(seed)
    model = TensorFactorisedNetwork([5, 4, 1], TASKS, factorisation, RANKS[factorisation])
    model = model.double()
    with torch.no_grad():
        for layer in model.layers:
            for b in layer.biases.values():
                b.normal_(0, 0.1)
    return model


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(12, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def reference_tensor(layer, factorisation: str) -> torch.Tensor:
    """The (D_in, D_out, T) tensor from the factorisation's definition, entry by entry."""
    task_matrix = torch.stack([layer.task_factors[n] for n in TASKS])  # T x rank
    d_in, d_out = layer.d_in, layer.d_out
    W = torch.zeros(d_in, d_out, len(TASKS), dtype=torch.float64)
    for i in range(d_in):
        for j in range(d_out):
            for t in range(len(TASKS)):
                if factorisation == "tucker":  # Σ_abc S_abc U_in[i,a] U_out[j,b] U_T[t,c]
                    W[i, j, t] = torch.einsum(
                        "abc,a,b,c->",
                        layer.core,
                        layer.input_factor[i],
                        layer.output_factor[j],
                        task_matrix[t],
                    )
                elif factorisation == "tt":  # G_in[i,:] G_out[:,j,:] g_t
                    W[i, j, t] = layer.input_core[i] @ layer.output_core[:, j, :] @ task_matrix[t]
                else:  # row (i, j) of L times s_t
                    W[i, j, t] = layer.basis[i * d_out + j] @ task_matrix[t]
    return W


@pytest.mark.parametrize("factorisation", ["tucker", "tt", "laf"])
def test_forward_matches_the_factorisation(factorisation):
    model = make_model(factorisation=factorisation)
    x, _ = problem()
    tensors = [reference_tensor(layer, factorisation) for layer in model.layers]
    for layer_index, W in enumerate(tensors):
        torch.testing.assert_close(model.stacked_weight(layer_index), W)
    got = model(x)
    for t, name in enumerate(TASKS):
        h = torch.relu(x @ tensors[0][:, :, t] + model.layers[0].biases[name])
        expected = h @ tensors[1][:, :, t] + model.layers[1].biases[name]
        assert got[name].shape == (12, 1)
        torch.testing.assert_close(got[name], expected)


def test_ranks_of_the_stacked_tensor():
    torch.manual_seed(0)
    tasks = [f"t{i}" for i in range(6)]
    model = TensorFactorisedNetwork([7, 6], tasks, "tucker", (3, 2, 2)).double()
    W = model.stacked_weight(0).detach()
    assert torch.linalg.matrix_rank(W.reshape(7, -1)) == 3  # mode 1: K1
    assert torch.linalg.matrix_rank(W.permute(1, 0, 2).reshape(6, -1)) == 2  # mode 2: K2
    assert torch.linalg.matrix_rank(W.reshape(-1, 6)) == 2  # task mode: K3
    tt = TensorFactorisedNetwork([7, 6], tasks, "tt", (3, 2)).double()
    W = tt.stacked_weight(0).detach()
    assert torch.linalg.matrix_rank(W.reshape(7, -1)) == 3
    assert torch.linalg.matrix_rank(W.reshape(-1, 6)) == 2


@pytest.mark.parametrize("factorisation", ["tucker", "tt", "laf"])
def test_partition_and_gradient_flow(factorisation):
    model = make_model(factorisation=factorisation)
    check_partition(model)
    own = {id(p) for p in model.task_parameters("b")}
    expected = [layer.task_factors["b"] for layer in model.layers]
    expected += [layer.biases["b"] for layer in model.layers]
    assert own == {id(p) for p in expected}
    x, losses = problem()
    check_gradient_flow(model, x, losses)


def test_step_is_the_aggregation():
    model = make_model(factorisation="tt")
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, UPGrad())


@pytest.mark.parametrize("factorisation", ["tucker", "tt"])
def test_training_with_the_model_partition(factorisation):
    model = make_model(factorisation=factorisation)
    x, losses = problem()
    check_training_with_model(model, x, losses, UPGrad())


def test_state_dict_round_trip():
    x, _ = problem()
    check_state_dict_round_trip(make_model, x)


def test_errors():
    with pytest.raises(ValueError, match="factorisation must be one of"):
        TensorFactorisedNetwork([5, 1], TASKS, "cp")
    with pytest.raises(
        ValueError, match="takes 2 positive int rank.s. per layer, got \\[3, 2, 2\\]"
    ):
        TensorFactorisedNetwork([5, 1], TASKS, "tt", (3, 2, 2))
    with pytest.raises(ValueError, match="ranks lists 1 layers, but sizes gives 2"):
        TensorFactorisedNetwork([5, 4, 1], TASKS, "laf", [(2,)])
    with pytest.raises(ValueError, match=r"sizes\[1\] must be a positive int"):
        TensorFactorisedNetwork([5, 0], TASKS)
    with pytest.raises(ValueError, match="at least one layer"):
        TensorFactorisedNetwork([5], TASKS)
    model = TensorFactorisedNetwork([5, 1], TASKS)
    with pytest.raises(ValueError, match="last dimension must be sizes.0.=5"):
        model(torch.randn(2, 4))
    with pytest.raises(KeyError, match="unknown task 'z'"):
        model.task_weight(0, "z")
