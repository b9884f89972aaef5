"""Lightning's ``strategy="ddp"`` on CPU with ``mtl_step``: run as a script, Lightning starts
the other ranks itself. Each rank trains on its own shard of the data; at the end every rank
checks that all replicas hold the same parameters, and prints ``ok replicas identical``.

    python lightning_ddp_worker.py WORLD
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mtlgrad.aggregators import UPGrad
from mtlgrad.integrations.lightning import mtl_step
from mtlgrad.optim import MTLOptimizer


class MultiTask(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def configure_optimizers(self):
        return MTLOptimizer(
            torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9),
            UPGrad(),
            shared_params=self.trunk.parameters(),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x)
        losses = {
            f"t{t}": ((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)
        }
        mtl_step(self, losses, log=False)

    def on_train_end(self) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in self.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "the replicas differ"
        print(f"ok replicas identical (rank {dist.get_rank()})", flush=True)


def main() -> None:
    world = int(sys.argv[1])
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 3, generator=g))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MultiTask(), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main()
