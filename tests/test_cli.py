"""The ``mtlgrad`` command itself: ``--version`` and the help texts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mtlgrad
from mtlgrad.cli import main
from mtlgrad.demo import BY_NAME_METHODS, DEFAULT_METHODS, LOSS_WEIGHTINGS
from mtlgrad.demo._methods import METHODS


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"mtlgrad {mtlgrad.__version__}" == "mtlgrad 0.1.0"
    cuda = "built" if mtlgrad._C.with_cuda else "not built"
    assert second == (
        f"torch {torch.__version__}; CUDA ops: {cuda}; CPU kernels: {mtlgrad.ops.cpu_kernels()}"
    )


def test_version_as_a_module() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "mtlgrad", "--version"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"mtlgrad {mtlgrad.__version__}\ntorch ")


def test_demo_help_lists_what_runs_by_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"methods run by default: {', '.join(DEFAULT_METHODS)}." in text
    assert f"also available by name: {', '.join(BY_NAME_METHODS)}." in text
    # Every loss weighting is listed as one, and every method is listed once or the other way.
    assert f"not run on the toy: {', '.join(LOSS_WEIGHTINGS)}." in text
    assert {key for key, m in METHODS.items() if m.loss_based} == set(LOSS_WEIGHTINGS)
    assert sorted(DEFAULT_METHODS + BY_NAME_METHODS) == sorted(METHODS)
