"""The native ops ``torch.ops.mtlgrad.gram``, ``combine`` and ``graddrop``, with typed faces.

Gradients travel as one flat, task-major list: task 0's tensors, then task 1's, and so on, every
task listing the same shapes in the same order (typically the ``.grad`` of each shared parameter).
Nothing is concatenated: the kernels read the tensors where they are, in one pass.

Both ops have fake (meta) implementations, so they trace under
``torch.compile(fullgraph=True)``; pass ``check_finite=False`` to :func:`gram` there, since the
check reads the result on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlgrad.ops._checks import num_tensors
from mtlgrad.ops._extension import load as _load_extension

_load_extension()  # registers torch.ops.mtlgrad.*

__all__ = [
    "GramOverflowError",
    "NonFiniteGradientError",
    "check_gram",
    "combine",
    "cpu_kernels",
    "graddrop",
    "gram",
    "set_cpu_kernels",
    "supported_cpu_kernels",
]


class NonFiniteGradientError(ValueError):
    """A task's gradient holds NaN or Inf.

    Attributes:
        tasks: the offending tasks (indices), ascending.
        tensor_indices: for each of them, the index (within that task's list) of the first
            tensor holding a NaN or Inf.
        names: the matching parameter names when they were given, else ``None``.
        task_names: the names of the offending tasks (matching ``tasks``) when the tasks were
            named, else ``None``.
    """

    def __init__(
        self,
        tasks: list[int],
        tensor_indices: list[int],
        names: list[str] | None,
        task_names: list[str] | None = None,
    ) -> None:
        self.tasks = tasks
        self.tensor_indices = tensor_indices
        self.names = names
        self.task_names = task_names
        parts = []
        for i, (task, index) in enumerate(zip(tasks, tensor_indices)):
            where = (
                f"tensor {index}" if names is None else f"parameter '{names[i]}' (tensor {index})"
            )
            label = f"task {task}" if task_names is None else f"task '{task_names[i]}'"
            parts.append(f"{label}: {where}")
        super().__init__(
            "non-finite gradient (NaN or Inf) in " + "; ".join(parts) + ". The loss of that task "
            "diverged or overflowed; with mixed precision, use a GradScaler."
        )


class GramOverflowError(ValueError):
    """Every task gradient is finite, but the Gram matrix overflowed float64.

    A gradient whose norm is above about 1e154 has a squared norm beyond float64's range
    (about 1.8e308), so no Gram-based method can weigh it. Not a
    :class:`NonFiniteGradientError`: the gradients themselves are fine, their scale is not.

    Attributes:
        tasks: the tasks (indices), ascending, whose squared norm overflowed (or, when every
            squared norm fits, the tasks of the overflowing products).
        task_names: their names when the tasks were named, else ``None``.
    """

    def __init__(self, tasks: list[int], task_names: list[str] | None = None) -> None:
        self.tasks = tasks
        self.task_names = task_names
        labels = [
            f"task {task}" if task_names is None else f"task '{task_names[i]}'"
            for i, task in enumerate(tasks)
        ]
        which = (
            f"the gradient of {labels[0]} has a norm"
            if len(labels) == 1
            else f"the gradients of {', '.join(labels)} have norms"
        )
        super().__init__(
            "the Gram matrix of the task gradients overflowed float64 although every gradient "
            f"is finite: {which} above ~1e154, whose square exceeds float64's range. Scale the "
            "loss of such a task down (divide it by a constant) so that its gradient norm "
            "stays well below 1e154."
        )


def _raise_nonfinite(
    nonfinite: Tensor, names: Sequence[str] | None, task_names: Sequence[str] | None
) -> None:
    """Raises :class:`NonFiniteGradientError` for the tasks whose entry of ``nonfinite`` (per
    task, the index of its first non-finite tensor, or -1) is set."""
    first = nonfinite.tolist()
    tasks = [t for t, index in enumerate(first) if index >= 0]
    if tasks:
        indices = [first[t] for t in tasks]
        raise NonFiniteGradientError(
            tasks,
            indices,
            None if names is None else [names[i] for i in indices],
            None if task_names is None else [task_names[t] for t in tasks],
        )


def check_gram(
    gram: Tensor,
    nonfinite: Tensor,
    names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
) -> None:
    """Raises when the outputs of ``torch.ops.mtlgrad.gram`` show a problem; they are on the host.

    Args:
        gram: the T x T float64 Gram matrix.
        nonfinite: per task, the index of its first tensor holding a NaN or Inf, or -1.
        names: optional names of the K tensors of a task (e.g. parameter names).
        task_names: optional names of the T tasks (e.g. the keys of a dict of losses), used in
            the errors instead of the task indices.

    Raises:
        NonFiniteGradientError: some task's gradient holds NaN or Inf.
        GramOverflowError: every gradient is finite but ``gram`` is not (a squared norm or a
            product overflowed float64).
    """
    _check_task_names("mtlgrad.check_gram", task_names, gram.shape[0])
    _raise_nonfinite(nonfinite, names, task_names)
    finite = torch.isfinite(gram)
    if bool(finite.all()):
        return
    tasks = [t for t, ok in enumerate(finite.diagonal().tolist()) if not ok]
    if not tasks:  # every squared norm fits, some product of two of them does not
        bad = (~finite).nonzero().flatten().tolist()
        tasks = sorted(set(bad))
    raise GramOverflowError(tasks, None if task_names is None else [task_names[t] for t in tasks])


def gram(
    grads: Sequence[Tensor],
    num_tasks: int,
    *,
    check_finite: bool = True,
    names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
) -> Tensor:
    """Gram matrix of the task gradients: ``G[i, j] = <g_i, g_j>`` over all their tensors.

    Args:
        grads: task-major list of ``num_tasks * K`` tensors (float32, float64, float16 or
            bfloat16, on one device; contiguous or not). Tensor k may have any of these dtypes
            (e.g. a bf16 trunk with fp32 norm layers), the same in every task; each dtype is
            summed in its own precision, in one pass over its tensors.
        num_tasks: T, the number of tasks.
        check_finite: raise :class:`NonFiniteGradientError` when a task's gradient holds NaN or
            Inf (the check is fused into the kernel), and :class:`GramOverflowError` when every
            gradient is finite but ``G`` is not (see :func:`check_gram`; reading the result
            syncs with the device). With ``False`` the non-finite values propagate into ``G``.
        names: optional names of the K tensors of a task (e.g. parameter names), used in errors.
        task_names: optional names of the T tasks (e.g. the keys of a dict of losses), used in
            errors instead of the task indices.

    Returns:
        float64 tensor of shape ``(T, T)`` on the gradients' device. Products are accumulated in
        fp32 (fp64 for fp64 input) within chunks of at most a few thousand elements and in fp64
        across chunks, in a fixed order: the result is deterministic for a given thread count.
    """
    grads = list(grads)
    k = num_tensors(grads, num_tasks, "mtlgrad.gram")
    if names is not None and len(names) != k:
        raise ValueError(f"mtlgrad.gram: got {len(names)} names for {k} tensors per task")
    _check_task_names("mtlgrad.gram", task_names, num_tasks)
    if not grads:
        return torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    result, nonfinite = torch.ops.mtlgrad.gram(grads, num_tasks)
    if check_finite:
        check_gram(result.cpu(), nonfinite.cpu(), names, task_names)
    return result


def combine(
    grads: Sequence[Tensor],
    num_tasks: int,
    weights: Tensor | Sequence[float],
    out: Sequence[Tensor] | None = None,
    *,
    accumulate: bool = False,
) -> list[Tensor]:
    """Weighted sum of the task gradients: ``out[k] = sum_t weights[t] * grads[t * K + k]``.

    With ``accumulate=True`` the sum is added to ``out`` instead, in the same pass (``out`` is
    read once and written once, e.g. gradient accumulation into an existing ``.grad``).

    Args:
        grads: task-major list of ``num_tasks * K`` tensors, as for :func:`gram`.
        num_tasks: T, the number of tasks.
        weights: T weights (a 1-D floating tensor on the gradients' device, or a sequence of
            floats). Accumulation is in fp32 (fp64 for fp64 gradients, and for any gradients
            when some nonzero weight lies outside [2^-60, 2^60], e.g. PCGrad's weights on
            badly scaled tasks: then the result is exact to the output's precision whenever the
            update and each product fit).
        out: K tensors to write into (``out[k]`` with the shape, dtype and device of tensor k
            of a task). They may be non-contiguous or alias one of the inputs (e.g. task 0's
            gradients). Allocated when omitted. On an error nothing is written.
        accumulate: add to ``out`` (which must then be given): ``out[k] + sum_t w_t g_t``,
            rounded once to ``out[k]``'s dtype.

    Returns:
        The K output tensors.
    """
    grads = list(grads)
    k = num_tensors(grads, num_tasks, "mtlgrad.combine")
    if accumulate and out is None:
        raise ValueError("mtlgrad.combine: accumulate=True adds to out, so out must be given")
    if not isinstance(weights, Tensor):
        device = grads[0].device if grads else None
        weights = torch.tensor(list(weights), dtype=torch.float64, device=device)
    if out is None:
        out = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads[:k]]
    else:
        out = list(out)
    if not grads:
        if weights.dim() != 1 or weights.numel() != num_tasks:
            raise ValueError(
                f"mtlgrad.combine: weights must have shape [{num_tasks}] (one per task), "
                f"got {list(weights.shape)}"
            )
        if out:
            raise ValueError(
                f"mtlgrad.combine: got {len(out)} output tensors for 0 tensors per task"
            )
        return out
    torch.ops.mtlgrad.combine(grads, num_tasks, weights, out, accumulate)
    return out


def graddrop(
    grads: Sequence[Tensor],
    num_tasks: int,
    leak: Tensor | Sequence[float] | None = None,
    seed: int = 0,
    out: Sequence[Tensor] | None = None,
    *,
    check_finite: bool = True,
    names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
) -> list[Tensor]:
    """GradDrop's sign-dropped sum of the task gradients (Chen et al. 2020, Algorithm 1), fused.

    For every element, with ``P = ½ (1 + Σ_t g_t / Σ_t |g_t|)`` and one uniform ``U`` shared by
    all tasks, the positive task values are kept when ``U < P`` and the negative ones otherwise;
    ``out = Σ_t (leak_t + (1 − leak_t) M_t) g_t`` where ``M_t`` is 1 for a kept value.

    ``U`` is ``(x >> 8) · 2⁻²⁴`` where ``x`` is word ``e mod 4`` of Philox4x32-10 with key
    ``seed`` (low word first) and counter ``(0, 0, e // 4)`` (torch's ``at::Philox4_32(seed,
    subsequence=e // 4)``), ``e`` the element's index in the concatenation of a task's flattened
    tensors: the result does not depend on the number of threads.

    Args:
        grads: task-major list of ``num_tasks * K`` tensors, as for :func:`gram`.
        num_tasks: T, the number of tasks.
        leak: T values in [0, 1] (how much of a dropped value still passes); zeros when omitted.
        seed: the generator's key, an int in [0, 2⁶³).
        out: K tensors to write into, as for :func:`combine`; allocated when omitted.
        check_finite: first check the gradients and raise :class:`NonFiniteGradientError` (then
            nothing is written); costs one more read of the gradients. With ``False`` NaN and Inf
            propagate into ``out``.
        names: optional names of the K tensors of a task, used in errors.
        task_names: optional names of the T tasks, used in errors instead of the task indices.

    Returns:
        The K output tensors. Sums are accumulated in fp32 (fp64 for fp64 gradients).
    """
    grads = list(grads)
    k = num_tensors(grads, num_tasks, "mtlgrad.graddrop")
    if names is not None and len(names) != k:
        raise ValueError(f"mtlgrad.graddrop: got {len(names)} names for {k} tensors per task")
    _check_task_names("mtlgrad.graddrop", task_names, num_tasks)
    device = grads[0].device if grads else None
    if leak is None:
        leak = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    elif not isinstance(leak, Tensor):
        leak = torch.tensor(list(leak), dtype=torch.float64, device=device)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"mtlgrad.graddrop: seed must be an int in [0, 2**63), got {seed!r}")
    if out is None:
        out = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads[:k]]
    else:
        out = list(out)
    if not grads:
        if out:
            raise ValueError(
                f"mtlgrad.graddrop: got {len(out)} output tensors for 0 tensors per task"
            )
        return out
    nonfinite = torch.ops.mtlgrad.graddrop(grads, num_tasks, leak, seed, check_finite, out)
    if check_finite:
        _raise_nonfinite(nonfinite, names, task_names)
    return out


def _check_task_names(op: str, task_names: Sequence[str] | None, num_tasks: int) -> None:
    if task_names is not None and len(task_names) != num_tasks:
        raise ValueError(f"{op}: got {len(task_names)} task names for {num_tasks} tasks")


def cpu_kernels() -> str:
    """Name of the CPU kernel set in use: ``generic``, ``avx2`` or ``avx512``.

    The widest set the CPU supports is chosen at import; the environment variable
    ``MTLGRAD_CPU_KERNELS`` overrides it.
    """
    from mtlgrad import _C

    return _C.cpu_kernels()


def supported_cpu_kernels() -> list[str]:
    """Names of the CPU kernel sets this CPU can run, narrowest first."""
    from mtlgrad import _C

    return list(_C.supported_cpu_kernels())


def set_cpu_kernels(name: str) -> str:
    """Selects the CPU kernel set (for testing and benchmarking); returns the previous one."""
    from mtlgrad import _C

    return _C.set_cpu_kernels(name)


from mtlgrad.ops import _fakes  # noqa: E402, F401  (registers the fake implementations)
