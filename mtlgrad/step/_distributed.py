"""The step under ``torch.distributed``: the replicas stay one model.

When torch.distributed is initialised with more than one rank, each rank differentiates its own
batch, then, before the aggregation, every task's gradients are averaged across the ranks
(*replicated mode*). Every rank then holds the per-task gradients of the global batch (the mean of
the ranks' mean losses), computes the same G, weights and update, and steps the same way: one
process on the concatenated batch, up to the order of floating-point additions. DDP's own
gradient all-reduce is never triggered (the engines take gradients with ``autograd.grad``), so a
DDP-wrapped model and a plain one behave alike. The heads' gradients and the losses are averaged
the same way.

What is sent per step: T x P of the shared level, in buckets of the same dtype, all-reduced
asynchronously, the heads' gradients once, the losses, and small headers. What overlaps: each
task's buckets are launched as soon as its backward returns (the loop engine; the batched engine:
as each chunk of tasks returns), so they travel while the next tasks' backward passes run, and
the step waits for them after the last one (:mod:`mtlgrad.step._overlap`); with T tasks, all
but the last task's transfers can hide behind backward work. The heads' gradients, the losses
and the T x K mask of which task reached which input go after the last backward (they are small).
Gradient accumulation sends the sums once, at the aggregation, after every backward: no overlap
there. Before any bulk transfer, every rank compares a header (task count, task names, the
level's layout, the aggregator's generator): a difference raises the same
:class:`DistributedMismatchError` on every rank, never a hang.

With ``features=`` (Gram-based methods), nothing of size P crosses the ranks before the
aggregation: each rank's features hold its own samples, so the global batch's task gradients at
the features are the ranks' side by side (each divided by the number of ranks, the global loss
being the mean of the ranks' mean losses), and their Gram matrix is the sum of the ranks' Gram
matrices over the squared rank count: one T x T all-reduce. Every rank then computes the same
weights, combines its own features' gradients, backpropagates them through its trunk, and the
trunk's gradients are averaged over the ranks (one all-reduce of P, as DDP does).

The Gram engine (:class:`LayerAverages`) never holds the T gradients of all parameters, so it
averages each layer's T gradients over the ranks as its backward produces them (the products
between ranks are in G only if the gradients are averaged before their Gram), takes their Gram,
and drops them; after the weights, the one backward of ``Σ_t w_t L_t`` gives each rank its share
of the update, averaged (P). Sent: T x P in per-layer pieces, plus P: what replicated mode sends,
with one or two layers' T gradients held instead of all of them.

Not exact, hence refused with an error on every rank: ``features=`` with an elementwise method
(it needs every rank's feature gradients), per-sample losses (the ranks' samples are different
losses), and the Gram engine in sharded mode.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from mtlgrad import ops

if TYPE_CHECKING:
    from mtlgrad.step._overlap import OverlappedLevelMean

__all__ = ["MODES", "DistributedMismatchError", "LayerAverages", "Ranks", "ranks_of"]

#: How the ranks share the aggregation (``distributed=`` of :func:`~mtlgrad.backward`).
MODES = ("replicated", "sharded")

# Elements per all-reduce: large enough to keep the link busy, small enough that the buckets
# overlap one another.
BUCKET_BYTES = 25 << 20


@dataclass
class PendingMean:
    """All-reduces in flight (:meth:`Ranks.launch`): the shapes of the tensors launched, and per
    bucket, the tensors' indices, the flat buffer and its work handle."""

    shapes: list[torch.Size]
    buckets: list[tuple[list[int], Tensor, Any]] = field(default_factory=list)

    def views(self) -> list[Tensor]:
        """Each tensor's place in its bucket, in the order of the tensors launched (the averages
        once :meth:`Ranks.finish` has returned; until then, data in flight: not to be read)."""
        result: list[Tensor | None] = [None] * len(self.shapes)
        for bucket, flat, _ in self.buckets:
            offset = 0
            for i in bucket:
                n = self.shapes[i].numel()
                result[i] = flat[offset : offset + n].view(self.shapes[i])
                offset += n
        return result  # type: ignore[return-value]


class DistributedMismatchError(ValueError):
    """The ranks disagree on what the step computes (tasks, gradient layout, random state)."""


