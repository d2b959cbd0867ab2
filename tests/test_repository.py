"""The repository itself: no tracked file names a path of the machine it was written on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An absolute path under a machine's own folders; a path inside a project (DVC's lock file) is not one.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|root|tmp|Users|mnt)/[\w.-]")


def test_no_tracked_file_names_a_machine_path() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in names.splitlines():
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".jpg", ".npz", ".pt"}:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_pattern_finds_machine_paths_and_spares_project_paths() -> None:
    # Built from parts, so that this file holds no machine path itself.
    work, tmp = "/" + "work/", "/" + "tmp/"
    assert MACHINE_PATH.search(f'"root": "{work}main/data/demo"')
    assert MACHINE_PATH.search(f"python bench/x.py --out {tmp}ab/run")
    assert not MACHINE_PATH.search(f"per-path locks (`.dvc{tmp}rwlock`)")
    assert not MACHINE_PATH.search("data/demo/train.json")
