"""The Gram engine: the exact Gram matrix of the task gradients, layer by layer, without the
task Jacobian; then one backward of ``Σ_t w_t L_t`` writes the exact update.

How it works:

1. ``GramEngine(model)`` registers a forward hook on every module that owns parameters. During a
   forward with gradients enabled, the hook keeps what the module's contribution to G needs (its
   input; see :mod:`mtlgrad.step._layer_grams`) and passes the outputs through an identity
   autograd function, which is where the backward will hand over the outputs' gradients. What a
   call keeps lives on that function's node: it goes when the graph goes.
2. ``differentiate`` walks the graph once: which hooked calls the losses reach, and whether each
   shared parameter is used only inside its module's calls. A parameter used elsewhere too (tied
   to another module, used functionally), or owned by no hooked module, is a *free* parameter.
3. Each task's own part of the graph (its head: what no other loss reaches) is differentiated
   alone, to where it ends (:mod:`mtlgrad.step._task_parts`), so that the heads are not run
   for T batched rows of which T - 1 are zeros.
4. One vmapped backward over the T tasks (``torch.vmap`` of ``autograd.grad``) from there towards
   a scalar anchor that every identity node feeds: it computes the gradients with respect to
   activations only, never the parameters' (autograd skips what the anchor does not need). Each
   identity node receives its outputs' T gradients, and as soon as a module's calls have all
   arrived its contribution is added to G and its gradients are dropped. The free parameters' T
   gradients come out of the same backward, and their Gram comes from the native ``gram`` op.
   Where vmap cannot run, the backward runs once per task, and each materialising layer's
   gradient for the task is taken as its output gradients arrive.

   Where no layer takes the ghost way and the T gradients of the shared parameters are fewer
   numbers than twice the largest call's T-batched output gradients (many rows, few parameters:
   a convolutional trunk), the engine takes them by one backward per task instead, as the loop
   engine does, and writes ``Jᵀ w`` from them.
5. The aggregator's weights from G; then one ordinary backward of ``Σ_t w_t L_t`` writes
   ``d = Jᵀ w`` into the shared ``.grad``, and the heads get their own task's gradient.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from mtlgrad import ops
from mtlgrad.aggregators import Aggregation, Aggregator, GramAggregator
from mtlgrad.step import _task_parts as task_parts
from mtlgrad.step._differentiate import TaskGradients, differentiate
from mtlgrad.step._distributed import LayerAverages, Ranks
from mtlgrad.step._layer_grams import (
    Block,
    LayerCall,
    LayerHandler,
    contribution,
    generic_gradients,
    handler_for,
    planned_way,
)

__all__ = ["GramEngine"]

# The key of the free parameters' entry in the layout of the averages under torch.distributed.
FREE = "free parameters"

# Past this many nodes, the walk of one call's part of the graph gives up: its parameters are
# then treated as free (exact, through autograd).
_CALL_WALK_LIMIT = 10_000


@dataclass(eq=False)
class _Layer:
    """A hooked module."""

    module: nn.Module
    handler: LayerHandler
    name: str


@dataclass(eq=False)
class _Call:
    """One forward call of a hooked module, kept on its identity node."""

    layer: _Layer
    data: LayerCall
    # For each of the module's parameter names, the graph nodes inside this call that use it
    # (None: the call's part of the graph was too large to walk).
    consumers: dict[str, set] | None


class GramEngine:
    """The ``gram`` engine of :func:`mtlgrad.backward` and :class:`~mtlgrad.optim.MTLOptimizer`:
    the exact Gram matrix G of the task gradients, computed layer by layer from activations and
    their per-task gradients, without ever holding the T task gradients of all parameters; then
    one backward of ``Σ_t w_t L_t`` writes the exact update ``Jᵀ w`` into ``.grad``.

    Build it once, before the forward passes it is to differentiate (it hooks the modules)::

        engine = GramEngine(model)
        for x, y in loader:
            optimizer.zero_grad()
            losses = task_losses(model(x), y)
            mtlgrad.backward(losses, shared_params=model.trunk.parameters(),
                             aggregator=UPGrad(), engine=engine)
            optimizer.step()

    (``MTLOptimizer(opt, UPGrad(), model=model, engine="gram")`` builds it for you.)

    Every module under ``modules`` that owns parameters is hooked; each step uses the hooked
    modules that own shared parameters (the heads are hooked too but contribute nothing). Linear,
    Conv1d/Conv2d (``groups=1``), Embedding and the affine parameters of LayerNorm, GroupNorm and
    BatchNorm are handled directly, each layer by the cheaper of the ghost and the materialising
    ways (:mod:`mtlgrad.step._layer_grams` documents the cost model); any other module, and any
    shared parameter used outside its module or owned by none, takes its T gradients from
    autograd. A module called several times in one forward is exact (its calls' gradients are
    summed before the products).

    Only Gram-based aggregators can use it: G is all it computes. Losses may have any shape:
    a tensor of m entries (per-sample losses, or samples x tasks) gives an m x m Gram matrix.

    Args:
        modules: the modules to hook (typically the whole model, or its trunk).
    """

    def __init__(self, *modules: nn.Module) -> None:
        if not modules:
            raise ValueError("GramEngine needs at least one module to hook")
        for k, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"GramEngine: modules[{k}] is a {type(m).__name__}, not a module")
        self._layers: list[_Layer] = []
        self._owners: dict[int, list[tuple[_Layer, str]]] = {}
        self._handles: list[Any] = []
        self._anchors: dict[torch.device, Tensor] = {}
        self._phase: _Phase | None = None
        seen: set[int] = set()
        for root in modules:
            for name, module in root.named_modules():
                own = list(module.named_parameters(recurse=False))
                if id(module) in seen or not own:
                    continue
                seen.add(id(module))
                layer = _Layer(module, handler_for(module), name or type(module).__name__)
                self._layers.append(layer)
                for pname, p in own:
                    self._owners.setdefault(id(p), []).append((layer, pname))
                hook = _ForwardHook(weakref.ref(self), layer)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Removes the hooks (the engine can no longer be used)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for layer in self._layers:
            kinds[layer.handler.name] = kinds.get(layer.handler.name, 0) + 1
        described = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"GramEngine({len(self._layers)} hooked modules: {described})"

    def anchor(self, device: torch.device) -> Tensor:
        if device not in self._anchors:
            anchor = torch.zeros((), device=device, requires_grad=True)
            anchor._mtlgrad_gram_anchor = True  # type: ignore[attr-defined]  # the walks skip it
            self._anchors[device] = anchor
        return self._anchors[device]

    # ---- the step -------------------------------------------------------------------------------

    def differentiate(
        self,
        names: Sequence[str],
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        heads: Sequence[Sequence[Tensor]],
        *,
        retain_graph: bool,
        ranks: Ranks | None = None,
    ) -> TaskGram | TaskGradients:
        """G of the losses' gradients with respect to ``shared`` (the first stage of the step);
        under torch.distributed (``ranks``), G of the gradients averaged over the ranks. Where
        the plan says the T gradients hold less than the T-batched activation gradients
        (:meth:`_Plan.holds_less_per_task`), the T gradients themselves, one backward per task."""
        if not self._handles:
            raise RuntimeError("this GramEngine's hooks were removed; build a new one")
        T = len(losses)
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        scan = _scan(stacked, self)
        plan = _Plan.make(self, shared, scan)
        if not scan.calls and any(id(p) in self._owners for p in shared):
            warnings.warn(
                "GramEngine: the losses reach none of its hooked modules' calls, so every "
                "shared parameter takes its T gradients from autograd (exact, but the slow "
                "way). Build the engine before the forward passes it is to differentiate",
                stacklevel=3,
            )
        if ranks is not None:
            ranks.check_same("the Gram engine's plan", plan.describe())
        ways = plan.ways(scan, T)
        if ranks is None and plan.holds_less_per_task(scan, ways):
            # Many rows, few parameters: the T gradients are fewer numbers than the T-batched
            # activation gradients, and one backward per task gives them (the loop engine's
            # step: the update is then Jᵀw, without a backward of Σ_t w_t L_t).
            return differentiate(
                names, losses, shared, heads, engine="loop", retain_graph=retain_graph
            )
        parts = task_parts.find(stacked, scan.indegree, _blocked(self, plan))
        phase = _run(self, stacked, plan, T, ranks, parts, ways)
        return TaskGram(
            names=list(names),
            losses=list(losses),
            shared=list(shared),
            heads=[list(h) for h in heads],
            reached=plan.reached,
            gram=phase.gram,
            first_bad=phase.first_bad,
            retain_graph=retain_graph,
            # One task's own loss: a slice of the stack would backpropagate zeros through the
            # other losses (0 * Inf is NaN again). Under torch.distributed, on this rank only (the
            # NaN checks see the same averaged G everywhere; each rank tells its own NaN's source).
            blame=lambda t: _run(self, losses[t].reshape(1), plan, 1),
        )


class _ForwardHook:
    """Keeps a call's inputs and routes its outputs through the engine's identity node."""

    def __init__(self, engine: weakref.ref, layer: _Layer) -> None:
        self.engine = engine
        self.layer = layer

    @torch._dynamo.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        engine = self.engine()
        if engine is None or engine._phase is not None or not torch.is_grad_enabled():
            return None
        flat, spec = tree_flatten(output)
        positions = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        if not positions:
            return None
        originals = tuple(flat[i] for i in positions)
        handler = self.layer.handler
        saved = handler.save(module, args, kwargs) if handler.save is not None else {}
        data = LayerCall(
            saved,
            originals if handler.contribution is None else (),
            output_shapes=tuple(o.shape for o in originals),
        )
        call = _Call(self.layer, data, _consumers_in_call(module, originals, args, kwargs))
        wrapped = _Identity.apply(engine, call, engine.anchor(originals[0].device), *originals)
        for i, w in zip(positions, wrapped):
            flat[i] = w
        return tree_unflatten(flat, spec)


def _consumers_in_call(
    module: nn.Module, originals: tuple[Tensor, ...], args: tuple, kwargs: dict
) -> dict[str, set] | None:
    """The nodes of this call's part of the graph (from its outputs down to its inputs) that use
    each of the module's own parameters."""
    own = {id(p): name for name, p in module.named_parameters(recurse=False)}
    consumers: dict[str, set] = {name: set() for name in own.values()}
    inputs, _ = tree_flatten((args, kwargs))
    stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    stack = [o.grad_fn for o in originals if o.grad_fn is not None]
    visited: set = set()
    while stack:
        node = stack.pop()
        if node in visited or node in stops:
            continue
        visited.add(node)
        if len(visited) > _CALL_WALK_LIMIT:
            return None
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in own:
                    consumers[own[id(variable)]].add(node)
                continue
            stack.append(child)
    return consumers


