"""The peer libraries the benchmarks compare against, found by import (optional extra
``compare``: ``pip install "mtlgrad[compare]"`` brings TorchJD)."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# peer -> (module to import, distribution name, how to install)
PEERS = {
    "TorchJD": ("torchjd.aggregation", "torchjd", 'pip install "mtlgrad[compare]"'),
    # LibMTL 1.1.5 (the release on PyPI) imports torchvision.models.utils, gone since
    # torchvision 0.13: with a current torch it installs but cannot be imported.
    "LibMTL": ("LibMTL.weighting", "LibMTL", "pip install LibMTL, with a torchvision < 0.13"),
}


def detect() -> dict[str, dict[str, Any]]:
    """For each peer: ``installed``, ``version`` and, when missing, a ``note`` saying so."""
    found: dict[str, dict[str, Any]] = {}
    for name, (module, distribution, install) in PEERS.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001  (ImportError, or a broken install)
            reason = (
                "not installed"
                if _is_missing(error, module)
                else f"installed but cannot be imported ({type(error).__name__}: {error})"
            )
            found[name] = {
                "installed": False,
                "version": None,
                "note": f"{reason} ({install}): its rows are not run",
            }
            continue
        try:
            found[name] = {"installed": True, "version": version(distribution), "note": ""}
        except PackageNotFoundError:
            found[name] = {"installed": True, "version": "unknown", "note": ""}
    return found


def _is_missing(error: Exception, module: str) -> bool:
    """Whether ``error`` says that ``module`` itself (or a parent package) is absent, rather
    than something it imports."""
    parts = module.split(".")
    parents = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return isinstance(error, ModuleNotFoundError) and error.name in parents


def status(peers: dict[str, dict[str, Any]], name: str) -> str:
    """A table cell for a row of ``name`` that was not run because the peer is missing."""
    return f"{name} not installed" if not peers[name]["installed"] else ""
