"""One writer per output: an exclusive folder lock the kernel frees at death, and death with the parent."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError

# Inside the folder it guards; `.dvcignore` keeps it out of the output DVC hashes, and a clean exit
# removes it.
LOCK_NAME = ".writer.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextlib.contextmanager
def exclusive_writer(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the body; a second holder, in this
    or any process, is refused with one line naming the folder and the holder's pid and host.

    The lock is a `flock` on `folder/.writer.lock`: the kernel releases it when the holder's process
    dies however it dies (SIGKILL, a closed terminal), so a kill never leaves a stale lock, and an
    orphaned writer that still runs keeps its folder to itself. The file is opened close-on-exec, so
    only this process (and children it forks without exec, such as DataLoader workers) holds it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{folder}: another process is writing this folder ({holder}); "
                "stop it or let it finish, then run again"
            ) from None
        # A holder that finished between our open and our lock removed the file we opened: lock the
        # file that is there now instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
        path.unlink(missing_ok=True)  # before the release: the next holder then opens a fresh file
    finally:
        os.close(fd)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `sig` when its parent dies (Linux; elsewhere nothing).

    A stage killed with its `dvc` (or a DDP worker with its launcher) then stops instead of writing
    on as an orphan beside the re-run that starts next. If the parent died before the call (this
    process was re-parented in between), the signal comes now.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def death_signal_preexec(sig: int = signal.SIGTERM) -> None:
    """`preexec_fn` for subprocess.Popen: the child gets `sig` when the process that started it dies
    (the death signal survives exec)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
