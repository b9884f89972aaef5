"""The native float64 solvers on the Gram matrix: ``torch.ops.mtlgrad.<method>_weights``.

Each solver is declared once, next to its implementation, in ``csrc/solvers/<method>.cpp``
(``TORCH_LIBRARY_FRAGMENT``), and called from its aggregator's module
(``mtlgrad/aggregators/_<method>.py``). Every solver takes the T x T float64 CPU Gram matrix as
its first argument, named ``gram``, and returns float64 tensors: a return named like one of its
tensor arguments has that argument's shape (GradVac's ``targets``), any other return is one value
per task (``weights``, Nash-MTL's ``alpha``). The fake implementations that torch.compile needs are
derived here from those schemas, so a new method adds no line to this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mtlgrad.ops._extension import load as _load_extension

_load_extension()  # registers torch.ops.mtlgrad.*

__all__ = ["solver_names"]

_SUFFIX = "_weights"


def _solver_schemas() -> list[Any]:
    return [
        schema
        for schema in torch._C._jit_get_all_schemas()
        if schema.name.startswith("mtlgrad::") and schema.name.endswith(_SUFFIX)
    ]


def solver_names() -> list[str]:
    """Names of the registered solver ops (``torch.ops.mtlgrad.<name>``), sorted."""
    return sorted(schema.name.split("::", 1)[1] for schema in _solver_schemas())


def _fake_for(schema: Any) -> Callable[..., Any]:
    names = [argument.name for argument in schema.arguments]
    if not names or names[0] != "gram":
        raise RuntimeError(
            f"{schema.name}: a solver's first argument must be the Gram matrix, named 'gram'"
        )
    returns = [r.name for r in schema.returns]

    def fake(*args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        gram = bound["gram"]
        outputs = []
        for name in returns:
            like = bound.get(name)
            if isinstance(like, Tensor):
                outputs.append(torch.empty_like(like, dtype=torch.float64))
            else:
                outputs.append(gram.new_empty((gram.shape[0],), dtype=torch.float64))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return fake


for _schema in _solver_schemas():
    torch.library.register_fake(_schema.name)(_fake_for(_schema))
