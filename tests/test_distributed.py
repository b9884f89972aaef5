"""The step under torch.distributed: real processes, gloo on loopback, every run bounded by a
timeout (a hang is a failure). Each rank runs ``distributed_worker.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, timeout: float, worker: Path = WORKER) -> list[str]:
    """Runs ``world`` ranks of ``scenario`` of ``worker``; returns each rank's output. A rank
    that fails, or a run past ``timeout`` seconds (every rank is then killed), fails the
    test."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(world), str(rank), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for rank, process in enumerate(processes):
            out, _ = process.communicate(timeout=timeout)
            outputs.append(out)
            assert process.returncode == 0, f"rank {rank} of {scenario!r} failed:\n{out[-4000:]}"
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"{scenario!r} with {world} ranks did not finish within {timeout} s (a hang)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs


@pytest.mark.parametrize("world", [2, 4])
def test_replicas_equal_one_process_on_the_global_batch(world: int) -> None:
    outputs = launch("equivalence", world, timeout=600)
    for out in outputs:
        done = [line for line in out.splitlines() if line.startswith("ok ")]
        assert len(done) == 6 * 2 * 2, out[-2000:]  # methods x engines x (plain, DDP)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_replicas_equal_one_process_on_the_global_batch(world: int) -> None:
    for out in launch("sharded", world, timeout=300):
        assert out.count("ok sharded") == 6 * 2 + 2, out[-2000:]  # methods x (plain, DDP), mixed
        assert "ok elementwise refused" in out, out[-2000:]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_with_zero_redundancy_writes_each_ranks_own_parameters(world: int) -> None:
    for out in launch("zero", world, timeout=300):
        assert out.count("ok zero") == 3, out[-2000:]
        assert "ok unowned refused" in out, out[-2000:]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_features_replicas_equal_one_process_on_the_global_batch(world: int) -> None:
    for out in launch("features", world, timeout=300):
        assert out.count("ok features") == 6 * 2, out[-2000:]  # methods x (plain, DDP)
        assert "ok elementwise refused" in out, out[-2000:]


def test_accumulated_micro_batches_equal_one_process_on_the_global_batch() -> None:
    for out in launch("accumulation", 2, timeout=300):
        assert out.count("ok accumulation") == 2, out[-2000:]


def test_features_leaving_ddp_with_the_outputs_are_an_error() -> None:
    (out,) = launch("ddp_output_features", 1, timeout=120)
    assert out.count("ok refused") == 2, out[-2000:]


def test_the_optimizer_state_round_trips_through_distributed_checkpoint() -> None:
    for out in launch("dcp", 2, timeout=180):
        assert "ok resumed bit-identically" in out, out[-2000:]


def test_task_counts_that_differ_raise_on_every_rank() -> None:
    for out in launch("task_counts_differ", 2, timeout=120):
        assert "ok raised" in out and "tasks: rank 0: 3, rank 1: 2" in out, out
        assert "task names: ranks 0 / ranks 1 differ" in out, out


def test_generators_that_differ_raise_on_every_rank() -> None:
    for out in launch("generators_differ", 2, timeout=120):
        assert "ok raised" in out and "generator state" in out, out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gram_engine_replicas_equal_one_process_on_the_global_batch(world: int) -> None:
    for out in launch("gram_engine", world, timeout=300):
        assert out.count("ok gram") == 6 * 2, out[-2000:]  # methods x (plain, DDP)
        assert out.count("ok raised") == 1, out[-2000:]  # the plans differ
        assert "ok per-sample refused" in out, out[-2000:]
        assert "ok sharded refused" in out, out[-2000:]


def test_a_rank_that_dies_fails_the_others_within_the_timeout() -> None:
    outputs = launch("rank_dies", 2, timeout=120)
    assert "ok failed" in outputs[0], outputs[0]
    assert "ok leaving" in outputs[1], outputs[1]


def test_each_tasks_all_reduce_starts_before_the_next_backward_pass() -> None:
    for out in launch("overlap", 2, timeout=300):
        assert out.count("ok overlap") == 2, out[-2000:]  # loop, batched with one task a chunk


def test_a_parameter_reached_on_one_rank_only_matches_one_process() -> None:
    for out in launch("reach_differs", 2, timeout=300):
        assert out.count("ok reach differs") == 2, out[-2000:]  # loop, batched
