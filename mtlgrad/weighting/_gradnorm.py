from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlgrad import ops
from mtlgrad.weighting._base import LossWeighting, check_nonnegative, task_loss_list


class GradNorm(LossWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, `GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks
    <https://arxiv.org/abs/1711.02257>`_).

    Learnable task weights ``w_i`` (``task_weights``, initialised to 1) scale the losses. They are
    trained to bring each weighted task's gradient norm on the last shared layer ``W`` to the
    mean norm times a power of the task's relative inverse training rate ``r_i``: tasks that
    trained less far get larger gradients (paper Sec. 3 and Algorithm 1)::

        G_i = ‖∇_W w_i L_i‖ = w_i ‖∇_W L_i‖,   Ḡ = mean_i G_i,
        L̃_i = L_i(t) / L_i(0),   r_i = L̃_i / mean_j L̃_j,
        L_grad = Σ_i |G_i - Ḡ r_i^α|

    with the target ``Ḡ r_i^α`` held constant (as the paper prescribes). ``L_i(0)`` is the
    loss of the first training-mode call (kept in ``state_dict()`` as ``initial_losses``).

    How a step works:

    - ``weighting(losses)`` computes the per-task gradients of the *unweighted* losses with
      respect to ``shared_params`` (one ``torch.autograd.grad`` per task, graph retained), their
      norms from one pass of the native :func:`mtlgrad.gram` op, and writes
      ``∂L_grad/∂w_i = sign(G_i - Ḡ r_i^α) ‖∇_W L_i‖`` (exact, since ``G_i`` is linear in
      ``w_i``: no double backward) into ``task_weights.grad`` (added to a gradient already
      there, as autograd does). It returns ``Σ_i w_i L_i`` with the weights detached, so
      ``backward()`` on it trains the model only.
    - Give ``weighting.parameters()`` to the optimizer with the model's (a parameter group of
      its own sets the weights' learning rate); ``optimizer.step()`` updates both.
    - The next call first renormalises the weights to sum to T (paper: after every update),
      clipping negative weights at 0 before; :meth:`renormalize` does it on demand. ``weights``
      holds the (renormalised) weights used by the last call and ``grad_norms`` the ``G_i``.

    A training-mode call checks that every loss is positive and finite (the rates divide by
    ``L(0)`` and compare ``L(t) / L(0)``; a loss <= 0 would make a rate NaN and freeze that task's
    weight): otherwise it raises a ``ValueError`` naming the task and the value, before anything
    (weights, ``L(0)``, gradients) changes. In eval mode, or with gradients disabled, the call
    only weights the losses. The paper's
    weights are the parameters themselves, renormalised; LibMTL instead uses
    ``T softmax(w)`` and the first epoch's average loss as ``L(0)``.

    .. code-block:: python

        weighting = GradNorm(2, shared_params=model.last_shared_layer.parameters())
        optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()])
        optimizer.zero_grad()
        weighting(losses).backward()
        optimizer.step()

    Args:
        num_tasks: T.
        shared_params: the parameters of the last shared layer ``W`` (not registered in this
            module: they belong to the model).
        alpha: the asymmetry α (default 1.5, as in LibMTL); 0 equalises the gradient norms.
    """

    def __init__(self, num_tasks: int, shared_params: Iterable[Tensor], alpha: float = 1.5) -> None:
        super().__init__(num_tasks)
        if isinstance(shared_params, Tensor):
            shared_params = [shared_params]
        try:
            params = list(shared_params)
        except TypeError:
            raise TypeError(
                "shared_params must be an iterable of tensors (the parameters of the last shared "
                f"layer), got {type(shared_params).__name__}"
            ) from None
        if not params:
            raise ValueError("shared_params is empty: pass the parameters of the last shared layer")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"shared_params[{i}] must be a tensor (a parameter of the last shared layer), "
                    f"got {type(p).__name__}"
                )
            if not p.requires_grad:
                raise ValueError(f"shared_params[{i}] does not require grad")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("shared_params holds the same tensor more than once")
        self.shared_params = params  # a plain list: the model owns these parameters
        self.alpha = check_nonnegative("alpha", alpha)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer(
            "initial_losses", torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        )
        self.grad_norms: Tensor | None = None

    @torch.no_grad()
    def renormalize(self) -> None:
        """Clips the weights at 0 and rescales them to sum to T (back to 1 each if all are 0)."""
        w = self.task_weights.clamp_(min=0)
        total = w.sum()
        scaled = w * (self.num_tasks / total.clamp(min=torch.finfo(w.dtype).tiny))
        self.task_weights.copy_(torch.where(total > 0, scaled, torch.ones_like(w)))

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        names, values = task_loss_list(losses, self.num_tasks, "GradNorm")
        stacked = torch.stack([loss.reshape(()) for loss in values])
        training = self.training and torch.is_grad_enabled()
        if training:
            # Everything that can fail comes before the first change of state.
            norms = self._task_grad_norms(names, values)
            current = self._checked_losses(names, stacked)
        self.renormalize()
        if training:
            self._weight_gradient(norms, current)
        return self._weighted_sum(stacked, self.task_weights)

    def _checked_losses(self, names: list[str], stacked: Tensor) -> Tensor:
        """The losses as float64, checked: the training rates divide by L(0) and raise L(t) / L(0)
        to the power α, so every loss must be positive and finite (else a task's rate is NaN and
        its weight silently stops learning)."""
        current = stacked.detach().to(torch.float64)
        valid = (current > 0) & torch.isfinite(current)
        if not bool(valid.all()):
            index = int((~valid).nonzero()[0])
            initial = bool(torch.isnan(self.initial_losses).any())
            what = "initial loss" if initial else "loss"
            why = "the method divides by it" if initial else "its training rate is L(t) / L(0)"
            raise ValueError(
                f"GradNorm: the {what} of {names[index]!r} must be positive and finite ({why}), "
                f"got {float(current[index])!r}"
            )
        return current

    def _task_grad_norms(self, names: list[str], values: list[Tensor]) -> Tensor:
        """‖∇_W L_i‖ for every task (float64), from one pass of the native gram op."""
        # Each task's own loss, not an element of the stacked tensor: a backward from an element
        # would reach every task's graph (with zeros) through the stack.
        grads: list[Tensor] = []
        for name, loss in zip(names, values):
            if not loss.requires_grad:
                raise ValueError(f"GradNorm: the loss of {name!r} does not require grad")
            task_grads = torch.autograd.grad(
                loss, self.shared_params, retain_graph=True, allow_unused=True
            )
            if all(g is None for g in task_grads):
                raise ValueError(
                    f"GradNorm: the loss of {name!r} does not depend on shared_params (the last "
                    "shared layer)"
                )
            grads += [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self.shared_params, task_grads)
            ]
        names_of_params = [f"shared_params[{i}]" for i in range(len(self.shared_params))]
        gram = ops.gram(grads, self.num_tasks, names=names_of_params)  # raises on NaN / Inf
        return gram.diagonal().clamp(min=0).sqrt()

    def _weight_gradient(self, norms: Tensor, current: Tensor) -> None:
        if bool(torch.isnan(self.initial_losses).any()):
            self.initial_losses.copy_(current)
        relative = current.to(self.initial_losses.device) / self.initial_losses
        rates = relative / relative.mean()

        w = self.task_weights.detach().to(torch.float64)
        norms = norms.to(w.device)
        weighted_norms = w * norms
        target = weighted_norms.mean() * rates.to(w.device) ** self.alpha
        grad = (torch.sign(weighted_norms - target) * norms).to(self.task_weights.dtype)
        self.grad_norms = weighted_norms
        if self.task_weights.grad is None:
            self.task_weights.grad = grad
        else:
            self.task_weights.grad.add_(grad)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, alpha={self.alpha}"
