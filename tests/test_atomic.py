"""Tests for pipeline.atomic: outputs appear whole or not at all, and nothing is left beside them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import atomic
from pipeline.atomic import atomic_dir, atomic_path, write_json

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


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


def test_writes_fsync_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace, rename = os.fsync, os.replace, Path.rename

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", str(dst)))
        replace(src, dst)

    def recording_rename(self: Path, dst: str | os.PathLike[str]) -> Path:
        events.append(("rename", str(dst)))
        return rename(self, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(Path, "rename", recording_rename)
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    (written,) = [path for kind, path in events if kind == "fsync" and path != str(tmp_path)]
    assert Path(written).name.startswith(".a.json.") and Path(written).parent == tmp_path
    assert events == [("fsync", written), ("rename", str(target)), ("fsync", str(tmp_path))]

    events.clear()
    with atomic_dir(tmp_path / "oof") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "p.png").write_text("1")
    synced = [Path(path) for kind, path in events if kind == "fsync"]
    renamed = events.index(("rename", str(tmp_path / "oof")))
    assert any(p.name == "p.png" for p in synced[:renamed])  # every file before the rename
    assert events[-1] == ("fsync", str(tmp_path))  # the new name itself after it


def test_the_next_write_removes_what_a_killed_write_left_and_spares_a_live_one(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getppid()
    killed_file = tmp_path / f".last.pt.{dead}-0123abcd.tmp.pt"
    killed_file.write_text("half")
    live_file = tmp_path / f".last.pt.{alive}-4567cdef.tmp.pt"
    live_file.write_text("in flight")
    other_output = tmp_path / f".best.pt.{dead}-89abcdef.tmp.pt"
    other_output.write_text("another output's")
    # A killed write inside a killed write (an atomic writer handed a temporary path), and one whose
    # outer writer still lives.
    nested = tmp_path / f"..last.pt.{dead}-0123abcd.tmp.pt.{dead}-4567cdef.tmp.pt"
    nested.write_text("half of a half")
    nested_live = tmp_path / f"..last.pt.{alive}-0123abcd.tmp.pt.{dead}-4567cdef.tmp.pt"
    nested_live.write_text("in flight")
    killed_dir = tmp_path / f".oof.{dead}-0123abcd.tmp"
    killed_dir.mkdir()
    (killed_dir / "0.npz").write_text("half")

    with atomic_path(tmp_path / "last.pt") as tmp:
        tmp.write_text("whole")
    with atomic_dir(tmp_path / "oof") as staging:
        (staging / "0.npz").write_text("whole")

    assert not killed_file.exists() and not killed_dir.exists() and not nested.exists()
    assert live_file.exists() and other_output.exists()  # a live writer's; another output's
    assert nested_live.exists()
    assert (tmp_path / "last.pt").read_text() == "whole"


def test_temporary_names_carry_the_writer_pid(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.txt") as tmp:
        assert tmp.name.startswith(f".a.txt.{os.getpid()}-") and tmp.name.endswith(".tmp.txt")
        tmp.write_text("x")
    assert atomic._alive(os.getpid()) and not atomic._alive(_dead_pid())


@pytest.mark.slow
def test_dvc_leaves_what_a_killed_write_left_out_of_an_output(tmp_path: Path) -> None:
    # A persist: true model folder keeps a killed write's temporary file until the next write of that
    # file; the repository's .dvcignore keeps it (and the writer lock) out of the hash DVC records.
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / ".dvcignore", project / ".dvcignore")
    write = (
        "import pathlib; d = pathlib.Path('out'); d.mkdir(exist_ok=True); (d / 'best.pt').write_text('w'); "
        "(d / '.last.pt.4242-0123abcd.tmp.pt').write_text('half'); (d / '.writer.lock').write_text('pid')"
    )
    (project / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"s": {"cmd": f'python -c "{write}"', "outs": [{"out": {"persist": True}}]}}}
        )
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for args in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True)
        assert done.returncode == 0, done.stderr
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    (out,) = lock["stages"]["s"]["outs"]
    assert out["nfiles"] == 1  # best.pt alone
