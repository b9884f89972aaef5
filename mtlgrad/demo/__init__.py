"""``mtlgrad demo``: several methods on a built-in multi-task problem, in about a minute.

``mtlgrad demo`` trains the same shared-trunk model, from the same initialisation, with each
method (Adam, the same batches, the same number of steps) on a generated problem: four regression
tasks whose scales span four orders of magnitude (GradNorm's synthetic set-up) and a
classification task. It prints a table (test metric per task, Δm% against Sum, time per step,
share of conflicting task pairs) and writes a figure and the table (markdown, JSON) to ``--out``.

``mtlgrad demo toy`` runs the methods on CAGrad's two-objective toy problem from five starting
points and draws their trajectories.

Only the standard library and mtlgrad's own light modules are imported here; torch and the
``cli`` extra (matplotlib, tqdm) are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

__all__ = ["configure_parser", "run"]

DEFAULT_METHODS = (
    *("sum", "mean", "pcgrad", "mgda", "cagrad", "upgrad", "nashmtl", "imtlg"),
    *("uw", "gradnorm", "dwa", "famo"),
)
DEFAULT_TOY_METHODS = ("mean", "mgda", "pcgrad", "cagrad", "nashmtl", "upgrad", "imtlg")
# Available by name (--methods), not run by default.
BY_NAME_METHODS = (
    *("dualproj", "alignedmtl", "config", "gradvac", "graddrop", "rlw", "constant"),
    *("excessmtl", "moco", "dbmtl", "modo", "sdmgrad", "krum", "trimmedmean", "pcd", "crmogm"),
    *("gls", "stch"),
)
LOSS_WEIGHTINGS = ("uw", "gradnorm", "dwa", "famo", "gls", "stch")
# (default, --quick) steps
STEPS = {"mtl": (4000, 60), "toy": (35000, 400)}


def _wrapped(items: tuple[str, ...], first: str) -> str:
    return textwrap.fill(first + ", ".join(items) + ".", width=96, subsequent_indent="  ")


EPILOG = f"""\
examples:
  mtlgrad demo                                   all default methods, about a minute on 2 cores
  mtlgrad demo --methods sum,pcgrad,nash-mtl,uw  a subset (Sum, the Δm baseline, is always run)
  mtlgrad demo toy --out figures                 CAGrad's toy problem, 5 starting points

{_wrapped(DEFAULT_METHODS, "methods run by default: ")}
{_wrapped(BY_NAME_METHODS, "also available by name: ")}
{_wrapped(LOSS_WEIGHTINGS, "loss weightings (uw: uncertainty weighting), not run on the toy: ")}
{_wrapped(DEFAULT_TOY_METHODS, "methods run by default on the toy: ")}
"""


def _method_list(text: str) -> list[str]:
    names = [name for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of method names")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's arguments to ``parser`` (the ``demo`` subcommand's parser)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "problem",
        nargs="?",
        choices=["toy"],
        help="'toy' for CAGrad's two-objective toy problem; omit for the multi-task problem",
    )
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        help="comma-separated methods to run (default: the methods run by default, below)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=(
            f"training steps per method (default: {STEPS['mtl'][0]}, toy {STEPS['toy'][0]}; "
            f"--quick: {STEPS['mtl'][1]}, toy {STEPS['toy'][1]})"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("mtlgrad-demo"),
        help="folder for the figure and the tables (default: ./mtlgrad-demo)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds: a small budget, for a smoke test"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="toy only: factor of the first objective (default 0.1, as Nash-MTL; CAGrad used 1)",
    )


def _error(message: str) -> int:
    print(f"mtlgrad demo: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Runs ``mtlgrad demo`` (or ``mtlgrad demo toy``) with the parsed ``args``."""
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"mtlgrad demo needs matplotlib and tqdm ({error.name or error} is missing): "
            'pip install "mtlgrad[cli]"'
        ) from error
    from mtlgrad.demo._methods import METHODS, resolve_methods

    toy = args.problem == "toy"
    if args.scale is not None and not toy:
        return _error("--scale applies to the toy problem only (mtlgrad demo toy --scale ...)")
    allowed = [key for key, m in METHODS.items() if m.runs_on_toy or not toy]
    names = args.methods or list(DEFAULT_TOY_METHODS if toy else DEFAULT_METHODS)
    try:
        methods = resolve_methods(names, allowed)
    except ValueError as error:
        weightings = ", ".join(key for key, m in METHODS.items() if m.loss_based)
        others = ", ".join(key for key, m in METHODS.items() if not (m.toy or m.loss_based))
        hint = (
            f" ({weightings}: loss weightings; {others}: set for the multi-task problem's five "
            "tasks (Constant's weights, Krum's and TrimmedMean's outlier counts), the toy has "
            "two; not run on the toy)"
            if toy
            else ""
        )
        return _error(f"--methods: {error}{hint}")
    default_steps, quick_steps = STEPS["toy" if toy else "mtl"]
    steps = args.steps or (quick_steps if args.quick else default_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if toy:
        from mtlgrad.demo._run import run_toy_demo

        return run_toy_demo(methods, steps, args.seed, out, args.scale)
    from mtlgrad.demo._run import run_mtl_demo

    return run_mtl_demo(methods, steps, args.seed, out, args.quick)
