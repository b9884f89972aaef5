"""Each shared layer's contribution to G = J Jᵀ, from its inputs and its outputs' per-task
gradients, without the per-task gradients of the whole model.

G is a sum over parameters: ``G[i, j] = Σ_p <∂L_i/∂p, ∂L_j/∂p>``. For one layer, the gradient of
task t with respect to its parameters is a function of the layer's input (saved in the forward)
and of ``δ_t``, the gradient of task t's loss with respect to the layer's output (the engine gets
all T of them from one vmapped backward). A layer called several times in one forward (tied
weights, recurrence) has the sum of its calls' gradients: the calls are combined before the
products, so the cross terms are exact.

Linear, Conv1d/Conv2d (a product ``δᵀ X`` of rows: a Linear's inputs flattened over batch and
tokens, a convolution's unfolded patches) take the cheaper of two exact ways:

- **ghost** (Goodfellow 2015's trick for per-example norms, here for task pairs): with the
  R x R input Gram ``A = X Xᵀ``, ``<δ_iᵀX, δ_jᵀX> = <δ_i, A δ_j>``; cost about
  ``R²·in + T·R²·out + T²·R·out`` multiply-adds, memory ``R² + T·R·out / 4`` (a quarter
  of the tasks at a time);
- **materialise**: the T gradients ``δ_tᵀ X`` (``T·R·in·out``) and their Gram with the native
  ``gram`` op (``T²·in·out / 2``), memory ``T·in·out`` (one layer's, then dropped).

The ghost way wins when the rows (batch x tokens) are few against the layer's width. Embedding
sums δ's rows per distinct index; the norm layers (LayerNorm, GroupNorm, BatchNorm) have
per-channel affine parameters whose T gradients are small, summed from δ and the recomputed
normalised input. Any other module with parameters takes its T gradients from autograd, one
task at a time, on its own part of the graph (``generic``).

Under torch.distributed the engine needs every layer's T gradients themselves (it averages them
over the ranks before their Gram): the handlers are then asked for ``gradients=True``, which takes
the materialising way everywhere (and Embedding's full table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Block",
    "LayerCall",
    "contribution",
    "gram64",
    "handler_for",
    "planned_way",
    "weight_row_costs",
]


@dataclass
class LayerCall:
    """One forward call of a hooked module: what its contribution needs."""

    saved: dict[str, Any]
    originals: tuple[Tensor, ...] = ()  # the outputs before the engine's identity (generic path)
    grads: list[Tensor] = field(default_factory=list)  # T-batched gradients of the outputs
    output_shapes: tuple[torch.Size, ...] = ()  # of the outputs the identity hands over


@dataclass
class Block:
    """One parameter's part of a layer's contribution: its T x T Gram block (float64, the ghost
    way) or its T per-task gradients (``T x ...``, as many entries per task as the parameter), whose
    Gram the engine takes (after averaging them over the ranks, under torch.distributed). A NaN or
    Inf in a task's gradient reaches its diagonal entry (0 * Inf and 0 * NaN are NaN), which is how
    the engine finds it."""

    position: int
    gram: Tensor | None = None
    grads: Tensor | None = None


# A handler: (module, calls, params to include as {name: position}, T, gradients) -> [Block]
# (``gradients``: every block as per-task gradients).
Handler = Callable[[nn.Module, Sequence[LayerCall], dict, int, bool], list]


def _float(x: Tensor) -> Tensor:
    """The working precision of the products: float64 stays, anything else is float32."""
    return x if x.dtype == torch.float64 else x.float()


def _cat(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat``, without the copy when a module was called once (the usual case)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def gram64(M: Tensor) -> Tensor:
    """T x T Gram of the rows of M (T x n), in float64."""
    M = M.reshape(M.shape[0], -1)
    return (M @ M.T).to(torch.float64)


def weight_row_costs(rows: int, fan_in: int, fan_out: int, tasks: int) -> tuple[int, int]:
    """Multiply-adds of the ghost and the materialising ways for a weight ``δᵀ X`` (the cost
    model above)."""
    ghost = rows * rows * fan_in + tasks * rows * rows * fan_out + tasks * tasks * rows * fan_out
    materialise = tasks * rows * fan_in * fan_out + tasks * (tasks + 1) // 2 * fan_in * fan_out
    return ghost, materialise


def _way(rows: int, fan_in: int, fan_out: int, tasks: int) -> str:
    """The cheaper way by the cost model (or as a test forces it)."""
    if FORCE_WAY[0] is not None:
        return FORCE_WAY[0]
    ghost, materialise = weight_row_costs(rows, fan_in, fan_out, tasks)
    return "ghost" if ghost <= materialise else "materialise"


def planned_way(
    module: nn.Module, handler_name: str, calls: Sequence[LayerCall], params: dict, T: int
) -> str:
    """The way a module's contribution takes in a step with T tasks, known from what its forward
    calls kept (before the backward): "ghost" for a Linear or convolution weight the cost model
    gives to it, else "materialise" (every other parameter's contribution comes from its T
    gradients)."""
    if "weight" not in params:
        return "materialise"
    if handler_name == "linear":
        rows = sum(c.saved["input"].numel() // module.in_features for c in calls)
        return _way(rows, module.in_features, module.out_features, T)
    if handler_name == "conv":
        rows = sum(c.output_shapes[0].numel() // module.out_channels for c in calls)
        return _way(rows, module.weight[0].numel(), module.out_channels, T)
    return "materialise"


def _rows_gram(X: Tensor, D: Tensor, way: str) -> Tensor:
    """Σ over the rows of ``<δ_iᵀX, δ_jᵀX>`` (the ghost way, T x T float64), or the T gradients
    ``δ_tᵀX`` (the materialising way, T x out x in): X is R x in, D is T x R x out."""
    T, R, out = D.shape
    if way == "ghost":
        A = X @ X.T
        flat = D.reshape(T, -1)
        G = D.new_empty(T, T)
        # A δ_j for a quarter of the tasks at a time (the layer's output gradients are the
        # largest thing the ghost way holds: a quarter more of them, not a second copy), each
        # block of columns one product with a long inner dimension.
        chunk = -(-T // 4)
        for j in range(0, T, chunk):
            M = torch.matmul(A, D[j : j + chunk])
            G[:, j : j + chunk] = flat @ M.reshape(M.shape[0], -1).T
        return G.to(torch.float64)
    return torch.matmul(D.transpose(1, 2), X)  # T x out x in


def _rows_block(position: int, X: Tensor, D: Tensor, way: str) -> Block:
    product = _rows_gram(X, D, way)
    return Block(position, gram=product) if way == "ghost" else Block(position, grads=product)


#: Tests set this to "ghost" or "materialise" to run one way on every layer.
FORCE_WAY: list[str | None] = [None]


def _linear(
    module: nn.Linear, calls: Sequence[LayerCall], params: dict, T: int, gradients: bool
) -> list:
    X = _cat([_float(c.saved["input"]).reshape(-1, module.in_features) for c in calls])
    D = _cat([_float(c.grads[0]).reshape(T, -1, module.out_features) for c in calls], dim=1)
    result = []
    if "weight" in params:
        way = "materialise" if gradients else planned_way(module, "linear", calls, params, T)
        result.append(_rows_block(params["weight"], X, D, way))
    if "bias" in params:
        result.append(Block(params["bias"], grads=D.sum(dim=1)))
    return result


# ---- Conv1d / Conv2d ---------------------------------------------------------------------------


def _conv_supported(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups == 1
        and not isinstance(module.padding, str)
    )


def _conv_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The unfolded patches of a convolution's input as rows (B·L x in·k)."""
    one_d = isinstance(module, nn.Conv1d)
    if one_d:
        x = x.unsqueeze(2)
    kernel = (1, *module.kernel_size) if one_d else module.kernel_size
    stride = (1, *module.stride) if one_d else module.stride
    dilation = (1, *module.dilation) if one_d else module.dilation
    padding = (0, *module.padding) if one_d else module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0, 0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _conv_gradients(module: nn.Module, x: Tensor, D: Tensor) -> Tensor:
    """The T per-task weight gradients of one call (T x out x in x k...): the convolution's own
    weight backward, once per task (torch's kernel; no unfolded copy of the input)."""
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    weight = module.weight.detach().to(x.dtype)
    grads = x.new_empty(D.shape[0], *weight.shape)
    for t in range(D.shape[0]):
        grads[t] = torch.ops.aten.convolution_backward(
            D[t],
            x,
            weight,
            None,
            list(module.stride),
            list(padding),
            list(module.dilation),
            False,
            [0] * len(module.kernel_size),
            1,
            [False, True, False],
        )[1]
    return grads


