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
        weights: float64 task weights (``None`` for elementwise methods).
        gram: the float64 Gram matrix of the task gradients, when the method computed it.
    """

    out: list[Tensor]
    weights: Tensor | None
    gram: Tensor | None


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
        out: Sequence[Tensor] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
    ) -> Aggregation:
        """Combines a task-major gradient list (see :mod:`mtlgrad.ops`) into ``out``.

        ``names`` (one per tensor of a task) are used in error messages. ``losses`` (T values)
        are passed on to the methods that use them (e.g. MGDA's loss normalisation) and ignored
        by the others.
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

    def reset(self) -> None:  # noqa: B027  (stateless by default, not abstract)
        """Forgets the state (stateless methods: nothing to do)."""

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
        out: Sequence[Tensor] | None = None,
        names: Sequence[str] | None = None,
        losses: Tensor | None = None,
    ) -> Aggregation:
        grads = list(grads)
        G = ops.gram(grads, num_tasks, names=names)
        w = self.weights(G, losses)
        device = grads[0].device if grads else w.device
        combined = ops.combine(grads, num_tasks, w.to(device), out)
        return Aggregation(combined, w, G)


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
