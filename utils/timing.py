"""Wall-clock timing for the benchmarks: best of several runs, synchronising CUDA around each."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                 device: torch.device | None = None) -> float:
    """Best wall time of `repeats` calls of `fn`, after `warmup` untimed calls."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
