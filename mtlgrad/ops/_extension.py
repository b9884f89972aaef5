"""Loads the native extension ``mtlgrad._C`` (which registers ``torch.ops.mtlgrad.*``).

A missing extension, or one built against another torch, is reported as an ImportError that says
how to rebuild, instead of a bare undefined-symbol trace from the dynamic loader.
"""

from __future__ import annotations

from types import ModuleType

import torch

_REBUILD = (
    "Build it from the mtlgrad source tree with\n"
    "    pip install torch numpy scikit-build-core pybind11 ninja cmake\n"
    "    pip install --no-build-isolation -e .\n"
    "(the build must see the torch it will run with, hence --no-build-isolation)."
)


def load() -> ModuleType:
    """Imports and returns ``mtlgrad._C``, or raises an ImportError that says what to run."""
    try:
        from mtlgrad import _C
    except ImportError as error:
        raise ImportError(
            f"mtlgrad's native extension (mtlgrad._C) could not be loaded: {error}\n"
            f"Either it was never built, or it was built against another torch than the "
            f"installed {torch.__version__}. {_REBUILD}"
        ) from error
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"mtlgrad's native extension was built against torch {_C.torch_version}, but torch "
            f"{torch.__version__} is installed; its ops would not match this torch's ABI. "
            f"{_REBUILD}"
        )
    return _C
