"""One rank of the distributed tests (``test_distributed.py`` starts ``world`` of them).

    python distributed_worker.py SCENARIO WORLD RANK PORT

Every scenario prints ``ok ...`` lines and exits 0 when what it checks holds; anything else is
a failure (an assertion, an unexpected error, or the parent's timeout for a hang).
"""

from __future__ import annotations

import datetime
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import mtlgrad
from mtlgrad.aggregators import MGDA, GradDrop, GradVac, NashMTL, PCGrad, Sum, UPGrad
from mtlgrad.optim import MTLOptimizer
from mtlgrad.step import DistributedMismatchError

TASKS, PER_RANK, STEPS = 3, 4, 3


def make_aggregator(name: str):
    if name == "PCGrad":
        return PCGrad(generator=torch.Generator().manual_seed(7))
    if name == "NashMTL":
        return NashMTL(update_weights_every=1)
    if name == "GradVac":
        return GradVac(beta=0.3, generator=torch.Generator().manual_seed(3))
    return {"Sum": Sum, "MGDA": MGDA, "UPGrad": UPGrad}[name]()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 106 shared parameters: sharded mode pads them for every world size tested.
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]

    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters())


def batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (every rank can build it)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * PER_RANK, 5, generator=g, dtype=torch.float64)
    y = torch.randn(world * PER_RANK, TASKS, generator=g, dtype=torch.float64)
    return x, y


def losses_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = model(x)
    return {f"t{t}": ((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)}


def make_optimizer(net: nn.Module, name: str, engine: str, **kwargs) -> MTLOptimizer:
    """SGD with momentum under MTLOptimizer; ``engine="gram"``: a GramEngine on the trunk."""
    return MTLOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        make_aggregator(name),
        shared_params=net.shared(),
        engine=mtlgrad.GramEngine(net.trunk) if engine == "gram" else engine,
        **kwargs,
    )


def train(
    name: str,
    engine: str,
    world: int,
    rank: int | None,
    ddp: bool,
    mode: str = "replicated",
    batch_size: int | None = None,
    net_class: type[nn.Module] = Net,
) -> list[torch.Tensor]:
    """STEPS steps of MTLOptimizer; ``rank`` None: one process on the global batch."""
    torch.manual_seed(0)
    net = net_class().double()
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    optimizer = make_optimizer(net, name, engine, distributed=mode, batch_size=batch_size)
    for step in range(STEPS):
        x, y = batch(step, world)
        if rank is not None:
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x, y = x[rows], y[rows]
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, x, y))
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


METHODS = ("Sum", "PCGrad", "MGDA", "UPGrad", "NashMTL", "GradVac")
ENGINES = ("loop", "batched")


def init(world: int, rank: int, port: int, timeout_s: float = 30.0) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def expect_mismatch(fn, needle: str) -> None:
    try:
        fn()
    except DistributedMismatchError as error:
        assert needle in str(error), str(error)
        print(f"ok raised: {error}", flush=True)
        return
    raise AssertionError("no DistributedMismatchError")


