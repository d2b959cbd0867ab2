"""bench/ablation.py end to end: variants of a tiny recipe, one epoch each on a tiny generated set, scored."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


def _params_file(tmp_path: Path, **augment: float) -> Path:
    """The tiny params (one model recipe) as a file; the benchmark sets data.*, the fold, epochs and
    submission.size."""
    params_file = tmp_path / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params({"augment": augment})))
    return params_file


def _bench(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run bench/SCRIPT.py ARGS from the repository root; it must succeed."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.bench
@pytest.mark.slow
def test_ablation_trains_each_variant_and_reuses_the_baseline_for_predict_only_ones(
    tiny_demo: Path, tmp_path: Path
) -> None:
    # vflip 0, so that the tta-hflip variant below is not what `auto` picks already
    data, params_file = tiny_demo, _params_file(tmp_path, vflip=0.0)
    out = tmp_path / "ablation.json"

    args = [str(data), "--params", str(params_file), "--epochs", "1", "--n-splits", "3", "--json", str(out)]
    args += ["--variant", "tta-hflip", "predict.tta=hflip"]
    # A variant whose train stage fails is reported as such; the others still run.
    args += ["--variant", "fails", "train.boundary_w0=5.0", "train.losses={dice: 1.0}"]
    args += ["--workdir", str(tmp_path / "work")]
    run = _bench("ablation", args)

    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["baseline", "tta-hflip", "fails"]
    assert variants.pop("fails")["failed"].startswith("dvc repro -s train@unet-0 failed")
    assert re.search(r"^fails\s+FAILED: dvc repro -s train@unet-0 failed", run.stdout, re.M), run.stdout
    assert all(0.0 <= v["miou"] <= 1.0 for v in variants.values())
    assert [v["reused_baseline"] for v in variants.values()] == [False, True]
    written = yaml.safe_load((tmp_path / "work/tta-hflip/params.yaml").read_text())
    assert written["predict"]["tta"] == "hflip" and written["train"]["epochs"] == 1
    # The predict-only variant predicted with the baseline's fold model: nothing trained, but its
    # out-of-fold probabilities were predicted again with the new TTA.
    log = (tmp_path / "work/tta-hflip/dvc.log").read_text()
    assert "train loss" not in log
    assert re.search(r"Running stage 'oof@unet-0'", log), log[-3000:]
    # (reused) for the minutes, OOF (the held-out fold), test mIoU, the change from the baseline
    row = r"^tta-hflip\s+\(reused\)\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+"
    assert re.search(row, run.stdout, re.M), run.stdout
    assert all(0.0 <= v["oof_miou"] <= 1.0 for v in variants.values())