def _conv(
    module: nn.Module, calls: Sequence[LayerCall], params: dict, T: int, gradients: bool
) -> list:
    inputs = [_float(c.saved["input"]) for c in calls]
    grads = [_float(c.grads[0]) for c in calls]
    result = []
    if "weight" in params:
        way = "materialise" if gradients else planned_way(module, "conv", calls, params, T)
        if way == "ghost":
            X = _cat([_conv_rows(module, x) for x in inputs])
            D = _cat(
                [
                    g.reshape(T, g.shape[1], module.out_channels, -1)
                    .transpose(2, 3)
                    .reshape(T, -1, module.out_channels)
                    for g in grads
                ],
                dim=1,
            )
            result.append(_rows_block(params["weight"], X, D, "ghost"))
        else:
            summed = _conv_gradients(module, inputs[0], grads[0])
            for x, g in zip(inputs[1:], grads[1:]):
                summed += _conv_gradients(module, x, g)
            result.append(Block(params["weight"], grads=summed))
    if "bias" in params:
        bias = sum(g.reshape(T, g.shape[1], module.out_channels, -1).sum(dim=(1, 3)) for g in grads)
        result.append(Block(params["bias"], grads=bias))
    return result


# ---- Embedding ---------------------------------------------------------------------------------


def _embedding(
    module: nn.Embedding, calls: Sequence[LayerCall], params: dict, T: int, gradients: bool
) -> list:
    if "weight" not in params:
        return []
    index = _cat([c.saved["input"].reshape(-1) for c in calls])
    D = _cat([_float(c.grads[0]).reshape(T, -1, module.embedding_dim) for c in calls], 1)
    if module.padding_idx is not None:
        keep = index != module.padding_idx
        index, D = index[keep], D[:, keep]
    rows, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
    summed = D.new_zeros(T, rows.numel(), module.embedding_dim).index_add_(1, inverse, D)
    if module.scale_grad_by_freq:
        summed = summed / counts.to(summed.dtype).unsqueeze(-1)
    if gradients:  # the whole table's: the ranks' rows differ
        table = summed.new_zeros(T, module.num_embeddings, module.embedding_dim)
        summed = table.index_copy_(1, rows, summed)
    return [Block(params["weight"], grads=summed)]


