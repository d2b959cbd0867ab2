"""Shared fixtures: a throw-away DVC project with this repository's stages, and commands run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
Run = Callable[[list[str], Path], subprocess.CompletedProcess[str]]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command with this venv's executables first on PATH; output captured as text."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def run() -> Run:
    """`run(args, cwd)`: a command in the test's environment (this venv's dvc and python)."""
    return _run


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """tmp_path/project: this repository's dvc.yaml, pipeline/ and stages/, `dvc init --no-scm` done.

    The test writes params.yaml and the data.
    """
    work = tmp_path / "project"
    work.mkdir()
    for name in ["dvc.yaml", "pipeline", "stages"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    assert _run(["dvc", "init", "--no-scm", "-q"], work).returncode == 0
    return work
