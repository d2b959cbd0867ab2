"""pipeline.writer: one holder per folder (refused in one line, freed when the holder dies), and death
with the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.writer import LOCK_NAME, exclusive_writer

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    """`python -c code args...` with this repository importable, its stdout piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, stdout=subprocess.PIPE, text=True
    )


def _wait_for(condition: object, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its parent) still answers signal 0: read its state.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_a_second_writer_is_refused_in_one_line_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "unet" / "fold0"
    with exclusive_writer(folder):
        with pytest.raises(UserError) as refused, exclusive_writer(folder):
            pass
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{folder}: another process is writing this folder")
        assert f"pid {os.getpid()}" in message
        assert (folder / LOCK_NAME).is_file()
    assert not (folder / LOCK_NAME).exists()  # a clean exit leaves nothing in the output
    with exclusive_writer(folder):  # and the folder is free again
        pass


def test_a_killed_holder_frees_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "fold0"
    holder = _python(
        """
        import sys, time
        from pathlib import Path
        from pipeline.writer import exclusive_writer
        with exclusive_writer(Path(sys.argv[1])):
            print("holding", flush=True)
            time.sleep(60)
        """,
        str(folder),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match=f"pid {holder.pid} on "), exclusive_writer(folder):
            pass
        holder.kill()  # SIGKILL: no clean-up ran, the lock file stays...
        holder.wait()
        assert (folder / LOCK_NAME).exists()
        with exclusive_writer(folder):  # ...but the kernel released its lock
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_process_dies_with_its_parent(tmp_path: Path) -> None:
    # parent -> child; the child asks for the death signal and would write a file after 30 s. SIGKILL
    # the parent: the child must be gone within seconds, the file never written.
    survived = tmp_path / "survived"
    parent = _python(
        """
        import subprocess, sys, textwrap
        child = textwrap.dedent('''
            import pathlib, sys, time
            from pipeline.writer import die_with_parent
            die_with_parent()
            print("armed", flush=True)
            time.sleep(30)
            pathlib.Path(sys.argv[1]).write_text("orphan")
        ''')
        proc = subprocess.Popen([sys.executable, "-c", child, sys.argv[1]], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "armed"
        print(proc.pid, flush=True)
        proc.wait()
        """,
        str(survived),
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _wait_for(lambda: not _alive(child_pid), seconds=10)
    assert not survived.exists()


def test_death_signal_preexec_reaches_a_child_started_with_it(tmp_path: Path) -> None:
    survived = tmp_path / "survived"
    parent = _python(
        """
        import subprocess, sys
        from pipeline.writer import death_signal_preexec
        code = "import pathlib, sys, time; time.sleep(30); pathlib.Path(sys.argv[1]).write_text('orphan')"
        proc = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], preexec_fn=death_signal_preexec)
        print(proc.pid, flush=True)
        proc.wait()
        """,
        str(survived),
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _wait_for(lambda: not _alive(child_pid), seconds=10)
    assert not survived.exists()
