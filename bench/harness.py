"""What every benchmark shares: interleaved median timing, pinning to one core, demo training data, the
predict stage's peak memory."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import DemoParams
from pipeline.data import coco
from pipeline.data.demo import generate_demo

PREDICT_STAGE = Path(__file__).resolve().parents[1] / "stages" / "predict.py"
# Runs a stage script as `python stage ...` would, after importing the modules it uses, and writes two peak
# RSS figures (kB) to the file named by argv[1]: after those imports, and at the end of the stage.
_STAGE_PROBE = """
import resource, runpy, sys
# The stage's heavy imports: torch, smp, cv2.
import pipeline.inference.infer, pipeline.evaluation.submission  # noqa: F401
result, sys.argv = sys.argv[1], sys.argv[2:]
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
runpy.run_path(sys.argv[0], run_name="__main__")
with open(result, "w") as f:
    f.write(f"{imports} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
"""


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

    Returns the file names and their class presence (bool (N, C)), as the masks stage's manifest
    records them and `fit` reads them for a fold.
    """
    generate_demo(root / "demo", DemoParams(n_train=n_images, n_test=1, image_size=size))
    train = coco.load_coco(root / "demo" / "train.json")
    presence = coco.write_masks(train, root / "masks")
    return [image.file_name for image in train.images], presence


def predict_stage_rss(work: Path, args: list[str], log: Path) -> tuple[int, int]:
    """(peak RSS after its imports, peak RSS of the whole run), in bytes, of `stages/predict.py ARGS` run
    in a child process in `work`; its output goes to `log`. Exits if the stage fails."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = log.with_suffix(".rss")
    with open(log, "w") as out:
        command = [sys.executable, "-c", _STAGE_PROBE, str(result), str(PREDICT_STAGE), *args]
        run = subprocess.run(command, cwd=work, env=env, stdout=out, stderr=out, check=False)
    if run.returncode != 0:
        raise SystemExit(f"the predict stage failed; see {log}")
    imports, peak = (int(kb) * 1024 for kb in result.read_text().split())
    return imports, peak
