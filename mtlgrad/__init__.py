"""mtlgrad: fast multi-task gradient combination for PyTorch.

The native ops (``mtlgrad.ops``) compute the Gram matrix of the task gradients and weighted sums
of them over a whole model's gradient lists in one pass each, on CPU and CUDA.
"""

from mtlgrad._extension import load as _load_extension

_C = _load_extension()

from mtlgrad import aggregators, ops  # noqa: E402  (they need the extension loaded first)
from mtlgrad.ops import NonFiniteGradientError, combine, gram  # noqa: E402

__version__ = "0.1.0"

__all__ = ["NonFiniteGradientError", "aggregators", "combine", "gram", "ops"]