def check_replicas(
    params: list[torch.Tensor],
    reference: list[torch.Tensor],
    world: int,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> None:
    """This rank's parameters equal one process's (1e-10), and every rank's are bitwise equal."""
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "replicas differ"


def expect_refused(step, needle: str, ok: str, otherwise: str) -> None:
    """``step()`` raises NotImplementedError mentioning ``needle`` (on every rank: each prints
    ``ok``); that it runs is a failure (``otherwise``)."""
    try:
        step()
    except NotImplementedError as error:
        assert needle in str(error), str(error)
        print(ok, flush=True)
        return
    raise AssertionError(otherwise)


def scenario_equivalence(world: int, rank: int, port: int) -> None:
    # The references first, before torch.distributed exists: one process, the global batch.
    references = {(m, e): train(m, e, world, None, False) for m in METHODS for e in ENGINES}
    init(world, rank, port)
    for (method, engine), reference in references.items():
        for ddp in (False, True):
            params = train(method, engine, world, rank, ddp)
            check_replicas(params, reference, world)
            print(f"ok {method} {engine} ddp={ddp}", flush=True)


class MixedNet(Net):
    """A trunk whose second layer (and the heads) stay float32 under ``double()``: two
    buffers in sharded mode."""

    def double(self) -> MixedNet:
        super().double()
        self.trunk[2].float()
        self.heads.float()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = torch.tanh(self.trunk[0](x)).float()
        z = torch.tanh(self.trunk[2](hidden))
        return [head(z).squeeze(-1).double() for head in self.heads]


def scenario_sharded(world: int, rank: int, port: int) -> None:
    """Sharded mode: reduce-scatter, T x T all-reduce, all-gather; the step of one process."""
    references = {m: train(m, "loop", world, None, False) for m in METHODS}
    mixed = {
        m: train(m, "loop", world, None, False, net_class=MixedNet) for m in ("MGDA", "UPGrad")
    }
    init(world, rank, port)
    for method, reference in references.items():
        for ddp in (False, True):
            params = train(method, "loop", world, rank, ddp, mode="sharded")
            check_replicas(params, reference, world)
            print(f"ok sharded {method} ddp={ddp}", flush=True)
    for method, reference in mixed.items():  # float64 and float32 shared parameters
        params = train(method, "loop", world, rank, False, mode="sharded", net_class=MixedNet)
        assert {p.dtype for p in params} == {torch.float64, torch.float32}
        check_replicas(params, reference, world, rtol=1e-5, atol=1e-6)
        print(f"ok sharded mixed dtypes {method}", flush=True)
    torch.manual_seed(0)
    net = Net().double()
    x, y = batch(0, world)
    expect_refused(
        lambda: mtlgrad.backward(
            losses_of(net, x, y),
            shared_params=net.trunk.parameters(),
            aggregator=GradDrop(),
            distributed="sharded",
        ),
        "GradDrop is elementwise",
        "ok elementwise refused",
        "GradDrop ran in sharded mode",
    )


def scenario_zero(world: int, rank: int, port: int) -> None:
    """Sharded mode with a ZeroRedundancyOptimizer: each rank reduce-scatters into the per-task
    gradients of the parameters it owns and writes their update only (no all-gather); its step
    broadcasts them. The step of one process on the global batch."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    references = {m: train(m, "loop", world, None, False) for m in ("MGDA", "UPGrad", "GradVac")}
    init(world, rank, port)
    gathers = []
    original = dist.all_gather_into_tensor

    def counted(*args, **kwargs):
        gathers.append(args[0].numel())
        return original(*args, **kwargs)

    dist.all_gather_into_tensor = counted
    for method, reference in references.items():
        torch.manual_seed(0)
        net = Net().double()
        zero = ZeroRedundancyOptimizer(
            net.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9
        )
        own = {id(p) for group in zero.optim.param_groups for p in group["params"]}
        assert 0 < len(own) < len(list(net.parameters())), "each rank owns some parameters"
        optimizer = MTLOptimizer(
            zero,
            make_aggregator(method),
            shared_params=net.trunk.parameters(),
            distributed="sharded",
        )
        for step in range(STEPS):
            x, y = batch(step, world)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            optimizer.zero_grad()
            optimizer.backward(losses_of(net, x[rows], y[rows]))
            for p in net.trunk.parameters():  # the update of this rank's parameters only
                assert (p.grad is not None) == (id(p) in own)
            optimizer.step()
        check_replicas([p.detach() for p in net.parameters()], reference, world)
        print(f"ok zero {method}", flush=True)
    dist.all_gather_into_tensor = original
    assert not gathers, f"the update was all-gathered: {gathers}"
    # A shared parameter that no rank owns: the same error on every rank, .grad untouched.
    torch.manual_seed(0)
    net = Net().double()
    x, y = batch(0, world)
    first = net.trunk[0].weight
    try:
        mtlgrad.backward(
            losses_of(net, x, y),
            shared_params=net.trunk.parameters(),
            aggregator=UPGrad(),
            distributed="sharded",
            owned_params=[p for p in net.trunk.parameters() if p is not first and rank == 0],
        )
    except ValueError as error:
        assert "shared_params[0] (shape [7, 5]) is owned by 0 ranks" in str(error), str(error)
        assert all(p.grad is None for p in net.parameters())
        print("ok unowned refused", flush=True)
    else:
        raise AssertionError("a parameter owned by no rank was not refused")


def scenario_dcp(world: int, rank: int, port: int) -> None:
    """MTLOptimizer's state (GradVac's targets and generator) round-trips through
    torch.distributed.checkpoint, and the resumed run continues bit-identically."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    init(world, rank, port)
    folder = Path(tempfile.gettempdir()) / f"mtlgrad-dcp-{port}"

    def build() -> tuple[nn.Module, MTLOptimizer]:
        torch.manual_seed(0)
        net = Net().double()
        model = nn.parallel.DistributedDataParallel(net)
        optimizer = MTLOptimizer(
            torch.optim.Adam(net.parameters(), lr=0.01),
            make_aggregator("GradVac"),
            shared_params=net.trunk.parameters(),
        )
        return model, optimizer

    def steps(model: nn.Module, optimizer: MTLOptimizer, first: int, last: int) -> None:
        for step in range(first, last):
            x, y = batch(step, world)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            optimizer.zero_grad()
            optimizer.backward(losses_of(model, x[rows], y[rows]))
            optimizer.step()

    model, optimizer = build()
    steps(model, optimizer, 0, 4)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, optimizer = build()
    steps(model, optimizer, 0, 2)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    dist.barrier()

    model, optimizer = build()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    assert optimizer.aggregator.state_dict()["targets"] is not None, "GradVac's state not loaded"
    steps(model, optimizer, 2, 4)
    for p, q in zip(model.parameters(), uninterrupted):
        assert torch.equal(p.detach(), q), "the resumed run differs"
    dist.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    print("ok resumed bit-identically", flush=True)


