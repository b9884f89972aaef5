"""Loss-based weighting: one scalar to backpropagate from the task losses, no per-task gradients.

.. code-block:: python

    weighting = UncertaintyWeighting(num_tasks=3)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()])
    weighting(losses).backward()

Every weighting is an ``nn.Module`` called on the task losses; its running state is in
``state_dict()``. Methods that need more than the losses of the step say so in their docstring:
:class:`DWA` and :class:`STCH` (``end_epoch()`` after each epoch), :class:`FAMO`
(``update(new_losses)`` after the model's step) and :class:`GradNorm` (the last shared layer's
parameters, given at construction).
"""

from mtlgrad.weighting._base import LossWeighting
from mtlgrad.weighting._constant import Constant
from mtlgrad.weighting._dwa import DWA
from mtlgrad.weighting._equal import Equal
from mtlgrad.weighting._famo import FAMO
from mtlgrad.weighting._gls import GLS
from mtlgrad.weighting._gradnorm import GradNorm
from mtlgrad.weighting._rlw import RLW
from mtlgrad.weighting._stch import STCH
from mtlgrad.weighting._uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "RLW",
    "STCH",
    "Constant",
    "Equal",
    "GradNorm",
    "LossWeighting",
    "UncertaintyWeighting",
]
