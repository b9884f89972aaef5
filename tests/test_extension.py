"""Loading the native extension: clear ImportErrors instead of loader traces."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import mtlgrad
from mtlgrad import ops


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_missing_extension_says_what_to_run() -> None:
    result = run_python(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "mtlgrad._C":
                    raise ImportError("undefined symbol: _ZN3c104impl3fooEv")
        sys.meta_path.insert(0, Block())
        import mtlgrad
        """
    )
    assert result.returncode != 0
    assert (
        "ImportError: mtlgrad's native extension (mtlgrad._C) could not be loaded" in result.stderr
    )
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_extension_built_for_another_torch() -> None:
    result = run_python(
        """
        import torch
        torch.__version__ = "1.0.0"
        import mtlgrad
        """
    )
    assert result.returncode != 0
    assert "was built against torch" in result.stderr
    assert "but torch 1.0.0 is installed" in result.stderr


def test_build_information() -> None:
    import torch

    assert mtlgrad._C.torch_version == torch.__version__
    assert ops.cpu_kernels() in ops.supported_cpu_kernels()
    assert ops.supported_cpu_kernels()[0] == "generic"


def test_importing_the_source_tree_says_so(tmp_path) -> None:
    # Run from a source checkout's root, Python imports its mtlgrad/ folder (no extension built
    # there) instead of the installed package.
    import shutil
    from pathlib import Path

    package = Path(mtlgrad.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "mtlgrad", ignore=shutil.ignore_patterns("_C.*"))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'mtlgrad'\n")
    (tmp_path / "csrc").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "import mtlgrad"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "mtlgrad was imported from its source tree" in result.stderr
    assert "run from another folder" in result.stderr
