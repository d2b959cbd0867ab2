"""bench/crash.py end to end on a tiny config: killed at random and mid-write, the re-runs end where an
unkilled run does, byte for byte, with nothing left behind and never two writers of a fold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
@pytest.mark.slow
def test_every_kill_is_survived_with_identical_outputs(tmp_path: Path) -> None:
    # Two epochs, so a kill can land between epochs and the re-run resumes; one recipe, two folds.
    params = tiny_params({"train": {"epochs": 2}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    report_path = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "bench" / "crash.py"), "--params", str(tmp_path / "tiny.yaml")]
    command += ["--targets", "train", "oof", "predict", "--kills", "1", "--seed", "1", "--max-delay", "3"]
    command += ["--json", str(report_path), "--work", str(tmp_path / "work")]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["survived"] and report["kills"] == 3, report
    # "train@unet-0", or "predict (at its end)" for a kill as the next stage began
    assert {stage.split()[0].split("@")[0] for stage in report["kills_by_stage"]} == {
        "train",
        "oof",
        "predict",
    }
    assert report["outputs_compared"] >= 10  # masks, folds, models, oof, ensemble, predictions, submission...
    assert report["differing_outputs"] == report["leftovers"] == report["second_writers"] == []
    assert f"survived: {report['kills']} kills, outputs identical" in run.stdout
