"""Tests for pipeline.atomic: outputs appear whole or not at all, and nothing is left beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.atomic import atomic_dir, atomic_path, write_json


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".csv"
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["a.csv"]  # no temporary file left


def test_atomic_path_output_has_ordinary_permissions(tmp_path: Path) -> None:
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == reference.stat().st_mode


def test_atomic_dir_output_has_ordinary_permissions(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_atomic_dir_replaces_the_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "oof"
    with atomic_dir(target) as staging:
        (staging / "old.png").write_text("1")
        (staging / "kept.png").write_text("1")
    with atomic_dir(target) as staging:
        (staging / "kept.png").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["kept.png"]  # no file of the earlier run survives
    assert (target / "kept.png").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["oof"]  # neither staging nor old copy left


def test_atomic_dir_leaves_the_old_folder_on_error(tmp_path: Path) -> None:
    target = tmp_path / "models"
    with atomic_dir(target) as staging:
        (staging / "best.pt").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "best.pt").write_text("partial")
        raise RuntimeError("killed")
    assert (target / "best.pt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_interleaved_writers_of_one_folder_both_finish(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as first:
        (first / "who").write_text("first")
        with atomic_dir(target) as second:
            (second / "who").write_text("second")
    assert (target / "who").read_text() == "first"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_removes_old_copies_a_killed_swap_left(tmp_path: Path) -> None:
    target = tmp_path / "oof"
    target.mkdir()
    (tmp_path / ".oof.1234abcd.old").mkdir()  # a swap killed between its two renames
    (tmp_path / ".oof.1234abcd.old" / "stale.png").write_text("old")
    with atomic_dir(target) as staging:
        (staging / "new.png").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["oof"]


def test_write_json_writes_nan_as_null(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"miou": float("nan"), "iou": [0.5, float("nan")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"miou": None, "iou": [0.5, None]}
