"""No network at run time: DVC analytics off, albumentations' update check off, no weight downloads."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Any connection attempt is recorded and refused; the script then prints what was attempted.
PROBE = """
import socket
attempts = []
def refuse(self, address, *args):
    attempts.append(address)
    raise OSError("network disabled by test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
import pipeline.training.augment, pipeline.training.train, pipeline.inference.infer
from pipeline.config import ModelParams
from pipeline.models.factory import build_model
build_model(ModelParams(arch="Unet", encoder="resnet18", encoder_weights=None), n_classes=3)
print("attempts:", attempts)
"""


def test_dvc_analytics_off_in_committed_config() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"


def test_pipeline_imports_and_model_build_touch_no_network() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attempts: []" in result.stdout
