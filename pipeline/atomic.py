"""Crash-safe file writes: write beside the target, then rename, so readers see old or new, never half."""

from __future__ import annotations

import contextlib
import json
import os
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
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(target, ".tmp" + target.suffix, _create_file)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside `path`; on success it replaces `path` whole, on error it is removed.

    Two renames (old out of the way, new in) leave a window where `path` is absent but never one where
    it is half-filled; no file of an earlier run survives beside the new ones.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(target, ".tmp", _create_dir)
    try:
        yield tmp
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
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh(target: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create (with `create`) and return an unused hidden path `.{name}.{random}{suffix}` beside `target`."""
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


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
