"""Smoke runs of every benchmark at toy sizes: each must reach its verdict line (figures not judged)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# script -> (its toy-size arguments, a pattern its verdict line must match)
RUNS = {
    "elastic": ("--size 64 --images 2 --repeats 1", r"FastElastic vs approximate: [\d.]+x"),
    "loader": ("--images 4 --size 64 --batch-size 2 --repeats 1", r"loader: [\d.]+ images/s per core"),
    "codec": ("--sizes 64 --masks 2 --repeats 1", r"decode \(text -> mask\)\s+[\d.]+\s+[\d.]+"),
    "metrics": ("--size 64 --images 2 --repeats 1", r"numpy path vs sklearn: [\d.]+x faster"),
    "predict": (
        "--images 2 --image-size 64 --input-size 32 --out-size 64 --folds 1 --repeats 1 --batch-size 2",
        r"peak RSS ratio 4N/N [\d.]+",
    ),
    "native": ("--size 200x150 --short-side 64 --classes 3", r"200x150 costs -?\d+ MB more than 20x15"),
    "train_gpu": (
        "--device cpu --arch Unet --encoder resnet18 --size 64 --batch-size 2 --workers 1 --steps 2 "
        "--repeats 1 --images 4",
        r"real / synthetic = [\d.]+ \(target >= 0.9\): not judged",
    ),
}


def _run(script: str, args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args.split()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_to_its_verdict(script: str) -> None:
    args, verdict = RUNS[script]
    run = _run(script, args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(verdict, run.stdout), run.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_gpu_benchmark_skips_without_cuda() -> None:
    run = _run("train_gpu", "")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("skipped: no CUDA device")
