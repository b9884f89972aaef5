"""mtlgrad: fast multi-task gradient combination for PyTorch.

The native ops (``mtlgrad.ops``) compute the Gram matrix of the task gradients and weighted sums
of them over a whole model's gradient lists in one pass each, on CPU and CUDA.
"""

from mtlgrad.ops._extension import load as _load_extension

_C = _load_extension()

from mtlgrad import (  # noqa: E402  (they need the extension loaded first)
    aggregators,
    diagnostics,
    nn,
    ops,
    optim,
    regularizers,
    solvers,
    step,
    weighting,
)
from mtlgrad.ops import GramOverflowError, NonFiniteGradientError, combine, gram  # noqa: E402
from mtlgrad.step import GramEngine, StepRecord, backward  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GramOverflowError",
    "GramEngine",
    "NonFiniteGradientError",
    "StepRecord",
    "aggregators",
    "backward",
    "combine",
    "diagnostics",
    "gram",
    "nn",
    "ops",
    "optim",
    "regularizers",
    "solvers",
    "step",
    "weighting",
]
