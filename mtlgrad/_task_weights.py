"""The one check of user-given per-task weights (``aggregators.Constant``,
``weighting.Constant``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from torch import Tensor


def task_weight_list(weights: Sequence[float] | Tensor, *, non_negative: bool) -> list[float]:
    """``weights`` (a sequence of numbers or a 1-D tensor) as floats, one per task, each finite
    (and ``>= 0`` with ``non_negative``); errors name the argument and the offending entry."""
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(
                f"weights must be 1-D (one per task), got shape {tuple(weights.shape)}"
            )
        values = weights.detach().double().cpu().tolist()
    else:
        try:
            values = list(weights)
        except TypeError:
            raise TypeError(
                f"weights must be a sequence of numbers, got {type(weights).__name__}"
            ) from None
    if not values:
        raise ValueError("weights must hold one weight per task, got none")
    for t, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{t}] must be a number, got {type(w).__name__}")
        if non_negative and not (math.isfinite(w) and w >= 0):  # NaN fails both
            raise ValueError(f"weights[{t}] must be finite and non-negative, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"weights[{t}] must be finite, got {w!r}")
    return [float(w) for w in values]
