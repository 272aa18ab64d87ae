"""CPU thread count for small models, picked by measurement.

A 3 M-parameter U-Net cannot keep two threads busy: on a loaded 2-core machine the mini demo ran
1.1-7.7 s/step with 2 threads and ~0.15 s/step with 1. So before training a small model on the
CPU, time a few real steps at each candidate count and keep the fastest. An explicit
OMP_NUM_THREADS (or torch.set_num_threads by the caller) is always respected.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

SMALL_MODEL_PARAMS = 20_000_000  # above this, threads pay for themselves


def thread_candidates() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, cores})


def choose_cpu_threads(step: Callable[[], None], candidates: list[int] | None = None, repeats: int = 3,
                       clock: Callable[[], float] = time.perf_counter) -> int:
    """Time `step` (after one warm-up) at each thread count; set and return the fastest."""
    best, best_time = None, float("inf")
    for threads in candidates or thread_candidates():
        torch.set_num_threads(threads)
        step()
        start = clock()
        for _ in range(repeats):
            step()
        elapsed = clock() - start
        if elapsed < best_time:
            best, best_time = threads, elapsed
    torch.set_num_threads(best)
    return best


def should_choose_threads(device: torch.device, num_params: int) -> bool:
    return device.type == "cpu" and num_params < SMALL_MODEL_PARAMS and "OMP_NUM_THREADS" not in os.environ
