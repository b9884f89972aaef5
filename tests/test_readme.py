"""The README's Python examples run as written."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for i, block in enumerate(blocks):
        # Each block under a name of its own, its source in linecache: tools that read the
        # source of the code they run (torch.compile) see the block, not README.md's lines.
        name = f"<README.md, python example {i + 1}>"
        linecache.cache[name] = (len(block), None, block.splitlines(True), name)
        exec(compile(block, name, "exec"), {})