def scenario_task_counts_differ(world: int, rank: int, port: int) -> None:
    init(world, rank, port)
    torch.manual_seed(0)
    net = Net().double()
    x, y = batch(0, world)
    losses = list(losses_of(net, x, y).values())
    if rank == 1:
        losses = losses[:2]
    expect_mismatch(
        lambda: mtlgrad.backward(losses, shared_params=net.trunk.parameters(), aggregator=UPGrad()),
        "tasks",
    )
    assert all(p.grad is None for p in net.parameters()), ".grad was written"


def scenario_generators_differ(world: int, rank: int, port: int) -> None:
    init(world, rank, port)
    torch.manual_seed(rank)  # a per-rank seed, as for data augmentation
    net = Net().double()
    for p in net.parameters():
        dist.broadcast(p.data, 0)
    x, y = batch(0, world)
    expect_mismatch(
        lambda: mtlgrad.backward(
            losses_of(net, x, y), shared_params=net.trunk.parameters(), aggregator=PCGrad()
        ),
        "generator state",
    )


class GramTrunk(nn.Module):
    """Every path of the gram engine: Linear (one of them called twice), Embedding, LayerNorm, a
    module of the generic path (PReLU), and a layer that only some forwards use."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.table = nn.Embedding(4, 6)
        self.norm = nn.LayerNorm(6)
        self.twice = nn.Linear(6, 6)
        self.act = nn.PReLU(6)
        self.extra = nn.Linear(6, 6)
        self.use_extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.5, 0.0, 0.5], dtype=x.dtype))
        h = torch.tanh(self.norm(self.embed(x) + self.table(ids)))
        h = self.act(self.twice(torch.tanh(self.twice(h))))
        return self.extra(h) if self.use_extra else h


class GramNet(nn.Module):
    """A trunk for the gram engine, and a shared parameter outside it (the free path)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = GramTrunk()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x) * self.scale
        return [h(z).squeeze(-1) for h in self.heads]

    def shared(self) -> list[torch.Tensor]:
        return [*self.trunk.parameters(), self.scale]