# ---- norm layers ---------------------------------------------------------------------------------


def _memo(call: LayerCall, name: str, compute: Callable[[LayerCall], Tensor]) -> Tensor:
    """``compute(call)``, kept for the handler's next task where the engine runs one task at a
    time (it gives the call a ``saved["memo"]`` dict then, and drops it after the last task);
    computed afresh otherwise."""
    memo = call.saved.get("memo")
    if memo is None:
        return compute(call)
    if name not in memo:
        memo[name] = compute(call)
    return memo[name]


def _affine(normalised: Tensor, D: Tensor, reduce_dims: tuple[int, ...], params: dict) -> list:
    result = []
    if "weight" in params:
        result.append(Block(params["weight"], grads=(D * normalised).sum(dim=reduce_dims)))
    if "bias" in params:
        result.append(Block(params["bias"], grads=D.sum(dim=reduce_dims)))
    return result


def _layer_norm(
    module: nn.LayerNorm, calls: Sequence[LayerCall], params: dict, T: int, gradients: bool
) -> list:
    dims = tuple(range(-len(module.normalized_shape), 0))

    def normalise(c: LayerCall) -> Tensor:
        x = _float(c.saved["input"])
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        return ((x - mean) / torch.sqrt(var + module.eps)).reshape(-1, *module.normalized_shape)

    parts = []
    for c in calls:
        normalised = _memo(c, "normalised", normalise)
        D = _float(c.grads[0]).reshape(T, -1, *module.normalized_shape)
        parts.append((normalised, D))
    normalised = _cat([p[0] for p in parts])
    D = _cat([p[1] for p in parts], dim=1)
    return _affine(normalised.unsqueeze(0), D, (1,), params)


