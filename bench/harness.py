"""What every benchmark shares: interleaved median timing, pinning to one core, demo training data."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline import coco
from pipeline.config import DemoParams
from pipeline.demo import generate_demo
from pipeline.folds import class_presence


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


def demo_training_data(root: Path, n_images: int, size: int) -> tuple[list[str], np.ndarray]:
    """Demo training images at `size` px under root/demo and their masks under root/masks.

    Returns the file names and their class presence (bool (N, C)), as `fit` has them for a fold.
    """
    generate_demo(root / "demo", DemoParams(n_train=n_images, n_test=1, image_size=size))
    train = coco.load_coco(root / "demo" / "train.json")
    coco.write_masks(train, root / "masks")
    names = [image.file_name for image in train.images]
    masks = (coco.read_mask(root / "masks" / coco.mask_relpath(name)) for name in names)
    return names, class_presence(masks, train.n_classes)
