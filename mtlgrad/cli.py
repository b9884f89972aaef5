"""The ``mtlgrad`` command: ``mtlgrad demo`` and ``mtlgrad bench``.

Each subcommand lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int``; this file only wires them together, importing each one when it runs (the
command-line tools need the ``cli`` extra: ``pip install "mtlgrad[cli]"``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Callable

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("mtlgrad.demo", "train several methods on a built-in multi-task problem"),
    "bench": ("mtlgrad.bench", "benchmark the kernels, the aggregators and the training step"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlgrad", description="Fast multi-task gradient combination for PyTorch."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            # A subcommand missing from this installation must not break the others.
            sub = subparsers.add_parser(name, help=f"(not installed) {help_text}")
            sub.set_defaults(run=_unavailable(name, module_name))
            continue
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub)
        sub.set_defaults(run=module.run)
    return parser


def _unavailable(name: str, module_name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"mtlgrad {name}: {module_name} is not part of this installation", file=sys.stderr)
        return 1

    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