def scenario_gram_engine(world: int, rank: int, port: int) -> None:
    """The gram engine, each layer's T gradients averaged over the ranks: one process's step on
    the global batch (the loop engine's, in one process); a plan that differs between the ranks,
    per-sample losses and sharded mode are refused on every rank."""
    references = {m: train(m, "loop", world, None, False, net_class=GramNet) for m in METHODS}
    init(world, rank, port)
    for method, reference in references.items():
        for ddp in (False, True):
            params = train(method, "gram", world, rank, ddp, net_class=GramNet)
            check_replicas(params, reference, world)
            print(f"ok gram {method} ddp={ddp}", flush=True)
    torch.manual_seed(0)
    net = GramNet().double()
    optimizer = make_optimizer(net, "UPGrad", "gram")
    x, y = batch(0, world)
    optimizer.backward(losses_of(net, x, y))
    assert net.trunk.extra.weight.grad is None  # reached by no loss: no .grad, as in PyTorch
    assert net.trunk.twice.weight.grad is not None
    optimizer.zero_grad(set_to_none=True)
    net.trunk.use_extra = rank == 0
    expect_mismatch(lambda: optimizer.backward(losses_of(net, x, y)), "the Gram engine's plan")
    assert all(p.grad is None for p in net.parameters())
    net.trunk.use_extra = False
    per_sample = torch.stack([(o - y[:, t]) ** 2 for t, o in enumerate(net(x))], dim=1)
    expect_refused(
        lambda: optimizer.backward(per_sample),
        "per-sample losses",
        "ok per-sample refused",
        "per-sample losses were averaged over the ranks",
    )
    sharded = make_optimizer(net, "UPGrad", "gram", distributed="sharded")
    expect_refused(
        lambda: sharded.backward(losses_of(net, x, y)),
        "distributed='replicated'",
        "ok sharded refused",
        "the gram engine ran in sharded mode",
    )


def scenario_rank_dies(world: int, rank: int, port: int) -> None:
    init(world, rank, port, timeout_s=5.0)
    if rank == world - 1:
        print("ok leaving", flush=True)
        sys.stdout.flush()
        import os

        os._exit(0)  # dies without a word to the others
    torch.manual_seed(0)
    net = Net().double()
    x, y = batch(0, world)
    try:
        losses = losses_of(net, x, y)
        mtlgrad.backward(losses, shared_params=net.trunk.parameters(), aggregator=UPGrad())
    except (RuntimeError, dist.DistBackendError) as error:
        print(f"ok failed: {type(error).__name__}", flush=True)
        import os

        os._exit(0)  # the process group is broken; do not wait in its destructor
    raise AssertionError("the step finished without the dead rank")