# ---- the identity node and the sink ------------------------------------------------------------


class _Sink(torch.autograd.Function):
    """Hands an identity node's output gradients to the running phase: under the vmapped
    backward through its ``vmap`` rule, which sees the T-batched tensors themselves."""

    @staticmethod
    def forward(phase: _Phase, call: _Call, *grads: Tensor) -> Tensor:
        phase.receive(call, [g.unsqueeze(0) for g in grads])
        return grads[0].new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, phase: _Phase, call: _Call, *grads: Tensor) -> tuple:
        physical = [
            g.movedim(d, 0) if d is not None else g.expand(info.batch_size, *g.shape)
            for g, d in zip(grads, in_dims[2:])
        ]
        phase.receive(call, physical)
        return grads[0].new_zeros(()), None


class _Identity(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(engine: GramEngine, call: _Call, anchor: Tensor, *outputs: Tensor) -> tuple:
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.engine = inputs[0]
        ctx.call = inputs[1]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        phase = ctx.engine._phase
        if phase is not None and not phase.muted:
            _Sink.apply(phase, ctx.call, *grads)
        # The anchor's gradient: zero, but one that depends on the batch, so that the vmapped
        # backward has to run every identity node on its way to the anchor.
        # (One element, read in place: a reshape of a non-contiguous gradient would copy it.)
        first = grads[0]
        anchor_grad = first[(0,) * first.dim()] * 0
        return (None, None, anchor_grad, *grads)


def _blocked(engine: GramEngine, plan: _Plan) -> Any:
    """Whether a node may not be in a task's own part: a hooked shared layer's hand-over node,
    or a node that uses a shared parameter."""
    identity = _Identity._backward_cls  # type: ignore[attr-defined]
    shared = {id(p) for p in plan.shared}

    def blocked(node: Any) -> bool:
        if type(node) is identity and node.engine is engine:
            return id(node.call.layer) in plan.layer_params
        return any(
            id(getattr(child, "variable", None)) in shared for child, _ in node.next_functions
        )

    return blocked


# ---- one walk of the graph ---------------------------------------------------------------------


@dataclass
class _Scan:
    calls: dict[int, list[_Call]] = field(default_factory=dict)  # id(layer) -> calls reached
    consumers: dict[int, set] = field(default_factory=dict)  # id(param) -> nodes using it
    indegree: dict = field(default_factory=dict)  # node -> edges into it from reached nodes


def _scan(stacked: Tensor, engine: GramEngine) -> _Scan:
    """The hooked calls the losses reach, every node that uses a hooked parameter, and how many
    edges lead into each node (for the tasks' own parts, :mod:`mtlgrad.step._task_parts`)."""
    scan = _Scan()
    indegree = scan.indegree
    covered = engine._owners
    identity = _Identity._backward_cls  # type: ignore[attr-defined]
    stack = [stacked.grad_fn]
    visited: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if type(node) is identity and node.engine is engine:
            scan.calls.setdefault(id(node.call.layer), []).append(node.call)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in covered:
                    scan.consumers.setdefault(id(variable), set()).add(node)
                continue
            indegree[child] = indegree.get(child, 0) + 1
            stack.append(child)
    return scan


@dataclass
class _Plan:
    """Which shared parameter is computed where."""

    layer_params: dict[int, dict[str, int]]  # id(layer) -> {parameter name: position in shared}
    layers: dict[int, _Layer]
    expected: dict[int, int]  # id(layer) -> calls the losses reach
    free: list[int]  # positions of the parameters whose T gradients autograd gives
    reached: list[int]  # positions of the shared parameters some loss reaches
    shared: list[Tensor]

    @staticmethod
    def make(engine: GramEngine, shared: Sequence[Tensor], scan: _Scan) -> _Plan:
        layer_params: dict[int, dict[str, int]] = {}
        layers: dict[int, _Layer] = {}
        free: list[int] = []
        reached: list[int] = []
        for k, p in enumerate(shared):
            owners = engine._owners.get(id(p), [])
            used_by = scan.consumers.get(id(p))
            if not owners:
                free.append(k)  # no hooked module: autograd tells whether a loss reaches it
                reached.append(k)
                continue
            if not used_by:
                continue  # no loss reaches it
            reached.append(k)
            if len(owners) == 1:
                layer, name = owners[0]
                calls = scan.calls.get(id(layer), [])
                inside: set = set()
                known = bool(calls)
                for call in calls:
                    if call.consumers is None:
                        known = False
                        break
                    inside |= call.consumers.get(name, set())
                if known and used_by <= inside:
                    layer_params.setdefault(id(layer), {})[name] = k
                    layers[id(layer)] = layer
                    continue
            free.append(k)
        expected = {key: len(scan.calls.get(key, [])) for key in layer_params}
        return _Plan(layer_params, layers, expected, free, reached, list(shared))

    def ways(self, scan: _Scan, T: int) -> dict[int, str]:
        """Each layer's way (ghost or materialise) in a step with T tasks."""
        return {
            key: planned_way(
                layer.module,
                layer.handler.name,
                [c.data for c in scan.calls.get(key, [])],
                self.layer_params[key],
                T,
            )
            for key, layer in self.layers.items()
        }

    def holds_less_per_task(self, scan: _Scan, ways: dict[int, str]) -> bool:
        """Whether the step should take the T gradients by one backward per task (the loop
        engine's way): where no layer takes the ghost way (which needs the T output gradients
        of a layer at once) and the T gradients of the reached shared parameters are fewer
        numbers than what the vmapped backward holds at least: T times the largest hooked call's
        output gradients and its input's (taken as as many). Many rows and few parameters (a
        convolutional trunk) take them per task; then the step also does without vmap's batching
        of each node and without the write's backward. Where the two are close (the engines
        table's transformer), the vmapped backward, which never holds the T gradients of all
        parameters, is kept."""
        if any(way == "ghost" for way in ways.values()):
            return False
        gradients = sum(self.shared[k].numel() for k in self.reached)
        largest_call = max(
            (
                sum(shape.numel() for shape in call.data.output_shapes)
                for key in self.layer_params
                for call in scan.calls.get(key, [])
            ),
            default=0,
        )
        return gradients < 2 * largest_call

    def layout(self) -> list[tuple[Any, list[tuple[int, torch.Size, torch.dtype, torch.device]]]]:
        """What each layer's T gradients look like under torch.distributed, in the order they
        are averaged: the layers from the last shared parameter to the first (the order of the
        backward), then the free parameters. The dtype is that of the products: the direct
        handlers work in float32 or float64, the generic path and autograd in the parameter's."""

        def entry(k: int, direct: bool) -> tuple[int, torch.Size, torch.dtype, torch.device]:
            p = self.shared[k]
            dtype = p.dtype if not direct or p.dtype == torch.float64 else torch.float32
            return k, p.shape, dtype, p.device

        keys = sorted(self.layer_params, key=lambda key: -max(self.layer_params[key].values()))
        layout: list[tuple[Any, list]] = []
        for key in keys:
            direct = self.layers[key].handler.contribution is not None
            layout.append((key, [entry(k, direct) for k in self.layer_params[key].values()]))
        layout.append((FREE, [entry(k, False) for k in self.free]))
        return layout

    def describe(self) -> dict[str, str]:
        """The plan as the ranks compare it (the same layers and free parameters everywhere)."""
        layers = [
            f"{self.layers[key].name}:{sorted(self.layer_params[key].values())}"
            for key, _ in self.layout()[:-1]
        ]
        return {
            "hooked layers": ";".join(layers),
            "free parameters": repr(self.free),
            "reached parameters": repr(self.reached),
        }


# ---- the phase: the backward that computes G ---------------------------------------------------


class _Phase:
    """The state of one Gram computation: G and, per task, the first parameter whose gradient
    holds NaN or Inf."""

    def __init__(
        self,
        plan: _Plan,
        T: int,
        device: torch.device,
        loop: bool,
        averaging: LayerAverages | None = None,
        ways: dict[int, str] | None = None,
    ) -> None:
        self.plan = plan
        self.averaging = averaging
        self.ways = ways or {}
        self.T = T
        self.loop = loop
        self.task = 0
        self.muted = False
        self.gram = torch.zeros(T, T, dtype=torch.float64, device=device)
        self.none_bad = len(plan.shared)
        self.first_bad = torch.full((T,), self.none_bad, dtype=torch.int64, device=device)
        self.received: dict[int, list[_Call]] = {}
        self.generic: dict[int, list[list[Tensor]]] = {}
        self.loop_grads: dict[int, dict[int, list[Tensor]]] = {}  # id(call) -> task -> grads
        # One task at a time, the materialising layers: id(layer) -> position -> T x gradient.
        self.task_grads: dict[int, dict[int, Tensor]] = {}
        self.memos: list[dict] = []  # the calls' saved dicts given a memo, dropped at the end

    def receive(self, call: _Call, grads: list[Tensor]) -> None:
        key = id(call.layer)
        params = self.plan.layer_params.get(key)
        if not params:
            return
        if self.loop:
            if self.ways.get(key) != "ghost" and self.averaging is None:
                self._add_task_gradients(call, params, grads)
                return
            # The ghost way needs every task's output gradients: keep them until all have run.
            per_task = self.loop_grads.setdefault(id(call), {})
            if not per_task:
                self.received.setdefault(key, []).append(call)
            per_task[self.task] = grads
            return
        call.data.grads = grads
        self.received.setdefault(key, []).append(call)
        if call.layer.handler.contribution is None:
            self._add_generic(call, params)
        if len(self.received[key]) == self.plan.expected[key]:
            self.finish(key)

    def _add_task_gradients(self, call: _Call, params: dict[str, int], grads: list[Tensor]) -> None:
        """One task at a time: this call's part of the task's gradient of each of the layer's
        parameters, added to the layer's T x gradient buffers (the output gradients go)."""
        layer = call.layer
        data = LayerCall(call.data.saved, call.data.originals, grads, call.data.output_shapes)
        if layer.handler.contribution is None:
            self.muted = True  # the module's own part of the graph may hold other hooked calls
            try:
                (own,) = generic_gradients(layer.module, data, params, 1)
            finally:
                self.muted = False
            pairs = list(zip(params.values(), own))
        else:
            if "memo" not in data.saved:  # what its handler computes for every task, once
                data.saved["memo"] = {}
                self.memos.append(data.saved)
            blocks = contribution(layer.module, layer.handler, [data], params, 1, gradients=True)
            pairs = [(b.position, b.grads[0]) for b in blocks]
        buffers = self.task_grads.setdefault(id(layer), {})
        for position, g in pairs:
            if position not in buffers:
                buffers[position] = g.new_zeros(self.T, *g.shape)
            buffers[position][self.task] += g

    def _add_generic(self, call: _Call, params: dict[str, int]) -> None:
        self.muted = True  # the module's own part of the graph may hold other hooked calls
        try:
            per_task = generic_gradients(call.layer.module, call.data, params, self.T)
        finally:
            self.muted = False
        call.data.grads = []
        key = id(call.layer)
        if key in self.generic:
            for kept, new in zip(self.generic[key], per_task):
                for a, b in zip(kept, new):
                    a.add_(b)
        else:
            self.generic[key] = per_task

    def finish(self, key: int) -> None:
        """Adds a module's contribution, once all its calls have arrived (under
        torch.distributed, hands its T gradients to the averaging first)."""
        with torch.profiler.record_function("mtlgrad::gram_engine::layer"):
            self._finish(key)

    def _finish(self, key: int) -> None:
        layer = self.plan.layers[key]
        params = self.plan.layer_params[key]
        calls = self.received.pop(key, [])
        if layer.handler.contribution is None:
            per_task = self.generic.pop(key, None)
            if per_task is None:
                return
            if self.averaging is None:  # the native gram reads the T gradients where they are
                G, bad = torch.ops.mtlgrad.gram([g for task in per_task for g in task], self.T)
                self._add(G, bad, list(params.values()))
                return
            blocks = [
                Block(position, grads=torch.stack([task[i] for task in per_task]))
                for i, position in enumerate(params.values())
            ]
        elif not calls:
            return
        else:
            blocks = contribution(
                layer.module,
                layer.handler,
                [c.data for c in calls],
                params,
                self.T,
                gradients=self.averaging is not None,
            )
            for c in calls:
                c.data.grads = []
        if self.averaging is not None:
            self.averaging.put(key, [(b.position, b.grads) for b in blocks])
            return
        for block in blocks:
            if block.grads is not None:
                G, bad = torch.ops.mtlgrad.gram([block.grads[t] for t in range(self.T)], self.T)
                self._add(G, bad, [block.position])
                continue
            self.gram += block.gram
            bad = ~torch.isfinite(block.gram.diagonal())
            position = block.position
            self.first_bad = torch.where(bad, self.first_bad.clamp(max=position), self.first_bad)

    def _add(self, G: Tensor, bad: Tensor, positions: list[int]) -> None:
        """A native ``gram`` result: G and, per task, the index of its first non-finite tensor."""
        self.gram += G.to(self.gram.device)
        table = torch.tensor(positions + [self.none_bad], device=self.first_bad.device)
        index = torch.where(bad >= 0, bad, torch.full_like(bad, len(positions)))
        self.first_bad = torch.minimum(self.first_bad, table[index.to(self.first_bad.device)])

    def finish_loop(self) -> None:
        """After the per-task backward passes: the Gram of each materialising layer's T
        gradients; each ghost layer's calls' T output gradients stacked, then added."""
        with torch.profiler.record_function("mtlgrad::gram_engine::layer"):
            for buffers in self.task_grads.values():
                positions = list(buffers)
                flat = [buffers[p][t] for t in range(self.T) for p in positions]
                G, bad = torch.ops.mtlgrad.gram(flat, self.T)
                self._add(G, bad, positions)
        self.task_grads.clear()
        for saved in self.memos:
            saved.pop("memo", None)
        self.memos.clear()
        self.loop = False
        pending = self.received
        self.received = {}
        for key, calls in pending.items():
            for call in calls:
                per_task = self.loop_grads.pop(id(call))
                some = next(iter(per_task.values()))
                grads = [
                    torch.cat(
                        [
                            per_task[t][i] if t in per_task else torch.zeros_like(some[i])
                            for t in range(self.T)
                        ]
                    )
                    for i in range(len(some))
                ]
                self.receive(call, grads)
            if key in self.received or key in self.generic:
                self.finish(key)


def _run(
    engine: GramEngine,
    stacked: Tensor,
    plan: _Plan,
    T: int,
    ranks: Ranks | None = None,
    parts: task_parts.TaskParts | None = None,
    ways: dict[int, str] | None = None,
) -> _Phase:
    """The Gram computation: one vmapped backward (or one per task where vmap cannot run), from
    the losses or, where the tasks have parts of the graph of their own (``parts``), from where
    those end, each task's part differentiated alone first; under torch.distributed
    (``ranks``), each layer's T gradients averaged over the ranks first."""
    device = stacked.device
    anchor = engine.anchor(device)
    free = [plan.shared[k] for k in plan.free]
    targets = [anchor, *free]
    if parts is None:
        outputs: list[Any] = [stacked]
        seeds = [torch.eye(T, dtype=stacked.dtype, device=device)]
    else:
        with torch.profiler.record_function("mtlgrad::gram_engine::heads"):
            outputs, seeds = list(parts.edges), parts.seeds(stacked.dtype, device)

    def one(*rows: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            outputs,
            targets,
            grad_outputs=list(rows),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )

    def start(loop: bool) -> _Phase:
        phase = _Phase(plan, T, device, loop=loop, ways=ways)
        if ranks is not None:
            phase.averaging = LayerAverages(ranks, plan.layout(), T, phase._add)
        engine._phase = phase
        return phase

    phase = start(loop=False)
    try:
        with torch.profiler.record_function("mtlgrad::gram_engine::backward"):
            try:
                free_grads = list(torch.vmap(one)(*seeds)[1:])
            except RuntimeError as error:
                if "vmap" not in str(error).lower() and "batch" not in str(error).lower():
                    raise
                phase = start(loop=True)
                per_task = []
                for t in range(T):
                    phase.task = t
                    per_task.append(one(*[s[t] for s in seeds])[1:])
                phase.finish_loop()
                free_grads = [torch.stack([g[i] for g in per_task]) for i in range(len(free))]
        for key in list(phase.received):
            phase.finish(key)  # calls that never completed (their count was off): add them now
        for key in list(phase.generic):
            phase.finish(key)
        if phase.averaging is not None:
            phase.averaging.put(FREE, list(zip(plan.free, free_grads)))
            phase.averaging.close()
        elif free:
            flat = [g[t] for t in range(T) for g in free_grads]
            G, bad = torch.ops.mtlgrad.gram(flat, T)
            phase._add(G, bad, plan.free)
    finally:
        engine._phase = None
    return phase


# ---- what the gram engine hands to the next stages ------------------------------------------


@dataclass
class TaskGram:
    """The Gram engine's result of the differentiate stage: G, not the gradients."""

    names: list[str]
    losses: list[Tensor]
    shared: list[Tensor]
    heads: list[list[Tensor]]
    reached: list[int]
    gram: Tensor
    first_bad: Tensor
    retain_graph: bool
    blame: Any
    average_heads: Any = None

    def map_heads(self, fn: Any) -> None:
        """Under torch.distributed: ``fn`` averages the heads' gradients over the ranks (they are
        computed at the write stage)."""
        self.average_heads = fn

    def aggregate(
        self,
        aggregator: Aggregator,
        level: Sequence[Tensor],
        shared: Sequence[Tensor] | None,
        losses: Tensor,
        scale: float | None,
        check_finite: bool = True,
    ) -> Aggregation:
        """Weights from G (brought to the host with the flags and the losses in one transfer)."""
        assert isinstance(aggregator, GramAggregator)
        G, first_bad, losses_host = _to_host(self.gram, self.first_bad, losses)
        flags = torch.where(first_bad < len(self.shared), first_bad, torch.full_like(first_bad, -1))
        if scale is not None:
            if bool((flags >= 0).any()) or not bool(torch.isfinite(G).all()):
                return Aggregation([], None, None, skipped=True, losses=losses_host)
            G = G / (scale * scale)
        elif check_finite:
            if bool((flags >= 0).sum() > 1):
                flags = self._blame(flags)
            names = [
                f"shared_params[{k}] (shape {list(p.shape)})" for k, p in enumerate(self.shared)
            ]
            ops.check_gram(G, flags, names, self.names)
        w = aggregator._weights_by_name(G, losses_host, self.names)
        return Aggregation([], w, G, losses=losses_host)

    def _blame(self, flags: Tensor) -> Tensor:
        """A NaN met in one task's part of the graph reaches every task in the vmapped backward:
        recompute the flagged tasks one at a time."""
        blamed = flags.clone()
        for t in range(len(flags)):
            if flags[t] >= 0:
                phase = self.blame(t)
                own = int(phase.first_bad[0])
                blamed[t] = own if own < len(self.shared) else -1
        return blamed if bool((blamed >= 0).any()) else flags

    def write(
        self,
        aggregation: Aggregation,
        shared: Sequence[Tensor],
        features: Sequence[Tensor] | None,
        scale_task_params: bool,
        retain_graph: bool,
        trunk_mean: Any = None,
    ) -> None:
        """The heads, then one backward of ``Σ_t w_t L_t`` into the reached shared ``.grad``.
        Under torch.distributed, the heads' gradients and the update are averaged over the ranks
        (``average_heads``, ``trunk_mean``) before they are added to ``.grad``."""
        from mtlgrad.step._write import accumulate_grad

        stacked = torch.stack([loss.reshape(()) for loss in self.losses])
        weights = aggregation.weights
        heads = _unique([h for hs in self.heads for h in hs])
        reached = [self.shared[k] for k in self.reached]
        if heads:
            coefficients = torch.ones_like(stacked)
            if scale_task_params and weights is not None:
                coefficients = weights.to(device=stacked.device, dtype=stacked.dtype)
            keep = retain_graph or (bool(reached) and not aggregation.skipped)
            grads = torch.autograd.grad(
                (coefficients * stacked).sum(), heads, retain_graph=keep, allow_unused=True
            )
            pairs = [(h, g) for h, g in zip(heads, grads) if g is not None]
            if self.average_heads is not None:
                pairs = self.average_heads([pairs])[0]
            for h, g in pairs:
                accumulate_grad(h, g)
        if not reached:
            return
        if aggregation.skipped or weights is None:
            for p in reached:
                accumulate_grad(p, torch.full_like(p, float("nan")))
            return
        w = weights.to(device=stacked.device, dtype=stacked.dtype, non_blocking=True)
        with torch.profiler.record_function("mtlgrad::gram_engine::write"):
            if trunk_mean is None:
                torch.autograd.backward(
                    (w * stacked).sum(), inputs=reached, retain_graph=retain_graph
                )
                return
            update = torch.autograd.grad(
                (w * stacked).sum(), reached, retain_graph=retain_graph, allow_unused=True
            )
        full: list[Tensor | None] = [None] * len(self.shared)
        for k, d in zip(self.reached, update):
            full[k] = d
        for p, d in zip(self.shared, trunk_mean(full)):
            if d is not None:
                accumulate_grad(p, d)


def _unique(tensors: list[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    result = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            result.append(t)
    return result


def _to_host(gram: Tensor, first_bad: Tensor, losses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """G, the flags and the losses on the host, in one device-to-host transfer."""
    T = gram.shape[0]
    if gram.device.type == "cpu":
        return gram, first_bad, losses.detach().to(device="cpu", dtype=torch.float64)
    host = torch.cat(
        [
            gram.reshape(-1),
            first_bad.to(torch.float64),
            losses.detach().to(device=gram.device, dtype=torch.float64).reshape(-1),
        ]
    ).cpu()
    return host[: T * T].view(T, T), host[T * T : T * T + T].to(torch.int64), host[T * T + T :]
