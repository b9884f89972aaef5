"""Base classes of the aggregators.

Almost every method is "weights from the Gram matrix, then a weighted sum of the task gradients"
(:class:`GramAggregator`): the Gram matrix ``G = J Jᵀ`` comes from one pass of the native
``gram`` op, the weights from a small float64 solver on ``G``, and the update from one pass of the
native ``combine`` op. Elementwise methods (GradDrop) derive from :class:`Aggregator` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtlgrad import ops


@dataclass
class Aggregation:
    """Result of combining task gradients.

    Attributes:
        out: the combined gradient, one tensor per tensor of a task.
        weights: float64 task weights, on the host (``None`` for elementwise methods).
        gram: the float64 Gram matrix of the (unscaled) task gradients, on the host, when the
            method computed it.
        skipped: with a GradScaler's ``scale``, True when a task gradient overflowed: ``out``
            then holds NaN, so that ``scaler.step`` skips the update and ``scaler.update`` lowers
            the scale, as in single-task mixed precision.
        losses: the task losses on the host, when the method brought them there with G.
    """

    out: list[Tensor]
    weights: Tensor | None
    gram: Tensor | None
    skipped: bool = False
    losses: Tensor | None = None


class Aggregator(ABC):
    """Combines T task gradients into one update.

    ``agg(J)`` takes a T x P matrix (any float dtype, any device) and returns the P-vector update;
    :meth:`aggregate` does the same on task-major lists of tensors (a model's per-parameter
    gradients), without concatenating them.

    Neither is differentiable: inputs that require grad are detached, and the update has no
    ``grad_fn`` (an aggregator writes ``.grad``; it is not a layer to backpropagate through).
    """

    def __call__(self, J: Tensor) -> Tensor:
        if not isinstance(J, Tensor) or J.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects a matrix J of shape (T, P), one row per task; got "
                f"{tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__}"
            )
        if J.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs at least one task (row of J)")
        return self.aggregate(list(J.unbind(0)), J.shape[0]).out[0]

    @abstractmethod
    def aggregate(
        self,
        grads: Sequence[Tensor],
        num_tasks: int,
        out: Sequence[Tensor | None] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
        *,
        task_names: Sequence[str] | None = None,
        scale: float | None = None,
        accumulate: bool = False,
        check_finite: bool = True,
    ) -> Aggregation:
        """Combines a task-major gradient list (see :mod:`mtlgrad.ops`) into ``out``.

        Args:
            grads: ``num_tasks * K`` tensors, task-major.
            num_tasks: T.
            out: K tensors to write into (allocated when omitted). With ``accumulate``, the
                update is added into them in the same pass (an entry may be ``None``: it is
                allocated and written).
            names: the K tensors' names (e.g. parameter names), used in errors.
            losses: the T task losses, for the methods that use them (e.g. MGDA's loss
                normalisation); ignored by the others.
            task_names: the T task names, used in errors; stateful methods also keep their
                per-task state by name (see :class:`GramAggregator`).
            scale: the loss scale a ``torch.amp.GradScaler`` put on ``grads``. The weights come
                from the unscaled gradients and ``out`` receives the scaled update (what
                ``scaler.step`` expects); a non-finite gradient is an overflow: no error,
                ``skipped`` is set and ``out`` holds NaN.
            accumulate: add into ``out`` instead of overwriting it.
            check_finite: raise :class:`~mtlgrad.ops.NonFiniteGradientError` for a NaN or Inf
                gradient (a host-side check of the kernel's flags). With ``False`` and no
                ``scale``, non-finite values propagate into ``out`` as in plain PyTorch, and the
                step has no data-dependent branch (``torch.compile(fullgraph=True)``). With a
                ``scale``, the overflow check stays: the GradScaler needs it.
        """

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The method's state: its running quantities (none for stateless methods) and, for
        randomised methods, the state of their ``generator`` (one of their own unless one was
        passed), so a resumed run draws the same numbers. Subclasses with state of their own
        extend this dict."""
        generator = getattr(self, "generator", None)
        return {} if generator is None else {"generator": generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a state returned by :meth:`state_dict`. Subclasses with state of their own
        pop their keys and pass the rest on to this method."""
        state = dict(state_dict)
        generator_state = state.pop("generator", None)
        if generator_state is not None:
            generator = getattr(self, "generator", None)
            if generator is None:
                raise ValueError(
                    f"{type(self).__name__}: the state holds a generator state but this "
                    "instance has no generator (pass generator=torch.Generator())"
                )
            generator.set_state(generator_state)
        if state:
            raise ValueError(f"{type(self).__name__}: unexpected state {sorted(state)}")

    def reset(self) -> None:
        """Forgets the state, including the task order a named step set (subclasses with state
        of their own extend this)."""
        self._task_order: list[str] | None = None

    # ---- representation --------------------------------------------------------------------

    def _hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments shown by repr (subclasses override)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({args})"


class GramAggregator(Aggregator):
    """An aggregator whose update is ``Σ_t w_t g_t`` with weights ``w`` computed from ``G`` alone.

    ``agg(J)`` is exactly ``combine(J, agg.weights(gram(J)))`` through the native ops.
    """

    def weights(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        """Float64 task weights (shape ``(T,)``) from the T x T Gram matrix of the gradients.

        ``G`` may live on any device; the solver runs on the CPU in float64 (for a CUDA ``G`` this
        is one copy of T x T numbers) and the weights come back on ``G``'s device. ``losses``
        (T task losses) reach only the methods that use them. ``G`` (and ``losses``) are
        detached: the weights are not differentiable with respect to them.
        """
        if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.weights expects a square T x T Gram matrix, got "
                f"{tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__}"
            )
        if G.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.weights needs at least one task")
        G64 = G.detach().to(device="cpu", dtype=torch.float64)
        if losses is None:
            w = self._weights(G64)
        else:
            losses64 = torch.as_tensor(losses).detach().to(device="cpu", dtype=torch.float64)
            if losses64.shape != (G.shape[0],):
                raise ValueError(
                    f"{type(self).__name__}: expected {G.shape[0]} losses (one per task), got "
                    f"shape {tuple(losses64.shape)}"
                )
            w = self._weights_given_losses(G64, losses64)
        return w if G.device.type == "cpu" else w.to(G.device)

    @abstractmethod
    def _weights(self, G: Tensor) -> Tensor:
        """Weights from a float64 CPU Gram matrix (at least 1 x 1)."""

    def _weights_given_losses(self, G: Tensor, losses: Tensor) -> Tensor:
        """Weights when the task losses are known (float64 CPU); most methods ignore them."""
        return self._weights(G)

    def aggregate(
        self,
        grads: Sequence[Tensor],
        num_tasks: int,
        out: Sequence[Tensor | None] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
        *,
        task_names: Sequence[str] | None = None,
        scale: float | None = None,
        accumulate: bool = False,
        check_finite: bool = True,
    ) -> Aggregation:
        grads = list(grads)
        G, losses = gram_on_host(
            grads,
            num_tasks,
            losses,
            names=names,
            task_names=task_names,
            scale=scale,
            check_finite=check_finite,
        )
        if G is None:
            nan = fill_nan(grads, num_tasks, out)
            return Aggregation(nan, None, None, skipped=True, losses=losses)
        w = self._weights_by_name(G, losses, task_names)
        device = grads[0].device if grads else w.device
        combined = combine_into(grads, num_tasks, w.to(device, non_blocking=True), out, accumulate)
        return Aggregation(combined, w, G, losses=losses)

    def _weights_by_name(
        self, G: Tensor, losses: Tensor | None, task_names: Sequence[str] | None
    ) -> Tensor:
        """Weights with the tasks in the order of the first named call: a dict of losses whose
        keys come in another order gives every task its own weight and state, not the state of
        the task that used to be at its position."""
        names = None if task_names is None else [str(n) for n in task_names]
        known = getattr(self, "_task_order", None)
        if names is None or known is None or names == known:
            if names is not None and known is None:
                self._task_order = names
            return self.weights(G, losses)
        if sorted(names) != sorted(known) or len(set(names)) != len(names):
            if self._keeps_task_state:
                raise ValueError(
                    f"{type(self).__name__} keeps per-task state for the tasks {known}, but this "
                    f"step's tasks are {names}; call reset() to start over with other tasks"
                )
            self._task_order = names
            return self.weights(G, losses)
        order = torch.tensor([names.index(n) for n in known])
        w_known = self.weights(G[order][:, order], None if losses is None else losses[order])
        w = torch.empty_like(w_known)
        w[order] = w_known
        return w

    #: Methods whose state holds one entry per task (GradVac's targets, Nash-MTL's warm start)
    #: refuse a step whose tasks are not the ones their state belongs to.
    _keeps_task_state = False


def gram_on_host(
    grads: Sequence[Tensor],
    num_tasks: int,
    losses: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    scale: float | None = None,
    check_finite: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The float64 Gram matrix of the unscaled gradients and the losses, on the host.

    One device-to-host transfer carries G, the kernel's non-finite flags and the losses
    together. Non-finite gradients raise :class:`~mtlgrad.ops.NonFiniteGradientError` naming
    the task and parameter; under a GradScaler (``scale``) they are an overflow and G is
    ``None``. With ``check_finite=False`` (and no ``scale``) nothing is checked.
    """
    G, flags = gram_with_flags(grads, num_tasks)
    return checked_gram_on_host(
        G,
        flags,
        losses,
        names=names,
        task_names=task_names,
        scale=scale,
        check_finite=check_finite,
    )


def gram_with_flags(grads: Sequence[Tensor], num_tasks: int) -> tuple[Tensor, Tensor]:
    """The native ``gram`` op's two outputs, on the gradients' device (zeros and no flags for an
    empty list)."""
    if not grads:
        T = num_tasks
        return torch.zeros(T, T, dtype=torch.float64), torch.full((T,), -1, dtype=torch.int64)
    return torch.ops.mtlgrad.gram(list(grads), num_tasks)


def checked_gram_on_host(
    G: Tensor,
    flags: Tensor,
    losses: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    scale: float | None = None,
    check_finite: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The second half of :func:`gram_on_host`, for a G computed (or reduced) elsewhere."""
    T = G.shape[0]
    if G.device.type != "cpu":
        parts = [G.reshape(-1), flags.to(torch.float64)]
        if losses is not None:
            parts.append(losses.detach().to(device=G.device, dtype=torch.float64).reshape(-1))
        host = torch.cat(parts).cpu()
        G, flags = host[: T * T].view(T, T), host[T * T : T * T + T].to(torch.int64)
        if losses is not None:
            losses = host[T * T + T :]
    elif losses is not None:
        losses = losses.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if scale is None:
        if check_finite:
            ops.check_gram(G, flags, names, task_names)
        return G, losses
    if bool((flags >= 0).any()) or not bool(torch.isfinite(G).all()):
        return None, losses
    return G / (scale * scale), losses


def combine_into(
    grads: Sequence[Tensor],
    num_tasks: int,
    weights: Tensor,
    out: Sequence[Tensor | None] | None,
    accumulate: bool,
) -> list[Tensor]:
    """``out[k] (+)= Σ_t w_t g_{t,k}`` through the native ``combine``, one pass per group: the
    outputs to add into, and the ``None`` entries, allocated and written."""
    grads = list(grads)
    if out is None:
        return ops.combine(grads, num_tasks, weights)
    out = list(out)
    if not accumulate:
        return ops.combine(grads, num_tasks, weights, out)
    K = len(out)
    present = [k for k in range(K) if out[k] is not None]
    missing = [k for k in range(K) if out[k] is None]

    def columns(ks: list[int]) -> list[Tensor]:
        return [grads[t * K + k] for t in range(num_tasks) for k in ks]

    result: list[Tensor] = list(out)  # type: ignore[arg-type]
    if present:
        ops.combine(
            columns(present), num_tasks, weights, [out[k] for k in present], accumulate=True
        )
    if missing:
        for k, fresh in zip(missing, ops.combine(columns(missing), num_tasks, weights)):
            result[k] = fresh
    return result


def fill_nan(
    grads: Sequence[Tensor], num_tasks: int, out: Sequence[Tensor | None] | None
) -> list[Tensor]:
    """NaN in every output (allocated where missing): an overflowed step under a GradScaler."""
    K = len(grads) // num_tasks
    result = []
    for k in range(K):
        target = None if out is None else out[k]
        if target is None:
            target = torch.empty_like(grads[k])
        result.append(target.fill_(float("nan")))
    return result


# ---- argument checks shared by the constructors ---------------------------------------------


def check_nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def own_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator of a randomised method: ``generator`` when given (checked), else a CPU
    generator of the method's own, seeded once from torch's global RNG. So ``torch.manual_seed``
    still reproduces a run, the method's draws neither move nor depend on the global stream (or
    another instance's), and its state, saved by ``state_dict``, resumes a run bit-identically."""
    if generator is not None:
        return check_generator(generator)
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def draw_seed(generator: torch.Generator | None) -> int:
    """A 62-bit seed for a native solver's random choices, drawn from ``generator`` (or torch's
    default generator), so seeded runs reproduce."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def check_main_task(main: int, num_tasks: int, method: str) -> None:
    if not 0 <= main < num_tasks:
        raise ValueError(f"{method}: main task {main} is out of range for {num_tasks} tasks")
