"""bench/gpu_check.py at toy size on the CPU: every step it would run on a GPU, known to work before one
is lent (the figures themselves are the GPU's to give)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, venv_env


@pytest.mark.bench
@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out)]
    command += ["--work", str(tmp_path / "work")]
    env = {**venv_env(), "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert {name: step["ok"] for name, step in steps.items()} == dict.fromkeys(
        ("repro", "bundle", "onnx", "train_loader"), True
    )
    assert 0 <= steps["repro"]["oof_miou"] <= 1 and steps["repro"]["stages_run"]["train"] == 2
    assert steps["bundle"]["identical_csv"] is True
    assert steps["onnx"]["agreement"]["argmax_agree"] >= 0.999
    assert steps["onnx"]["onnx"]["onnx_provider"] == "CPUExecutionProvider"
    assert steps["onnx"]["torch"]["images_per_s"] > 0 and steps["onnx"]["onnx"]["images_per_s"] > 0
    assert steps["train_loader"]["real_img_s"] > 0 and steps["train_loader"]["synthetic_img_s"] > 0


@pytest.mark.bench
def test_gpu_check_without_cuda_says_so_and_measures_nothing(tmp_path: Path) -> None:
    env = {**venv_env(), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "check.json")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("skipped: no CUDA device")
    assert not (tmp_path / "check.json").exists()
