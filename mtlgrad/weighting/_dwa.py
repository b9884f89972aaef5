from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtlgrad.weighting._base import LossWeighting, check_positive


class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, `End-to-End Multi-Task Learning
    with Attention <https://arxiv.org/abs/1803.10704>`_).

    The weights of epoch ``t`` come from how fast each task's loss fell over the two previous
    epochs (the paper's DWA formula)::

        w_k(t) = K exp(r_k(t-1) / τ) / Σ_i exp(r_i(t-1) / τ),   r_k(t-1) = L_k(t-1) / L_k(t-2)

    where ``L_k`` is task k's loss averaged over an epoch and ``τ`` the ``temperature``; the
    weights sum to K = ``num_tasks``, and are 1 during the first two epochs (paper: ``t = 1, 2``).

    Per step: call the weighting on the training losses, as for any weighting. In training mode
    (``weighting.train()``, the default) it also adds the detached losses to the current epoch's
    sum; in eval mode it only weights them. Per epoch: call :meth:`end_epoch` once the epoch's
    last step is done; it turns the epoch's sum into the epoch average and sets the weights of the
    next epoch. The running sum, the last epoch average, the epoch count and the current weights
    are in ``state_dict()`` (buffers), so a run resumed mid-epoch continues identically. The
    losses must be positive (the method divides them).

    .. code-block:: python

        weighting = DWA(num_tasks=2)
        for epoch in range(epochs):
            for x, y in loader:
                weighting(task_losses(model(x), y)).backward()
                ...
            weighting.end_epoch()

    Args:
        num_tasks: K.
        temperature: τ, the softmax temperature (the paper's ``T``; default 2 as in the paper).
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        self.temperature = check_positive("temperature", temperature)
        f64 = torch.float64
        self.register_buffer("epoch_weights", torch.ones(num_tasks, dtype=f64))
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_average", torch.zeros(num_tasks, dtype=f64))
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.int64))
        self._names = [f"task {t}" for t in range(num_tasks)]

    def forward(self, losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor) -> Tensor:
        self._names, stacked = self._stack(losses)
        if self.training:
            self.loss_sum.add_(stacked.detach().to(self.loss_sum.dtype))
            self.num_steps.add_(1)
        return self._weighted_sum(stacked, self.epoch_weights)

    @torch.no_grad()
    def end_epoch(self) -> Tensor:
        """Closes the epoch: its average losses give the weights of the next epoch.

        Returns the new weights (float64, a copy). Raises a ``ValueError`` when no loss was
        recorded since the last call, or when an epoch-average loss is not positive and finite.
        """
        steps = int(self.num_steps)
        if steps == 0:
            raise ValueError(
                "DWA.end_epoch: no losses were recorded in this epoch; call the weighting on the "
                "training losses (in training mode) before ending the epoch"
            )
        average = self.loss_sum / steps
        for name, value in zip(self._names, average.tolist()):
            if not 0 < value < float("inf"):
                raise ValueError(
                    f"DWA: the epoch-average loss of {name!r} must be positive and finite, got "
                    f"{value!r}"
                )
        if int(self.num_epochs) >= 1:
            rates = average / self.last_average
            weights = self.num_tasks * torch.softmax(rates / self.temperature, dim=0)
            self.epoch_weights.copy_(weights)
        self.last_average.copy_(average)
        self.loss_sum.zero_()
        self.num_steps.zero_()
        self.num_epochs.add_(1)
        return self.epoch_weights.clone()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"