class FeatureNet(Net):
    """Returns the trunk's output too, for features=."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]


def train_features(method: str, world: int, rank: int | None, ddp: bool) -> list[torch.Tensor]:
    """STEPS steps with features=z; ``rank`` None: one process on the global batch."""
    torch.manual_seed(0)
    net = FeatureNet().double()
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    optimizer = MTLOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        make_aggregator(method),
        shared_params=net.trunk.parameters(),
    )
    for step in range(STEPS):
        x, y = batch(step, world)
        if rank is not None:
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x, y = x[rows], y[rows]
        optimizer.zero_grad()
        z, outputs = model(x)
        losses = {f"t{t}": ((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)}
        optimizer.backward(losses, features=z)
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def scenario_features(world: int, rank: int, port: int) -> None:
    """features=: G summed over the ranks (T x T), the trunk's gradient averaged: one process's
    features step on the global batch. An elementwise method is refused on every rank."""
    references = {m: train_features(m, world, None, False) for m in METHODS}
    init(world, rank, port)
    for method, reference in references.items():
        for ddp in (False, True):
            params = train_features(method, world, rank, ddp)
            check_replicas(params, reference, world)
            print(f"ok features {method} ddp={ddp}", flush=True)
    torch.manual_seed(0)
    net = FeatureNet().double()
    x, y = batch(0, world)
    z, outputs = net(x)
    expect_refused(
        lambda: mtlgrad.backward(
            [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)],
            shared_params=net.trunk.parameters(),
            aggregator=GradDrop(),
            features=z,
        ),
        "GradDrop is elementwise",
        "ok elementwise refused",
        "GradDrop with features= ran under torch.distributed",
    )


def scenario_accumulation(world: int, rank: int, port: int) -> None:
    """Two micro-batches per rank, accumulated per task and aggregated once, are one process's
    step on the global batch; the accumulating calls send nothing."""
    references = {m: train(m, "loop", world, None, False) for m in ("UPGrad", "GradVac")}
    init(world, rank, port)
    collectives = ("all_reduce", "all_gather", "broadcast", "all_reduce_coalesced")
    for method, reference in references.items():
        torch.manual_seed(0)
        net = Net().double()
        optimizer = MTLOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
            make_aggregator(method),
            shared_params=net.trunk.parameters(),
        )
        for step in range(STEPS):
            x, y = batch(step, world)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x, y = x[rows], y[rows]
            half = PER_RANK // 2
            optimizer.zero_grad()
            saved = {name: getattr(dist, name) for name in collectives}
            for name in collectives:
                setattr(
                    dist,
                    name,
                    lambda *a, _n=name, **k: (_ for _ in ()).throw(
                        AssertionError(f"{_n} during an accumulating call")
                    ),
                )
            try:
                losses = losses_of(net, x[:half], y[:half])
                optimizer.backward({k: v / 2 for k, v in losses.items()}, aggregate=False)
            finally:
                for name, fn in saved.items():
                    setattr(dist, name, fn)
            losses = losses_of(net, x[half:], y[half:])
            optimizer.backward({k: v / 2 for k, v in losses.items()})
            optimizer.step()
        for p, q in zip(net.parameters(), reference):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
        print(f"ok accumulation {method}", flush=True)


def scenario_ddp_output_features(world: int, rank: int, port: int) -> None:
    """DDP with find_unused_parameters or static_graph sends the features and the outputs
    through one node: features= is then an error naming DDP, never a step without gradients."""
    init(world, rank, port)

    class Features(Net):
        def forward(self, x: torch.Tensor):  # type: ignore[override]
            z = self.trunk(x)
            return z, [h(z).squeeze(-1) for h in self.heads]

    for options in ({"find_unused_parameters": True}, {"static_graph": True}):
        torch.manual_seed(0)
        net = Features().double()
        model = nn.parallel.DistributedDataParallel(net, **options)
        x, y = batch(0, world)
        z, outputs = model(x)
        losses = [((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)]
        try:
            mtlgrad.backward(
                losses, shared_params=net.trunk.parameters(), aggregator=UPGrad(), features=z
            )
        except ValueError as error:
            assert "DistributedDataParallel" in str(error), str(error)
            assert all(p.grad is None for p in net.parameters()), ".grad was written"
            print(f"ok refused {options}", flush=True)
            continue
        raise AssertionError(f"features= under DDP {options} did not raise")


class PassMark(torch.autograd.Function):
    """The identity, whose backward records in ``step_events`` that a backward pass reached the
    trunk's output (once per pass: one per task with the loop engine, one per chunk of tasks
    with the batched one)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        step_events.append("backward pass")
        return grad


step_events: list[str] = []


class MarkedNet(Net):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = PassMark.apply(self.trunk(x))
        return [h(z).squeeze(-1) for h in self.heads]


