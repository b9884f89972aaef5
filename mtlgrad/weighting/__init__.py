"""Loss-based weighting: one scalar to backpropagate from the task losses, no per-task gradients.

.. code-block:: python

    weighting = UncertaintyWeighting(num_tasks=3)
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()])
    weighting(losses).backward()
"""

from mtlgrad.weighting._base import LossWeighting
from mtlgrad.weighting._uncertainty import UncertaintyWeighting

__all__ = ["LossWeighting", "UncertaintyWeighting"]
