"""One rank of the FSDP2 tests (``test_fsdp.py`` starts ``world`` of them).

    python fsdp_worker.py SCENARIO WORLD RANK PORT

Every scenario prints ``ok ...`` lines and exits 0 when what it checks holds; anything else is
a failure (an assertion, an unexpected error, or the parent's timeout for a hang).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from distributed_worker import (
    PER_RANK,
    STEPS,
    FeatureNet,
    batch,
    expect_refused,
    init,
    make_aggregator,
    train_features,
)
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import mtlgrad
from mtlgrad.aggregators import MGDA, UPGrad
from mtlgrad.optim import MTLOptimizer

METHODS = ("UPGrad", "MGDA", "NashMTL", "PCGrad")


def sharded(heads: str) -> FeatureNet:
    """FeatureNet (the same initial values as distributed_worker's) with its trunk sharded by
    fully_shard, layer by layer and as a whole; ``heads``: "plain" (replicated, not sharded),
    or "sharded" (each head its own fully_shard group, the model the root)."""
    torch.manual_seed(0)
    net = FeatureNet().double()
    for layer in net.trunk:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net.trunk)
    if heads == "sharded":
        for head in net.heads:
            fully_shard(head)
        fully_shard(net)
    return net


def full(params) -> list[torch.Tensor]:
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in params]


def train_sharded(method: str, world: int, rank: int, heads: str, engine: str) -> list:
    """STEPS steps of MTLOptimizer with features=z on the FSDP2 model, this rank's rows."""
    net = sharded(heads)
    optimizer = MTLOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        make_aggregator(method),
        shared_params=net.trunk.parameters(),
        engine=engine,
    )
    for step in range(STEPS):
        x, y = batch(step, world)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        optimizer.zero_grad()
        z, outputs = net(x[rows])
        losses = {f"t{t}": ((o - y[rows, t]) ** 2).mean() for t, o in enumerate(outputs)}
        optimizer.backward(losses, features=z)
        optimizer.step()
    return full(net.parameters())


def scenario_features(world: int, rank: int, port: int) -> None:
    """features= on an FSDP2 trunk, heads plain or sharded: the full parameters after STEPS
    steps equal one process's features step on the global batch, and are the same on every
    rank."""
    references = {m: train_features(m, world, None, False) for m in METHODS}
    init(world, rank, port)
    for heads in ("plain", "sharded"):
        for method, expected in references.items():
            engine = "batched" if method == "UPGrad" else "loop"
            params = train_sharded(method, world, rank, heads, engine)
            for p, q in zip(params, expected, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            flat = torch.cat([p.reshape(-1) for p in params])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(g, gathered[0]) for g in gathered), "replicas differ"
            print(f"ok fsdp {method} heads={heads}", flush=True)


def scenario_refused(world: int, rank: int, port: int) -> None:
    """Without features=, every engine is refused on every rank, naming FSDP2 and features=,
    before anything is sent or written; so is MTLOptimizer without shared_params."""
    init(world, rank, port)
    net = sharded("plain")
    x, y = batch(0, world)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    def losses() -> list[torch.Tensor]:
        _, outputs = net(x[rows])
        return [((o - y[rows, t]) ** 2).mean() for t, o in enumerate(outputs)]

    for engine in ("loop", "batched"):
        for mode in ("replicated", "sharded"):
            expect_refused(
                lambda engine=engine, mode=mode: mtlgrad.backward(
                    losses(),
                    shared_params=net.trunk.parameters(),
                    aggregator=UPGrad(),
                    engine=engine,
                    distributed=mode,
                ),
                "FSDP2",
                f"ok refused {engine} {mode}",
                f"engine={engine!r} distributed={mode!r} ran on an FSDP2 trunk",
            )
    assert all(p.grad is None for p in net.parameters()), ".grad was written"
    optimizer = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), UPGrad())
    z, outputs = net(x[rows])
    try:
        optimizer.backward([((o - y[rows, t]) ** 2).mean() for t, o in enumerate(outputs)], z)
    except ValueError as error:
        assert "FSDP2" in str(error) and "shared_params" in str(error), str(error)
        print("ok refused discovery", flush=True)
    else:
        raise AssertionError("MTLOptimizer found shared parameters among DTensors")
    gram = mtlgrad.GramEngine(net.trunk)
    expect_refused(
        lambda: mtlgrad.backward(
            losses(), shared_params=net.trunk.parameters(), aggregator=MGDA(), engine=gram
        ),
        "features=z",
        "ok refused gram",
        "the gram engine ran on an FSDP2 trunk",
    )


SCENARIOS = {"features": scenario_features, "refused": scenario_refused}

if __name__ == "__main__":
    scenario, world, rank, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    SCENARIOS[scenario](world, rank, port)
    if dist.is_initialized():
        dist.destroy_process_group()
