"""Crash-safe file writes: write beside the target, fsync, rename, so readers see old or new, never half."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed.

    The temporary file sits in the same folder so the final `os.replace` is a same-filesystem rename,
    which POSIX makes atomic. The suffix is kept so libraries that infer a format from it still work.
    The file is fsynced before the rename and the folder after it: after a power cut or a node crash
    the target is the old file or the whole new one. Temporary files that killed writes of the same
    target left behind are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + target.suffix
    _remove_stale(target, suffix)
    tmp = _fresh(target, suffix, _create_file)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside `path`; on success it replaces `path` whole, on error it is removed.

    Two renames (old out of the way, new in) leave a window where `path` is absent but never one where
    it is half-filled; no file of an earlier run survives beside the new ones. Every file in the new
    folder is fsynced before the renames, and the parent folder after them.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target, ".tmp")
    tmp = _fresh(target, ".tmp", _create_dir)
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(folder, name))
            _fsync(Path(folder))
        if target.exists():
            # Old copies a killed swap left behind (a live writer's is gone within the swap, and if
            # removed early its rename simply recreates it).
            for stale in target.parent.glob(f".{target.name}.*.old"):
                shutil.rmtree(stale, ignore_errors=True)
            # A fresh name for the old copy (renaming onto an empty folder replaces it), so two writers
            # of the same output never move each other's folders.
            old = _fresh(target, ".old", _create_dir)
            target.rename(old)
            tmp.rename(target)
            _fsync(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
            _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh(target: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create (with `create`) and return an unused hidden path `.{name}.{pid}-{random}{suffix}` beside
    `target`; the pid tells a later writer whether the one that made it is still alive."""
    while True:
        candidate = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


def _remove_stale(target: Path, suffix: str) -> None:
    """Remove the temporary paths of `target` (files or folders) whose writer process is gone: what a
    killed write leaves. A live writer's (this process's, or another's) is left alone.

    Writes nest (a writer that is itself atomic, handed a temporary path): `..NAME.PID-RAND.tmp.csv.PID-
    RAND.tmp.csv` is a temporary file of a temporary file of NAME, and stale once all its writers are.
    """
    stamp = rf"\.(\d+)-[0-9a-f]{{8}}{re.escape(suffix)}"
    pattern = re.compile(rf"\.+{re.escape(target.name)}(?:{stamp})+")
    for stale in target.parent.glob(f".*{target.name}.*{suffix}"):
        if not pattern.fullmatch(stale.name):
            continue
        stamps = stale.name.lstrip(".")[len(target.name) :]
        if any(_alive(int(pid)) for pid in re.findall(stamp, stamps)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to the disk (a folder: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The ordinary modes, so the process umask applies as to any other output. tempfile's files are private
# (0o600 / 0o700), and widening them afterwards needs the umask, which can only be read by changing it
# for every thread of the process.
def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (NaN is written as null, which JSON can read)."""
    write_text(path, json.dumps(_nan_to_none(obj), indent=2) + "\n")


def _nan_to_none(obj: Any) -> Any:
    # JSON has no NaN; DVC and other readers choke on Python's `NaN` token, so absent classes become null.
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj
