from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlgrad import ops
from mtlgrad.aggregators._base import (
    Aggregation,
    Aggregator,
    draw_seed,
    fill_nan,
    own_generator,
)


class GradDrop(Aggregator):
    """GradDrop, gradient sign dropout (Chen et al., NeurIPS 2020, `Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_).

    Algorithm 1 of the paper, elementwise over the shared parameters: the positive sign purity
    ``P = ½ (1 + Σ_i g_i / Σ_i |g_i|)``, one uniform ``U`` per element shared by all tasks, the
    masks ``M_i = [U < P][g_i > 0] + [U > P][g_i < 0]`` (keep the positive values with probability
    ``P``, else the negative ones), and the update ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with the
    per-task ``leak`` ``ℓ_i`` in [0, 1] (``ℓ_i = 1`` lets task i through unchanged). The paper's
    monotone transform of ``P`` is the identity, as in its experiments and in TorchJD.

    The paper applies GradDrop to the gradients of a shared activation layer (summing over the
    batch to compute ``P``); like TorchJD, this aggregator applies it to the per-task gradients it
    is given, e.g. those of the shared parameters. It is not Gram-based: one fused native pass
    (:func:`mtlgrad.ops.graddrop`) reads the gradients and writes the update; the uniforms come
    from a counter-based generator (Philox) keyed by a seed drawn per call from ``generator`` (by
    default one of its own, seeded once from torch's global RNG; its state is in
    :meth:`state_dict`), so a seeded run reproduces whatever the thread count.
    Gradients holding NaN or Inf raise :class:`~mtlgrad.ops.NonFiniteGradientError` before
    anything is written.

    With T = 1 the update is the gradient (every value has the sign the purity selects).
    """

    def __init__(
        self,
        leak: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if leak is not None:
            values = torch.as_tensor(leak, dtype=torch.float64).detach().cpu().clone()
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(
                    f"leak must be a non-empty sequence of per-task values, got shape "
                    f"{tuple(values.shape)}"
                )
            if not ((values >= 0) & (values <= 1)).all():
                raise ValueError(f"leak values must lie in [0, 1], got {values.tolist()}")
            leak = values
        self.leak: Tensor | None = leak
        self.generator = own_generator(generator)

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
        device = grads[0].device if grads else torch.device("cpu")
        if self.leak is None:
            leak = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        elif self.leak.numel() != num_tasks:
            raise ValueError(
                f"GradDrop has {self.leak.numel()} leak values but got {num_tasks} tasks"
            )
        else:
            leak = self.leak.to(device)
        seed = draw_seed(self.generator)
        # The sign purity and the kept signs do not change when every gradient is multiplied by
        # a GradScaler's scale, and the update is linear: the scaled gradients give the scaled
        # update directly.
        direct = out is not None and not accumulate and all(o is not None for o in out)
        try:
            combined = ops.graddrop(
                grads,
                num_tasks,
                leak,
                seed,
                out if direct else None,
                check_finite=check_finite or scale is not None,
                names=names,
                task_names=task_names,
            )
        except ops.NonFiniteGradientError:
            if scale is None:
                raise
            return Aggregation(fill_nan(grads, num_tasks, out), None, None, skipped=True)
        if direct or out is None:
            return Aggregation(combined, None, None)
        result = []
        for target, update in zip(out, combined):
            if target is None:
                result.append(update)
            else:
                result.append(target.add_(update) if accumulate else target.copy_(update))
        return Aggregation(result, None, None)

    def _hyperparameters(self) -> dict[str, Any]:
        return {} if self.leak is None else {"leak": self.leak.tolist()}
