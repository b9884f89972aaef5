"""Loads the native extension ``mtlgrad._C`` (which registers ``torch.ops.mtlgrad.*``).

A missing extension, or one built against another torch, is reported as an ImportError that says
how to rebuild, instead of a bare undefined-symbol trace from the dynamic loader.
"""

from __future__ import annotations

from pathlib import Path
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
        source_tree = _source_tree_without_extension()
        if source_tree is not None:
            raise ImportError(
                f"mtlgrad was imported from its source tree ({source_tree}), which holds no "
                "built extension (mtlgrad._C): Python looks in the current folder first. If "
                "mtlgrad is installed (pip install --no-build-isolation .), run from another "
                "folder so that the installed copy is imported; to work in the source tree, "
                "build it in place with\n"
                "    pip install --no-build-isolation -e ."
            ) from error
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


def _source_tree_without_extension() -> Path | None:
    """The repository root when the imported package is the source checkout's ``mtlgrad/``
    folder (it has ``pyproject.toml`` and ``csrc/`` beside it) with no extension built in it."""
    package = Path(__file__).resolve().parent.parent
    root = package.parent
    if not ((root / "pyproject.toml").is_file() and (root / "csrc").is_dir()):
        return None
    if any(package.glob("_C.*")):
        return None
    return root
