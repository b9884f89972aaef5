"""Bad input to the ops: clear errors that name the task and tensor, outputs left untouched."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_task_grads

from mtlgrad import ops


def gram_op(grads, num_tasks):
    return torch.ops.mtlgrad.gram(grads, num_tasks)


def test_wrong_list_length_for_num_tasks() -> None:
    grads = random_task_grads([(3,), (4,)], 2)[:3]
    for call in (lambda: ops.gram(grads, 2), lambda: gram_op(grads, 2)):
        with pytest.raises(ValueError, match="got 3 tensors for num_tasks=2"):
            call()


@pytest.mark.parametrize("num_tasks", [0, -1])
def test_num_tasks_must_be_positive(num_tasks: int) -> None:
    with pytest.raises(ValueError, match="num_tasks must be"):
        ops.gram([torch.ones(2)], num_tasks)
    with pytest.raises(ValueError, match="num_tasks must be at least 1"):
        gram_op([torch.ones(2)], num_tasks)


def test_mismatched_shapes_name_task_and_tensor() -> None:
    grads = random_task_grads([(3, 4), (5,)], 3)
    grads[2 * 2 + 0] = torch.ones(4, 3)
    expected = re.escape(
        "tensor 0 of task 2 has shape [4, 3] but tensor 0 of task 0 has shape [3, 4]"
    )
    with pytest.raises(ValueError, match=expected):
        ops.gram(grads, 3)
    out = [torch.zeros(3, 4), torch.zeros(5)]
    with pytest.raises(ValueError, match=expected):
        ops.combine(grads, 3, [1.0, 1.0, 1.0], out)
    assert all((o == 0).all() for o in out)


def test_mixed_dtypes() -> None:
    # Tensor k may have any dtype, but the same one in every task.
    grads = random_task_grads([(3,), (5,)], 2)
    grads[3] = grads[3].double()
    expected = "mixed dtypes: tensor 1 of task 1 is Double but tensor 1 of task 0 is Float"
    with pytest.raises(TypeError, match=expected):
        ops.gram(grads, 2)
    with pytest.raises(TypeError, match=expected):
        ops.combine(grads, 2, [1.0, 1.0])
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake_mode, pytest.raises(TypeError, match=expected):
        torch.ops.mtlgrad.gram([fake_mode.from_tensor(g) for g in grads], 2)
    # GradDrop's kernel runs on one dtype.
    grads[1] = grads[1].double()
    with pytest.raises(
        TypeError,
        match="mixed dtypes: tensor 1 of task 0 is Double but tensor 0 of task 0 is Float",
    ):
        ops.graddrop(grads, 2)


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match="tensor 0 of task 1 has dtype Long"):
        ops.gram([torch.ones(3), torch.ones(3, dtype=torch.long)], 2)


def test_mixed_devices() -> None:
    grads = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match="mixed devices: tensor 0 of task 1 is on meta"):
        ops.gram(grads, 2, check_finite=False)


def test_combine_weights_of_the_wrong_length_leave_out_untouched() -> None:
    grads = random_task_grads([(10,)], 3)
    out = [torch.full((10,), 7.0)]
    with pytest.raises(
        ValueError, match=re.escape("weights must have shape [3] (one per task), got [2]")
    ):
        ops.combine(grads, 3, [1.0, 2.0], out)
    with pytest.raises(ValueError, match=re.escape("weights must have shape [3]")):
        ops.combine(grads, 3, torch.ones(3, 1), out)
    assert (out[0] == 7.0).all()


def test_combine_bad_outputs() -> None:
    grads = random_task_grads([(10,), (2, 2)], 2)
    weights = [1.0, 1.0]
    with pytest.raises(ValueError, match="got 1 output tensors for 2 tensors per task"):
        ops.combine(grads, 2, weights, [torch.zeros(10)])
    with pytest.raises(
        ValueError,
        match=re.escape("output 1 has shape [4] but tensor 1 of each task has shape [2, 2]"),
    ):
        ops.combine(grads, 2, weights, [torch.zeros(10), torch.zeros(4)])
    with pytest.raises(
        TypeError, match="output 0 has dtype Double but tensor 0 of each task is Float"
    ):
        ops.combine(grads, 2, weights, [torch.zeros(10, dtype=torch.float64), torch.zeros(2, 2)])


def test_combine_integer_weights_are_rejected() -> None:
    grads = random_task_grads([(10,)], 2)
    with pytest.raises(TypeError, match="weights must be a floating-point tensor"):
        ops.combine(grads, 2, torch.tensor([1, 2]))


def test_names_must_match_tensor_count() -> None:
    with pytest.raises(ValueError, match="got 1 names for 2 tensors per task"):
        ops.gram(random_task_grads([(2,), (3,)], 2), 2, names=["only one"])


def test_unknown_cpu_kernel_set() -> None:
    with pytest.raises(ValueError, match="unknown CPU kernel set 'sse9'"):
        ops.set_cpu_kernels("sse9")


def test_solver_says_the_gram_matrix_is_not_finite() -> None:
    G = torch.eye(2, dtype=torch.float64)
    G[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"the Gram matrix holds NaN or Inf at \(1, 1\)"):
        torch.ops.mtlgrad.config_weights(G)