def _group_norm(
    module: nn.GroupNorm, calls: Sequence[LayerCall], params: dict, T: int, gradients: bool
) -> list:

    def normalise(c: LayerCall) -> Tensor:  # C x (B·positions)
        x = _float(c.saved["input"])
        B, C = x.shape[:2]
        grouped = x.reshape(B, module.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        var = grouped.var(dim=2, unbiased=False, keepdim=True)
        normalised = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(B, C, -1)
        return normalised.transpose(0, 1).reshape(C, -1)

    parts = []
    for c in calls:
        B, C = c.saved["input"].shape[:2]
        normalised = _memo(c, "normalised", normalise)
        D = _float(c.grads[0]).reshape(T, B, C, -1)
        parts.append((normalised, D.transpose(1, 2).reshape(T, C, -1)))
    normalised = _cat([p[0] for p in parts], dim=1)
    D = _cat([p[1] for p in parts], dim=2)
    return _affine(normalised.unsqueeze(0), D, (2,), params)


def _batch_norm(
    module: nn.modules.batchnorm._BatchNorm, calls, params: dict, T: int, gradients: bool
) -> list:

    def normalise(c: LayerCall) -> Tensor:  # B x C x positions
        x = _float(c.saved["input"])
        B, C = x.shape[:2]
        x = x.reshape(B, C, -1)
        if c.saved["batch_stats"]:
            mean = x.mean(dim=(0, 2), keepdim=True)
            var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
        else:
            mean = _float(c.saved["running_mean"]).reshape(1, C, 1)
            var = _float(c.saved["running_var"]).reshape(1, C, 1)
        return (x - mean) / torch.sqrt(var + module.eps)

    weight, bias = [], []
    for c in calls:
        B, C = c.saved["input"].shape[:2]
        D = _float(c.grads[0]).reshape(T, B, C, -1)
        if "weight" in params:
            normalised = _memo(c, "normalised", normalise)
            weight.append((D * normalised).sum(dim=(1, 3)))
        if "bias" in params:
            bias.append(D.sum(dim=(1, 3)))
    result = []
    if weight:
        result.append(Block(params["weight"], grads=sum(weight)))
    if bias:
        result.append(Block(params["bias"], grads=sum(bias)))
    return result


# ---- any other module: its T gradients from autograd ---------------------------------------------


def generic_gradients(
    module: nn.Module, call: LayerCall, params: dict, T: int
) -> list[list[Tensor]]:
    """For each task, the gradients of this call's outputs, weighted by the task's δ, with respect
    to the module's own parameters in ``params`` (autograd on the module's part of the graph)."""
    own = dict(module.named_parameters(recurse=False))
    names = list(params)
    tensors = [own[n] for n in names]
    outputs = [o for o, g in zip(call.originals, call.grads) if g is not None]
    grads = [g for g in call.grads if g is not None]
    result = []
    for t in range(T):
        per_task = torch.autograd.grad(
            outputs,
            tensors,
            grad_outputs=[g[t] for g in grads],
            retain_graph=True,
            allow_unused=True,
        )
        result.append([torch.zeros_like(p) if g is None else g for p, g in zip(tensors, per_task)])
    return result


# ---- what each module's forward must keep -----------------------------------------------------


def _save_input(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    x = args[0] if args else next(iter(kwargs.values()))
    return {"input": x.detach()}


def _save_batch_norm(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    saved = _save_input(module, args, kwargs)
    batch_stats = module.training or module.running_mean is None
    saved["batch_stats"] = batch_stats
    if not batch_stats:
        saved["running_mean"] = module.running_mean.detach().clone()
        saved["running_var"] = module.running_var.detach().clone()
    return saved


@dataclass(frozen=True)
class LayerHandler:
    """How the engine treats one module type: what its forward keeps, and its contribution
    (``None``: the generic path)."""

    name: str
    save: Callable[[nn.Module, tuple, dict], dict] | None
    contribution: Handler | None


_GENERIC = LayerHandler("generic", None, None)


def handler_for(module: nn.Module) -> LayerHandler:
    """The direct handler of a module type, or the generic path."""
    if type(module) is nn.Linear:
        return LayerHandler("linear", _save_input, _linear)
    if type(module) in (nn.Conv1d, nn.Conv2d) and _conv_supported(module):
        return LayerHandler("conv", _save_input, _conv)
    if type(module) is nn.Embedding:
        return LayerHandler("embedding", _save_input, _embedding)
    if type(module) is nn.LayerNorm:
        return LayerHandler("layer_norm", _save_input, _layer_norm)
    if type(module) is nn.GroupNorm:
        return LayerHandler("group_norm", _save_input, _group_norm)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return LayerHandler("batch_norm", _save_batch_norm, _batch_norm)
    return _GENERIC


def contribution(
    module: nn.Module,
    handler: LayerHandler,
    calls: Sequence[LayerCall],
    params: dict,
    T: int,
    gradients: bool = False,
) -> list[Block]:
    """A :class:`Block` for each parameter in ``params`` (``{name: position}``) from this
    module's calls, by its direct handler (``gradients``: each block's per-task gradients)."""
    assert handler.contribution is not None
    return handler.contribution(module, calls, params, T, gradients)