def ranks_of(process_group: Any = None, mode: str = "replicated") -> Ranks | None:
    """The step's ranks over ``process_group`` (default: the world group when torch.distributed
    is initialised) in ``mode``, or None with a single rank."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) < 2:
        return None
    return Ranks(process_group, sharded=mode == "sharded")


def _fingerprint(text: str) -> int:
    return zlib.crc32(text.encode())


class Ranks:
    """The communication of one step: averages of the per-task gradients (replicated mode) or
    their reduce-scatter (sharded mode), of the heads' gradients and of the losses; the T x T
    all-reduce of the features' Gram matrix."""

    def __init__(self, group: Any, sharded: bool = False) -> None:
        self.group = group
        self.sharded = sharded
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # ---- the header: the same step everywhere, or the same error everywhere ------------------

    def check_same(self, what: str, values: dict[str, int | str]) -> None:
        """Compares ``values`` (small facts about this rank's step) across the ranks; raises the
        same :class:`DistributedMismatchError` on every rank where they differ."""
        keys = list(values)
        numbers = [v if isinstance(v, int) else _fingerprint(v) for v in values.values()]
        mine = torch.tensor(numbers, dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered)
        differ = [i for i in range(len(keys)) if bool((table[:, i] != table[0, i]).any())]
        if not differ:
            return
        parts = []
        for i in differ:
            column = table[:, i].tolist()
            value = values[keys[i]]
            if isinstance(value, int):
                parts.append(
                    f"{keys[i]}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(column))
                )
                continue
            groups: dict[int, list[int]] = {}
            for r, v in enumerate(column):
                groups.setdefault(v, []).append(r)
            ranks = " / ".join("ranks " + ",".join(map(str, g)) for g in groups.values())
            parts.append(f"{keys[i]}: {ranks} differ (rank {self.rank} has {str(value)[:300]})")
        raise DistributedMismatchError(
            f"mtlgrad.backward under torch.distributed: the ranks differ in {what}: "
            + "; ".join(parts)
            + ". Every rank must step on the same tasks, with the same shared parameters and the "
            "same aggregator state (seed randomised methods' generators alike on every rank)"
        )

    def check_step(
        self,
        names: Sequence[str],
        level: Sequence[Tensor],
        aggregator: Any,
        scale: float | None,
        features: bool = False,
    ) -> None:
        # The features hold each rank's own samples: their shapes may differ (a shorter last
        # batch), their count and dtypes may not.
        layout = ";".join(
            (f"{t.dtype}" if features else f"{tuple(t.shape)}:{t.dtype}") for t in level
        )
        generator = getattr(aggregator, "generator", None)
        state = (
            0 if generator is None else _fingerprint(generator.get_state().numpy().tobytes().hex())
        )
        self.check_same(
            "the step",
            {
                "tasks": len(names),
                "task names": repr([str(n) for n in names]),
                "shared tensors": len(level),
                "shared layout": layout,
                "aggregator": type(aggregator).__name__,
                "generator state": state,
                "loss scale": repr(scale),
            },
        )

    # ---- the averages --------------------------------------------------------------------------

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The average of each tensor across the ranks (views into the buckets): all-reduced
        asynchronously in buckets (:meth:`launch`), then scaled by 1 / world size
        (:meth:`finish`)."""
        return self.finish(self.launch(tensors))

    def launch(self, tensors: Sequence[Tensor]) -> PendingMean:
        """Starts the all-reduces of ``tensors``: same-dtype buckets of about ``BUCKET_BYTES``,
        each all-reduced asynchronously; :meth:`finish` waits for them. (New tensors, not in
        place: autograd may hand out expanded or shared gradients.) Every rank must launch the
        same sequence of shapes and dtypes."""
        buckets: list[list[int]] = []
        open_bucket: dict[tuple, list[int]] = {}
        sizes: dict[tuple, int] = {}
        for i, t in enumerate(tensors):
            key = (t.dtype, t.device)
            open_bucket.setdefault(key, []).append(i)
            sizes[key] = sizes.get(key, 0) + t.numel() * t.element_size()
            if sizes[key] >= BUCKET_BYTES:
                buckets.append(open_bucket.pop(key))
                sizes[key] = 0
        buckets += [b for b in open_bucket.values() if b]
        pending = PendingMean([t.shape for t in tensors])
        for bucket in buckets:
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            pending.buckets.append((bucket, flat, work))
        return pending

    def finish(self, pending: PendingMean) -> list[Tensor]:
        """Waits for the all-reduces that :meth:`launch` started; the averages, in the order of
        its tensors (views into the buckets)."""
        for _, flat, work in pending.buckets:
            work.wait()
            flat.div_(self.world)
        return pending.views()

    def check_supported(
        self, engine: Any, features: Sequence[Tensor] | None, aggregator: Any
    ) -> None:
        """What replicated mode cannot make exact: refused on every rank (the same settings
        everywhere make the same error everywhere)."""
        from mtlgrad.aggregators import GramAggregator
        from mtlgrad.step._gram_engine import GramEngine

        if isinstance(engine, GramEngine) and self.sharded:
            raise NotImplementedError(
                "mtlgrad.backward(distributed='sharded'): the gram engine never holds the "
                "per-task gradients that sharded mode would reduce-scatter (it averages each "
                "layer's over the ranks, then takes their Gram); use distributed='replicated' "
                "with it, or engine='loop' / 'batched' with sharded mode"
            )

        if self.sharded and features is None and not isinstance(aggregator, GramAggregator):
            raise NotImplementedError(
                "mtlgrad.backward(distributed='sharded'): sharded mode needs a Gram-based "
                f"method, and {type(aggregator).__name__} is elementwise; use "
                "distributed='replicated'"
            )
        if features is not None and not isinstance(aggregator, GramAggregator):
            raise NotImplementedError(
                "mtlgrad.backward under torch.distributed (more than one rank): features= needs "
                f"a Gram-based method, and {type(aggregator).__name__} is elementwise (it would "
                "need every rank's feature gradients); leave features= out, and each task's "
                "gradients of the shared parameters are averaged over the ranks"
            )

    def average(
        self,
        grads: Any,
        level: Sequence[Tensor],
        losses: Tensor,
        average_level: bool = True,
        started: OverlappedLevelMean | None = None,
    ) -> Tensor:
        """Averages the step in place over the ranks: the shared level's per-task gradients now
        (with ``average_level``: not the features', each rank keeps its own; not in sharded mode,
        where they are reduce-scattered at the aggregation; not the gram engine's, averaged layer
        by layer in its backward), the heads' when the write stage asks for them; returns the
        averaged losses. ``started``: the level's average, started during the backward passes
        (:mod:`mtlgrad.step._overlap`), finished here."""
        if started is not None:
            started.finish(grads)
        elif average_level:
            self.average_level(grads, level)
        grads.map_heads(self.average_heads)
        return self.average_losses(losses)

    def average_level(self, grads: Any, level: Sequence[Tensor]) -> None:
        """The shared level's per-task gradients, averaged in place, all at once (the
        accumulated sums; a step's own are averaged during its backward passes:
        :mod:`mtlgrad.step._overlap`). A task that does not reach an input on this rank but does
        on another contributes zeros there."""
        T, K = len(grads.names), len(level)
        mask = torch.tensor(
            [[g is not None for g in per_task] for per_task in grads.level], dtype=torch.int32
        ).reshape(T, K)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
        where = [(t, k) for t, k in mask.nonzero().tolist()]
        for t, k in where:
            if grads.level[t][k] is None:  # reached on another rank only
                grads.level[t][k] = torch.zeros_like(level[k])
        grads.reached = mask.any(dim=0).nonzero().flatten().tolist()
        averaged = self.mean([grads.level[t][k] for t, k in where])
        for (t, k), g in zip(where, averaged):
            grads.level[t][k] = g

    def average_heads(
        self, heads: list[list[tuple[Tensor, Tensor]]]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        layout = ";".join(
            f"{t}:" + ",".join(str(tuple(p.shape)) for p, _ in pairs)
            for t, pairs in enumerate(heads)
        )
        self.check_same("the task-specific parameters reached", {"heads": layout})
        averaged = iter(self.mean([g for pairs in heads for _, g in pairs]))
        return [[(p, next(averaged)) for p, _ in pairs] for pairs in heads]

    def average_losses(self, losses: Tensor) -> Tensor:
        return self.mean([losses])[0]

    # ---- features=: one T x T all-reduce ------------------------------------------------------

    def aggregate_features(
        self,
        aggregator: Any,
        grads: Any,
        features: Sequence[Tensor],
        losses: Tensor,
        scale: float | None,
        check_finite: bool,
    ) -> Any:
        """The aggregation at the features of the global batch: G summed over the ranks (over
        the squared rank count), the same weights everywhere, this rank's features' update."""
        from mtlgrad.aggregators import Aggregation
        from mtlgrad.aggregators._base import checked_gram_on_host, combine_into, gram_with_flags

        T = len(grads.names)
        flat = grads.task_major(features)
        G, flags = gram_with_flags(flat, T)
        G = G.clone()
        dist.all_reduce(G, group=self.group)
        G.div_(self.world * self.world)
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        names = [f"features[{k}]" for k in grads.reached]
        G_host, losses_host = checked_gram_on_host(
            G,
            flags,
            losses,
            names=names,
            task_names=grads.names,
            scale=scale,
            check_finite=check_finite,
        )
        if G_host is None:  # an overflow on some rank: every rank skips the step
            return Aggregation([], None, None, skipped=True, losses=losses_host)
        w = aggregator._weights_by_name(G_host, losses_host, grads.names)
        device = flat[0].device if flat else w.device
        out = combine_into(flat, T, w.to(device), None, False)
        return Aggregation(out, w, G_host, losses=losses_host)

    def mean_present(
        self, tensors: list[Tensor | None], like: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """The average over the ranks of gradients that some ranks may lack (``None``: zeros
        there); ``None`` where no rank has one."""
        present = torch.tensor([t is not None for t in tensors], dtype=torch.int32)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        keep = present.nonzero().flatten().tolist()
        filled = [tensors[k] if tensors[k] is not None else torch.zeros_like(like[k]) for k in keep]
        result: list[Tensor | None] = [None] * len(tensors)
        for k, g in zip(keep, self.mean(filled)):
            result[k] = g
        return result

    # ---- sharded mode: reduce-scatter, T x T all-reduce, all-gather --------------------------

    def aggregate_sharded(
        self,
        aggregator: Any,
        grads: Any,
        shared: Sequence[Tensor],
        losses: Tensor,
        scale: float | None,
        check_finite: bool,
        owned: Sequence[Tensor] | None = None,
    ) -> Any:
        """Sharded mode: the per-task gradients reduce-scattered (each rank keeps one shard of
        every task's rank-averaged gradient; one buffer per dtype), G from the shards and one
        T x T all-reduce, the same weights everywhere, each rank's shard of the update combined;
        then one all-gather of the update per dtype, added into the shared ``.grad``. With
        ``owned`` (the shared parameters this rank's optimizer updates, e.g. a
        ``ZeroRedundancyOptimizer``'s partition), the shards are the ranks' own parameters and
        each rank writes their update alone: no all-gather (the others' ``.grad`` is left as it
        is)."""
        from mtlgrad.aggregators import Aggregation
        from mtlgrad.aggregators._base import checked_gram_on_host, gram_with_flags

        T = len(grads.names)
        reached = self.reached_union(grads, shared)
        owners = None if owned is None else self.owners(reached, shared, owned)
        # One buffer per dtype, in the order the dtypes first appear (the same on every rank:
        # the shared layout was compared first).
        groups: dict[torch.dtype, list[int]] = {}
        for i, k in enumerate(reached):
            groups.setdefault(shared[k].dtype, []).append(i)
        shards = [
            _Shard.reduce_scattered(self, grads, shared, reached, indices, owners)
            for indices in groups.values()
        ]
        for t in range(T):
            grads.level[t] = [None] * len(grads.level[t])  # in the shards now: free them
        G = torch.zeros(T, T, dtype=torch.float64, device=shards[0].rows.device if shards else None)
        flags = torch.full((T,), -1, dtype=torch.int64, device=G.device)
        for g, shard in enumerate(shards):
            G_g, flags_g = gram_with_flags(list(shard.rows.unbind(0)), T)
            G += G_g.to(G.device)
            flags = torch.where((flags < 0) & (flags_g.to(flags.device) >= 0), g, flags)
        dist.all_reduce(G, group=self.group)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        G_host, losses_host = checked_gram_on_host(
            G,
            flags,
            losses,
            names=[
                f"shard {self.rank} of the {str(dtype).removeprefix('torch.')} shared parameters"
                for dtype in groups
            ],
            task_names=grads.names,
            scale=scale,
            check_finite=check_finite,
        )
        w = None
        if G_host is not None:
            w = aggregator._weights_by_name(G_host, losses_host, grads.names)
        out: list[Tensor | None] = [None] * len(reached)
        for shard in shards:
            shard.write(self, w, shared, reached, out, gather=owned is None)
        return Aggregation(out, w, G_host, skipped=G_host is None, losses=losses_host)

    def owners(
        self, reached: Sequence[int], shared: Sequence[Tensor], owned: Sequence[Tensor]
    ) -> list[int]:
        """The rank that owns each reached shared parameter (one small all-gather); a parameter
        owned by no rank, or by several, is the same error on every rank."""
        ids = {id(p) for p in owned}
        mine = torch.tensor([id(shared[k]) in ids for k in reached], dtype=torch.int32)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered)
        counts = table.sum(dim=0)
        wrong = (counts != 1).nonzero().flatten().tolist()
        if wrong:
            k = reached[wrong[0]]
            raise ValueError(
                f"mtlgrad.backward(distributed='sharded', owned_params=...): shared_params[{k}] "
                f"(shape {list(shared[k].shape)}) is owned by {int(counts[wrong[0]])} ranks; "
                "every shared parameter that the losses reach must be owned by exactly one rank "
                f"({len(wrong)} are not)"
            )
        return table.argmax(dim=0).tolist()

    def reached_union(self, grads: Any, level: Sequence[Tensor]) -> list[int]:
        """The inputs of the shared level that some task reaches on some rank (the step's
        ``reached``, made the same on every rank)."""
        mask = torch.zeros(len(level), dtype=torch.int32)
        mask[grads.reached] = 1  # this rank's (computed once, with the gradients)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
        grads.reached = mask.nonzero().flatten().tolist()
        return grads.reached


# ---- the gram engine: each layer's T gradients averaged, in one order --------------------------

# A layer of the gram engine, as the ranks send it: its key, then for each of its parameters its
# position among the shared parameters, shape, dtype and device.
Layout = list[tuple[Any, list[tuple[int, torch.Size, torch.dtype, torch.device]]]]


class LayerAverages:
    """The Gram engine under torch.distributed: each layer's T per-task gradients averaged over
    the ranks before their Gram is added (``add(G, bad, positions)``, with the native ``gram``'s
    result), so that G is that of the global batch's gradients, as in replicated mode, while no
    more than two layers' T gradients are held.

    The layers are sent in one order, the same on every rank (``layout``: the last layer first,
    as the backward produces them); a layer that is ready early waits for its turn. Each layer's
    all-reduce runs while the backward goes on, and its Gram is taken when the next layer is sent.
    A layer this rank's backward did not reach is sent as zeros at :meth:`close`."""

    def __init__(
        self, ranks: Ranks, layout: Layout, T: int, add: Callable[[Tensor, Tensor, list[int]], None]
    ) -> None:
        self.ranks = ranks
        self.layout = [(key, entries) for key, entries in layout if entries]
        self.T = T
        self.add = add
        self.ready: dict[Any, dict[int, Tensor | None]] = {}
        self.sent = 0
        self.in_flight: deque = deque()

    def put(self, key: Any, grads: Sequence[tuple[int, Tensor | None]]) -> None:
        """A layer's T gradients, ``(position, T x ...)`` for each of its parameters."""
        self.ready[key] = dict(grads)
        while self.sent < len(self.layout) and self.layout[self.sent][0] in self.ready:
            self._send()

    def close(self) -> None:
        """After the backward: the layers not reached here (zeros), then every Gram."""
        for key, _ in self.layout[self.sent :]:
            self.ready.setdefault(key, {})
        while self.sent < len(self.layout):
            self._send()
        while self.in_flight:
            self._complete()

    def _send(self) -> None:
        key, entries = self.layout[self.sent]
        self.sent += 1
        given = self.ready.pop(key)
        parts = []
        for position, shape, dtype, device in entries:
            g = given.get(position)
            n = math.prod(shape)
            if g is None:
                parts.append(torch.zeros(self.T, n, dtype=dtype, device=device))
            else:
                parts.append(g.reshape(self.T, n).to(dtype))
        flat = torch.cat(parts, dim=1)  # a new buffer: the all-reduce writes into it
        work = dist.all_reduce(flat, group=self.ranks.group, async_op=True)
        self.in_flight.append((flat, work, entries))
        while len(self.in_flight) > 1:
            self._complete()

    def _complete(self) -> None:
        flat, work, entries = self.in_flight.popleft()
        work.wait()
        flat.div_(self.ranks.world)
        columns = flat.split([math.prod(shape) for _, shape, _, _ in entries], dim=1)
        G, bad = torch.ops.mtlgrad.gram([c[t] for t in range(self.T) for c in columns], self.T)
        self.add(G, bad, [position for position, *_ in entries])


@dataclass
class _Shard:
    """Sharded mode's buffer for the reached shared parameters of one dtype: where each sits in
    the rank-major buffer of W shards of ``chunk`` entries (in order, split evenly and padded at
    the end; or each rank's own parameters in its shard), and this rank's reduce-scattered shard
    of every task's averaged gradient (``rows``, T x chunk)."""

    indices: list[int]  # positions in ``reached``
    sizes: list[int]
    offsets: list[int]
    chunk: int
    mine: list[int]  # the entries of ``indices`` whose update this rank writes
    rows: Tensor

    @staticmethod
    def reduce_scattered(
        ranks: Ranks,
        grads: Any,
        shared: Sequence[Tensor],
        reached: Sequence[int],
        indices: list[int],
        owners: list[int] | None,
    ) -> _Shard:
        T, world = len(grads.names), ranks.world
        params = [shared[reached[i]] for i in indices]
        sizes = [p.numel() for p in params]
        if owners is None:
            chunk = -(-sum(sizes) // world)
            offsets = [sum(sizes[:j]) for j in range(len(sizes))]
            mine = list(range(len(indices)))
        else:
            group_owners = [owners[i] for i in indices]
            per_rank = [0] * world
            offsets = []
            for owner, n in zip(group_owners, sizes):
                offsets.append(per_rank[owner])
                per_rank[owner] += n
            chunk = max(max(per_rank), 1)
            offsets = [owner * chunk + o for owner, o in zip(group_owners, offsets)]
            mine = [j for j, owner in enumerate(group_owners) if owner == ranks.rank]
        dtype, device = params[0].dtype, params[0].device
        # Rank-major: buffer[r, t] is task t's gradient on shard r, so that the reduce-scatter
        # (which splits its input along the first dimension) leaves rank r shard r of every task.
        buffer = torch.zeros(world, T, chunk, dtype=dtype, device=device)
        for t in range(T):
            flat = buffer.new_zeros(world * chunk)
            for i, n, offset in zip(indices, sizes, offsets):
                g = grads.level[t][reached[i]]
                if g is not None:
                    flat[offset : offset + n] = g.reshape(-1)
            buffer[:, t, :] = flat.view(world, chunk)
        rows = torch.empty(T, chunk, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(rows, buffer.reshape(world * T, chunk), group=ranks.group)
        del buffer
        rows.div_(world)
        return _Shard(indices, sizes, offsets, chunk, mine, rows)

    def write(
        self,
        ranks: Ranks,
        weights: Tensor | None,
        shared: Sequence[Tensor],
        reached: Sequence[int],
        out: list[Tensor | None],
        gather: bool,
    ) -> None:
        """This rank's shard of the update (NaN where the step is skipped: an overflow on some
        rank), all-gathered with ``gather``, added into the ``.grad`` of the parameters this rank
        writes; ``out[i]`` their gradient."""
        T = self.rows.shape[0]
        if weights is None:
            update_shard = torch.full_like(self.rows[0], float("nan"))
        else:
            rows = list(self.rows.unbind(0))
            update_shard = ops.combine(rows, T, weights.to(self.rows.device))[0]
        if gather:
            update = self.rows.new_empty(ranks.world * self.chunk)
            dist.all_gather_into_tensor(update, update_shard, group=ranks.group)
            start = 0
        else:  # this rank's parameters only
            update, start = update_shard, ranks.rank * self.chunk
        for j in self.mine:
            i, n = self.indices[j], self.sizes[j]
            p = shared[reached[i]]
            d = update[self.offsets[j] - start : self.offsets[j] - start + n].view(p.shape)
            if p.grad is not None:
                p.grad.add_(d)
                out[i] = p.grad
            else:
                out[i] = d.clone()