def scenario_overlap(world: int, rank: int, port: int) -> None:
    """Replicated mode launches each task's all-reduce as soon as its backward pass returns
    (loop engine; batched engine with one task per chunk), before the next pass starts; the
    replicas still equal one process on the global batch."""
    cases = (("loop", None), ("batched", 1))
    references = {(e, b): train("UPGrad", e, world, None, False, batch_size=b) for e, b in cases}
    init(world, rank, port)
    shared_numel = sum(p.numel() for p in Net().trunk.parameters())
    all_reduce = dist.all_reduce

    def recorded(tensor: torch.Tensor, *args, **kwargs):
        if tensor.dtype == torch.float64 and tensor.numel() == shared_numel:
            step_events.append("all_reduce of one task's shared gradients")
        return all_reduce(tensor, *args, **kwargs)

    for (engine, batch_size), reference in references.items():
        step_events.clear()
        dist.all_reduce = recorded
        try:
            params = train(
                "UPGrad", engine, world, rank, False, batch_size=batch_size, net_class=MarkedNet
            )
        finally:
            dist.all_reduce = all_reduce
        # Every step: pass, its all-reduce, pass, its all-reduce, ... (one process's order
        # would be every pass first, then every all-reduce).
        one_step = ["backward pass", "all_reduce of one task's shared gradients"] * TASKS
        expected = one_step * STEPS
        assert step_events == expected, f"{engine}: {step_events}"
        check_replicas(params, reference, world)
        print(f"ok overlap {engine}", flush=True)


class GatedNet(Net):
    """Tasks 0 and 1 also read the shared ``gate`` on the flagged samples, and only when the
    batch has some: a rank without them never reaches it. ``unused`` is shared and reached by
    no task on any rank."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(-1.0, 1.0, 8))
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor, flagged: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        z = self.trunk(x)
        outputs = [h(z).squeeze(-1) for h in self.heads]
        if bool(flagged.any()):
            extra = torch.where(flagged, (z * self.gate).sum(-1), torch.zeros_like(outputs[0]))
            outputs[0] = outputs[0] + extra
            outputs[1] = outputs[1] - extra
        return outputs


def train_gated(engine: str, world: int, rank: int | None) -> list[torch.Tensor]:
    """STEPS steps of :class:`GatedNet` with :func:`mtlgrad.backward`; the first two samples of
    the global batch (rank 0's) are flagged. ``rank`` None: one process on the global batch."""
    torch.manual_seed(0)
    net = GatedNet().double()
    shared = [*net.trunk.parameters(), net.gate, net.unused]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    aggregator = UPGrad()
    for step in range(STEPS):
        x, y = batch(step, world)
        flagged = torch.arange(len(x)) < 2
        if rank is not None:
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x, y, flagged = x[rows], y[rows], flagged[rows]
        optimizer.zero_grad()
        outputs = net(x, flagged)
        losses = {f"t{t}": ((o - y[:, t]) ** 2).mean() for t, o in enumerate(outputs)}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing here is worth a warning
            mtlgrad.backward(losses, shared_params=shared, aggregator=aggregator, engine=engine)
        assert net.gate.grad is not None, "the gate has no gradient"
        assert net.unused.grad is None, "a parameter no task reaches got a gradient"
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def scenario_reach_differs(world: int, rank: int, port: int) -> None:
    """Tasks that reach a shared parameter on one rank only (zeros from the others) and a
    shared parameter that no task reaches: one process's step on the global batch."""
    references = {e: train_gated(e, world, None) for e in ENGINES}
    init(world, rank, port)
    for engine, reference in references.items():
        params = train_gated(engine, world, rank)
        assert not torch.equal(params[-2], torch.linspace(-1.0, 1.0, 8).double()), "gate unmoved"
        check_replicas(params, reference, world)
        print(f"ok reach differs {engine}", flush=True)


SCENARIOS = {
    "dcp": scenario_dcp,
    "sharded": scenario_sharded,
    "zero": scenario_zero,
    "features": scenario_features,
    "ddp_output_features": scenario_ddp_output_features,
    "equivalence": scenario_equivalence,
    "accumulation": scenario_accumulation,
    "overlap": scenario_overlap,
    "reach_differs": scenario_reach_differs,
    "task_counts_differ": scenario_task_counts_differ,
    "generators_differ": scenario_generators_differ,
    "gram_engine": scenario_gram_engine,
    "rank_dies": scenario_rank_dies,
}

if __name__ == "__main__":
    scenario, world, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    SCENARIOS[scenario](world, rank, port)
    if dist.is_initialized():
        dist.destroy_process_group()
