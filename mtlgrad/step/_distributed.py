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

Not exact, hence refused with an error on every rank: the Gram engine (G of the averaged
gradients needs the cross-rank products), and ``features=`` with an elementwise method (it needs
every rank's feature gradients).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from mtlgrad import ops

if TYPE_CHECKING:
    from mtlgrad.step._overlap import OverlappedLevelMean

__all__ = ["MODES", "DistributedMismatchError", "Ranks", "ranks_of"]

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
        result: list[Tensor | None] = [None] * len(pending.shapes)
        for bucket, flat, work in pending.buckets:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for i in bucket:
                n = pending.shapes[i].numel()
                result[i] = flat[offset : offset + n].view(pending.shapes[i])
                offset += n
        return result  # type: ignore[return-value]

    def check_supported(
        self, engine: Any, features: Sequence[Tensor] | None, aggregator: Any
    ) -> None:
        """What replicated mode cannot make exact: refused on every rank (the same settings
        everywhere make the same error everywhere)."""
        from mtlgrad.step._gram_engine import GramEngine

        if isinstance(engine, GramEngine):
            raise NotImplementedError(
                "mtlgrad.backward under torch.distributed (more than one rank): the gram engine "
                "is not supported yet (the Gram matrix of the rank-averaged gradients needs the "
                "products between ranks); use engine='loop' or engine='batched', which average "
                "each task's gradients over the ranks"
            )
        from mtlgrad.aggregators import GramAggregator

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
        features: bool = False,
        started: OverlappedLevelMean | None = None,
    ) -> Tensor:
        """Averages the step in place over the ranks: the shared level's per-task gradients now
        (not the features': each rank keeps its own), the heads' when the write stage asks for
        them; returns the averaged losses. ``started``: the level's average, started during the
        backward passes (:mod:`mtlgrad.step._overlap`), finished here."""
        if started is not None:
            started.finish(grads)
        elif not features and not self.sharded:  # sharded: reduce-scattered at the aggregation
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
    ) -> Any:
        """Sharded mode: the per-task gradients reduce-scattered (each rank keeps one contiguous
        shard of every task's rank-averaged gradient), G from the shards and one T x T
        all-reduce, the same weights everywhere, each rank's shard of the update combined, and
        one all-gather of the update, added into the shared ``.grad``."""
        from mtlgrad.aggregators import Aggregation
        from mtlgrad.aggregators._base import checked_gram_on_host, gram_with_flags

        T = len(grads.names)
        reached = self.reached_union(grads, shared)
        params = [shared[k] for k in reached]
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise NotImplementedError(
                "mtlgrad.backward(distributed='sharded'): the shared parameters have several "
                f"dtypes ({sorted(map(str, dtypes))}); sharded mode packs them in one buffer. "
                "Use distributed='replicated'"
            )
        dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        sizes = [p.numel() for p in params]
        P = sum(sizes)
        chunk = -(-P // self.world)  # ceil: the buffer is padded to world x chunk
        # Rank-major: buffer[r, t] is task t's gradient on shard r, so that the reduce-scatter
        # (which splits its input along the first dimension) leaves rank r shard r of every task.
        buffer = torch.zeros(self.world, T, chunk, dtype=dtype, device=device)
        for t in range(T):
            flat = torch.zeros(self.world * chunk, dtype=dtype, device=device)
            offset = 0
            for k, n in zip(reached, sizes):
                g = grads.level[t][k]
                if g is not None:
                    flat[offset : offset + n] = g.reshape(-1)
                offset += n
            buffer[:, t, :] = flat.view(self.world, chunk)
            grads.level[t] = [None] * len(grads.level[t])  # in the buffer now: free them
        shard = torch.empty(T, chunk, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(shard, buffer.reshape(self.world * T, chunk), group=self.group)
        del buffer
        shard.div_(self.world)
        rows = list(shard.unbind(0))
        G, flags = gram_with_flags(rows, T)
        dist.all_reduce(G, group=self.group)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        G_host, losses_host = checked_gram_on_host(
            G,
            flags,
            losses,
            names=[f"shard {self.rank} of the shared parameters"],
            task_names=grads.names,
            scale=scale,
            check_finite=check_finite,
        )
        update = torch.empty(self.world * chunk, dtype=dtype, device=device)
        if G_host is None:  # an overflow on some rank: every rank skips the step (NaN update)
            w = None
            update.fill_(float("nan"))
        else:
            w = aggregator._weights_by_name(G_host, losses_host, grads.names)
            update_shard = ops.combine(rows, T, w.to(device))[0]
            dist.all_gather_into_tensor(update, update_shard, group=self.group)
        out = []
        offset = 0
        for p, n in zip(params, sizes):
            d = update[offset : offset + n].view(p.shape)
            offset += n
            if p.grad is not None:
                p.grad.add_(d)
                out.append(p.grad)
            else:
                out.append(d.clone())
        return Aggregation(out, w, G_host, skipped=G_host is None, losses=losses_host)

    def reached_union(self, grads: Any, level: Sequence[Tensor]) -> list[int]:
        """The inputs of the shared level that some task reaches on some rank (the step's
        ``reached``, made the same on every rank)."""
        mask = torch.zeros(len(level), dtype=torch.int32)
        mask[grads.reached] = 1  # this rank's (computed once, with the gradients)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.group)
        grads.reached = mask.nonzero().flatten().tolist()
        return grads.reached
