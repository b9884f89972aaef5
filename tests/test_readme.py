"""The README's Python examples run as written."""

from __future__ import annotations

import linecache
import re
import socket
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples written for torchrun run here as one rank (torchrun's variables for env://).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))]:
        monkeypatch.setenv(name, value)
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for i, block in enumerate(blocks):
        # Each block under a name of its own, its source in linecache: tools that read the
        # source of the code they run (torch.compile) see the block, not README.md's lines.
        name = f"<README.md, python example {i + 1}>"
        linecache.cache[name] = (len(block), None, block.splitlines(True), name)
        exec(compile(block, name, "exec"), {})
