"""The features step on a trunk sharded by FSDP2 (``fully_shard``): real processes, gloo on
loopback, every run bounded by a timeout (a hang is a failure). Each rank runs
``fsdp_worker.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from test_distributed import launch

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_features_on_an_fsdp2_trunk_equal_one_process_on_the_global_batch() -> None:
    for out in launch("features", 2, timeout=180, worker=WORKER):
        for heads in ("plain", "sharded"):
            for method in ("UPGrad", "MGDA", "NashMTL", "PCGrad"):
                assert f"ok fsdp {method} heads={heads}" in out, out[-3000:]


def test_fsdp2_without_features_is_refused_on_every_rank() -> None:
    for out in launch("refused", 2, timeout=120, worker=WORKER):
        assert out.count("ok refused") == 6, out[-3000:]
