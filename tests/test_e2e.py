"""End to end: the real dvc.yaml and stage scripts, run by `dvc repro` on a tiny config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Run

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "demo": {"n_train": 18, "n_test": 5, "image_size": 64, "max_objects": 3},
    "augment": {"size": 64},
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"epochs": 1, "batch_size": 4, "num_workers": 0, "folds": [0, 1, 2]},
    "split": {"n_splits": 3},
    "predict": {"batch_size": 4, "num_workers": 0, "tta": "flips"},
    "submission": {"size": 32},
}


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    return params


@pytest.mark.slow
def test_dvc_repro_runs_every_stage(dvc_project: Path, run: Run) -> None:
    work = dvc_project
    (work / "params.yaml").write_text(yaml.safe_dump(_tiny_params()))

    repro = run(["dvc", "repro"], work)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]

    for fold in (0, 1, 2):
        assert (work / f"models/fold{fold}/best.pt").is_file()
        metrics = json.loads((work / f"metrics/fold{fold}.json").read_text())
        assert 0.0 <= metrics["miou"] <= 1.0
    cv = json.loads((work / "metrics/cv.json").read_text())
    assert cv["n_images"] == 18
    assert 0.0 <= cv["oof_miou"] <= 1.0
    board = json.loads((work / "metrics/leaderboard.json").read_text())
    assert 0.0 <= board["miou"] <= 1.0
    assert list((work / "plots/worst").glob("*.png"))

    submission = work / "submissions/submission.csv"
    valid = run(
        [sys.executable, "-m", "pipeline", "validate", str(submission), "--test", "data/demo/test.json"], work
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr
    # rle format: one row per test image and non-background class, plus the header.
    assert len(submission.read_text().splitlines()) == 1 + 5 * 10

    again = run(["dvc", "repro"], work)
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout
