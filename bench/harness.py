"""What every benchmark shares: interleaved median timing and pinning to one core."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import cv2
import torch


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function; the functions take turns within each repeat, so load from
    other processes on the machine falls on all of them alike. One untimed warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (and CUDA initialisation)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def pin_to_one_core() -> None:
    """Measure per-core figures: this process, OpenCV and torch each get one core, one thread."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
