"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def split_sizes(total: int, count: int, generator: torch.Generator) -> list[int]:
    """`count` tensor sizes of uneven length (like a model's layers) that add up to `total`."""
    raw = torch.rand(count, generator=generator, dtype=torch.float64) + 0.05
    sizes = (raw / raw.sum() * total).floor().long()
    sizes[-1] += total - int(sizes.sum())
    return [int(s) for s in sizes]


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeat: int) -> None:
        self.device = device
        self.warmup = warmup
        self.repeat = repeat

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[int], object]) -> float:
        """Median seconds of fn(i), i the repetition index (used to rotate inputs)."""
        for i in range(self.warmup):
            fn(i)
        self.sync()
        times = []
        for i in range(self.repeat):
            self.sync()
            start = time.perf_counter()
            fn(self.warmup + i)
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
