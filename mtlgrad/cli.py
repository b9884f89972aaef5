"""The ``mtlgrad`` command: ``mtlgrad demo``, ``mtlgrad bench`` and ``mtlgrad --version``.

Each subcommand lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int``; this file only wires them together. Building the parser imports every
subcommand module, so those modules keep their own imports light: matplotlib and tqdm (the
``cli`` extra: ``pip install "mtlgrad[cli]"``) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
COMMANDS = {
    "demo": ("mtlgrad.demo", "train several methods on a built-in multi-task problem"),
    "bench": ("mtlgrad.bench", "benchmark the kernels, the aggregators and the training step"),
}


def version_text() -> str:
    """``mtlgrad X.Y.Z``, then the torch it runs with and what the native extension holds."""
    import torch

    import mtlgrad
    from mtlgrad import ops

    cuda = "built" if getattr(mtlgrad._C, "with_cuda", False) else "not built"
    return (
        f"mtlgrad {mtlgrad.__version__}\n"
        f"torch {torch.__version__}; CUDA ops: {cuda}; CPU kernels: {ops.cpu_kernels()}"
    )


class _Version(argparse.Action):
    """``--version``: prints :func:`version_text` and exits (computed only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlgrad", description="Fast multi-task gradient combination for PyTorch."
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="print mtlgrad's version, the torch version and whether the CUDA ops were built",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
