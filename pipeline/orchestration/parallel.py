"""Reproduce the per-(model, fold) stages N at a time, one per device, by `dvc repro -s`; then the rest."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.errors import UserError
from pipeline.progress import EpochProgress, parse_epoch_line
from pipeline.writer import death_signal_preexec

# The stage groups (DVC `matrix` stages) worth running side by side: one (model, fold) each, and each
# model's refit.
PARALLEL_GROUPS = ("train", "oof", "refit")
# What DVC prints when another DVC process holds a lock this one needs: the stage never started,
# so running it again is safe. `--wait-for-lock` covers the repository lock; the per-output rwlock
# does not wait, hence the retry.
_ATTEMPT = "$ dvc repro --single-item"  # heads each attempt in a stage's log
_LOCK_ERROR = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")
# DVC exits 255 whatever its command returned; the command's own code is in its message.
_COMMAND_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")
_UP_TO_DATE = re.compile(r"Stage '[^']+' didn't change, skipping")
LOCK_RETRIES = 5
# After Ctrl-C: each stage gets SIGINT (what a terminal sends: DVC lets its command exit, then
# releases its locks), then SIGTERM, then SIGKILL, each signal given this many seconds to work.
STOP_SIGNALS = ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0))


@dataclass(frozen=True)
class Plan:
    """`before`: one `dvc repro` first; `jobs`: in parallel; the rest: a final plain `dvc repro`."""

    before: list[str]
    # Parallel stage -> the parallel stages it needs first (oof@m-k waits for train@m-k), in DAG order.
    jobs: dict[str, list[str]]


def stage_group(stage: str) -> str:
    """`train` for `train@unet-0` (a matrix stage's name), the name itself for a plain stage."""
    return stage.split("@", 1)[0]


def plan_stages(upstream: Mapping[str, Iterable[str]], groups: Iterable[str] = PARALLEL_GROUPS) -> Plan:
    """Split a DVC graph ({stage: stages it directly depends on}) into what runs before and in parallel.

    `before` are the stages the parallel ones depend on from outside the parallel set; reproducing them
    reproduces their own upstream too. Stages are ordered so that each comes after what it needs.
    """
    wanted = set(groups)
    order = _topological(upstream)
    parallel = [s for s in order if stage_group(s) in wanted]
    chosen = set(parallel)
    jobs = {s: [u for u in order if u in set(upstream.get(s, ())) & chosen] for s in parallel}
    outside = {u for s in parallel for u in upstream.get(s, ()) if u not in chosen}
    # A stage downstream of a parallel one cannot run before it: a graph that needs that is refused.
    for stage in outside:
        if _ancestors(upstream, stage) & chosen:
            raise UserError(f"dvc.yaml: stage '{stage}' sits between parallel stages; cannot run them apart")
    return Plan(before=[s for s in order if s in outside], jobs=jobs)


def select_jobs(plan: Plan, stale: set[str]) -> list[str]:
    """The parallel stages to run: the stale ones and every parallel stage downstream of one, in order.

    `dvc status` cannot see yet that oof@m-k will change once train@m-k has run; this closure can.
    """
    selected: set[str] = set()
    for stage, needs in plan.jobs.items():  # in DAG order, so `needs` are decided first
        if stage in stale or any(n in selected for n in needs):
            selected.add(stage)
    return [s for s in plan.jobs if s in selected]


def _topological(upstream: Mapping[str, Iterable[str]]) -> list[str]:
    """Stages with each after its dependencies; ties keep the mapping's order (dvc.yaml's)."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(stage: str, path: tuple[str, ...]) -> None:
        if stage in seen:
            return
        if stage in path:
            raise UserError(f"dvc.yaml: a cycle through stage '{stage}'")
        for dep in upstream.get(stage, ()):
            visit(dep, (*path, stage))
        seen.add(stage)
        done.append(stage)

    for stage in upstream:
        visit(stage, ())
    return done


def _ancestors(upstream: Mapping[str, Iterable[str]], stage: str) -> set[str]:
    found: set[str] = set()
    todo = list(upstream.get(stage, ()))
    while todo:
        dep = todo.pop()
        if dep not in found:
            found.add(dep)
            todo.extend(upstream.get(dep, ()))
    return found


def read_graph(root: Path) -> dict[str, list[str]]:
    """The project's stages and, for each, the stages whose outputs it depends on (DVC's own graph)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            return {stage.addressing: [dep.addressing for dep in graph.successors(stage)] for stage in graph}
    except DvcException as exc:
        raise UserError(f"{root / 'dvc.yaml'}: {exc}") from None


def stale_stages(root: Path, stages: list[str], env: Mapping[str, str], out: IO[str]) -> set[str]:
    """The stages among `stages` that `dvc status` reports changed (one DVC process for all of them).

    `dvc status` read-locks every output it checks: another DVC process writing one makes it wait and retry.
    """
    if not stages:
        return set()
    for attempt in range(1, LOCK_RETRIES + 2):
        status = subprocess.run(
            [*dvc_command(), "status", "--json", *stages],
            cwd=root,
            env=dict(env),
            capture_output=True,
            text=True,
        )
        if status.returncode == 0:
            return set(json.loads(status.stdout or "{}"))
        if not _LOCK_ERROR.search(status.stderr) or attempt > LOCK_RETRIES:
            break
        print(f"dvc status: another DVC process holds a lock; retry {attempt}", file=out, flush=True)
        time.sleep(_backoff(attempt))
    lines = status.stderr.strip().splitlines() or [f"exit code {status.returncode}"]
    raise UserError(f"{root}: dvc status failed: {lines[0]}")


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): doubling, capped."""
    return min(2.0**attempt, 30.0)


# --- devices -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """Where one stage runs: a GPU (its index) or a CPU slot; `env` pins the stage's process to it."""

    name: str
    env: dict[str, str]


def parse_devices(text: str, threads: int | None, cores: int) -> list[Device]:
    """`0,1,2,3` (GPU indices) or `cpu,cpu` (CPU slots): each runs one stage at a time.

    A stage sees only its GPU (CUDA_VISIBLE_DEVICES); a CPU slot hides every GPU. Each stage gets
    `threads` OpenMP and MKL threads, by default the machine's cores shared out between the devices.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--devices: give GPU indices (0,1,2,3) or CPU slots (cpu,cpu)")
    gpus = [n for n in names if n != "cpu"]
    for name in gpus:
        if not name.isdigit():
            raise UserError(f"--devices: {name!r} is neither a GPU index nor 'cpu'")
    if len(set(gpus)) != len(gpus):
        raise UserError(f"--devices: a GPU is listed twice in {text!r}; one stage per GPU at a time")
    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be at least 1, got {threads}")
    per_stage = threads if threads is not None else max(1, cores // len(names))
    devices = []
    for i, name in enumerate(names):
        visible = "" if name == "cpu" else name
        label = f"cpu{i}" if name == "cpu" else f"gpu{name}"
        # MKL's pool too: left at its default (every core) its threads spin against the other stages'
        # and a CPU stage ran 2.5x slower beside a second one (measured in bench/parallel.py's set-up).
        threads_env = {"OMP_NUM_THREADS": str(per_stage), "MKL_NUM_THREADS": str(per_stage)}
        devices.append(Device(label, {"CUDA_VISIBLE_DEVICES": visible, **threads_env}))
    return devices


# --- running -------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One parallel stage's state as the summary shows it."""

    stage: str
    needs: list[str]
    log: Path
    state: str = "waiting"  # waiting | running | done | up to date | failed | skipped | stopped
    slot: Device | None = None  # the device it runs (or ran) on
    returncode: int | None = None
    attempts: int = 0
    started: float = 0.0
    ended: float = 0.0
    progress: EpochProgress | None = None
    best: float | None = None
    note: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _read_to: int = field(default=0, repr=False)

    @property
    def device(self) -> str:
        return self.slot.name if self.slot else ""

    def summary(self, now: float) -> str:
        """One line: stage, device, state, time, epoch and val mIoU when training."""
        elapsed = _duration((self.ended or now) - self.started) if self.started else ""
        parts = [f"{self.stage:<24}", f"{self.device:<6}", f"{self.state:<10}", f"{elapsed:>7}"]
        if self.progress is not None:
            parts.append(f"epoch {self.progress.epoch}/{self.progress.epochs}")
        if self.best is not None:
            parts.append(f"best val mIoU {self.best:.4f}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts).rstrip()


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP reached the runner."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_parallel(
    root: Path,
    devices: list[Device],
    log_dir: Path,
    *,
    out: IO[str] = sys.stdout,
    poll_s: float = 0.5,
) -> int:
    """Reproduce the project at `root` with its parallel stages spread over `devices`; the exit code.

    1. `dvc repro` of the stages the parallel ones need (data, masks, split), as a plain repro would.
    2. Every stale train/oof stage by `dvc repro --single-item <stage>`, one per free device, a stage
       starting once those it needs have succeeded. DVC itself runs, locks and commits each one.
    3. If all succeeded, a plain `dvc repro` for the rest (ensemble, predict, evaluate...).
    A failed stage stops nothing already running; its dependents are skipped; the exit code is 1.
    Ctrl-C, SIGTERM or SIGHUP stops every running stage (SIGINT, then SIGTERM, then SIGKILL to its process
    group); a runner killed outright takes its stages with it (their death signal).
    """
    env = _child_env()
    plan = plan_stages(read_graph(root))
    signals = _Signals()
    jobs: list[Job] = []
    try:
        if plan.before:
            print(f"== dvc repro {' '.join(plan.before)}", file=out, flush=True)
            code = _run_foreground([*dvc_command(), "repro", *plan.before], root, env)
            if code != 0:
                print(f"error: dvc repro of {', '.join(plan.before)} failed (exit code {code})", file=out)
                return code
        todo = select_jobs(plan, stale_stages(root, list(plan.jobs), env, out))
        log_dir.mkdir(parents=True, exist_ok=True)
        jobs = [Job(s, [n for n in plan.jobs[s] if n in todo], log_dir / f"{s}.log") for s in todo]
        skipped = len(plan.jobs) - len(jobs)
        print(
            f"== {len(jobs)} stages on {len(devices)} devices ({skipped} up to date); logs in {log_dir}",
            file=out,
            flush=True,
        )
        _Scheduler(root, devices, env, signals).run(jobs, out, poll_s)
        failed = [j for j in jobs if j.state in ("failed", "skipped")]
        if failed:
            _report_failures(failed, out)
            return 1
        print("== dvc repro", file=out, flush=True)
        return _run_foreground([*dvc_command(), "repro"], root, env)
    except Interrupted as exc:
        signals.ignore()
        running = [j for j in jobs if j.proc is not None and j.proc.poll() is None]
        print(f"\n{exc}: stopping {len(running)} running stages", file=out, flush=True)
        _stop(running)
        for job in running:
            job.state, job.ended = "stopped", time.monotonic()
        print(
            "stopped; run the same command again to finish (finished stages are kept, "
            "interrupted training resumes from its last epoch)",
            file=out,
        )
        return 128 + exc.signum
    finally:
        signals.restore()


class _Scheduler:
    """Starts each waiting job on the first free device once what it needs has succeeded."""

    def __init__(self, root: Path, devices: list[Device], env: dict[str, str], signals: _Signals) -> None:
        self.root, self.devices, self.env, self.signals = root, devices, env, signals
        self.free = list(devices)

    def run(self, jobs: list[Job], out: IO[str], poll_s: float) -> None:
        display = _Display(out)
        by_name = {j.stage: j for j in jobs}
        while any(j.state in ("waiting", "running") for j in jobs):
            for job in jobs:
                if job.state == "running":
                    self._poll(job)
            for job in jobs:
                if job.state != "waiting":
                    continue
                needs = [by_name[n] for n in job.needs]
                blocked = [n.stage for n in needs if n.state in ("failed", "skipped", "stopped")]
                if blocked:
                    job.state, job.note = "skipped", f"needs {blocked[0]}"
                elif all(n.state in ("done", "up to date") for n in needs) and self.free:
                    self._start(job, self.free.pop(0))
            display.show(jobs, time.monotonic())
            time.sleep(poll_s)
        display.show(jobs, time.monotonic(), final=True)

    def _start(self, job: Job, device: Device) -> None:
        job.attempts += 1
        job.slot, job.state = device, "running"
        job.started = job.started or time.monotonic()
        with open(job.log, "w" if job.attempts == 1 else "a") as log:
            log.write(f"{_ATTEMPT} {job.stage}  # {device.name}, attempt {job.attempts}\n")
            log.flush()
            # A new session: the stage's processes form their own group, which Ctrl-C in the runner's
            # terminal does not reach; the runner signals that group itself, in order (see _stop).
            # Signals wait until the child is recorded in `job.proc`, so an interrupt cannot orphan it.
            with self.signals.deferred():
                job.proc = subprocess.Popen(
                    [*dvc_command(), "--wait-for-lock", "repro", "--single-item", job.stage],
                    cwd=self.root,
                    env={**self.env, **device.env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Killed with the runner (SIGKILL gives it no chance to stop them): the stage's
                    # dvc gets SIGTERM, and its train stage dies with it in turn.
                    preexec_fn=death_signal_preexec,
                )

    def _poll(self, job: Job) -> None:
        assert job.proc is not None and job.slot is not None
        _read_progress(job)
        code = job.proc.poll()
        if code is None:
            return
        text = job.log.read_text(errors="replace")
        attempt = text[text.rfind(_ATTEMPT) :]
        if code != 0 and _LOCK_ERROR.search(attempt) and job.attempts <= LOCK_RETRIES:
            # Another DVC process held a lock: wait a little (longer each time) and start it again.
            time.sleep(_backoff(job.attempts))
            self._start(job, job.slot)
            job.note = f"retry {job.attempts - 1} after a DVC lock"
            return
        command_exit = _COMMAND_EXIT.search(attempt)
        job.returncode = int(command_exit[1]) if code != 0 and command_exit else code
        job.ended, job.proc = time.monotonic(), None
        if code != 0:
            job.state, job.note = "failed", f"exit code {job.returncode}, log {job.log}"
        elif _UP_TO_DATE.search(attempt):
            job.state = "up to date"
        else:
            job.state = "done"
        self.free.append(job.slot)
        self.free.sort(key=self.devices.index)  # the lowest free device first


def _read_progress(job: Job) -> None:
    """The latest epoch and best val mIoU from the lines the stage has logged since the last look."""
    try:
        with open(job.log, "rb") as log:
            log.seek(job._read_to)
            chunk = log.read()
    except FileNotFoundError:
        return
    end = chunk.rfind(b"\n")
    if end < 0:
        return
    job._read_to += end + 1
    for line in chunk[:end].decode(errors="replace").replace("\r", "\n").splitlines():
        progress = parse_epoch_line(line)
        if progress is None:
            continue
        job.progress = progress
        if progress.val_miou is not None and (job.best is None or progress.val_miou > job.best):
            job.best = progress.val_miou


class _Display:
    """The summary: redrawn in place on a terminal; elsewhere (CI, a log file) a line per change."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: dict[str, tuple[str, object, object]] = {}

    def show(self, jobs: list[Job], now: float, final: bool = False) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")  # back to the block's first line
            for job in jobs:
                self.out.write("\x1b[2K" + job.summary(now) + "\n")
            self.drawn = len(jobs)
            self.out.flush()
            return
        for job in jobs:
            key = (job.state, job.progress, job.attempts)
            if self.last.get(job.stage) != key and (job.state != "waiting" or final):
                self.last[job.stage] = key
                print(job.summary(now), file=self.out, flush=True)


def _stop(jobs: list[Job]) -> None:
    """SIGINT each job's process group, then SIGTERM, then SIGKILL, until every one has exited."""
    for sig, grace in STOP_SIGNALS:
        alive = [j for j in jobs if j.proc is not None and j.proc.poll() is None]
        if not alive:
            return
        for job in alive:
            assert job.proc is not None
            _signal_group(job.proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(j.proc.poll() is None for j in alive if j.proc):
            time.sleep(0.2)
    # The DVC process is gone; anything it started in its group still running is killed with the group.
    for job in jobs:
        if job.proc is not None:
            _signal_group(job.proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _report_failures(jobs: list[Job], out: IO[str]) -> None:
    print("\nfailed:", file=out)
    for job in jobs:
        if job.state == "failed":
            print(f"  {job.stage}: exit code {job.returncode}; log {job.log}", file=out)
        else:
            print(f"  {job.stage}: not run ({job.note})", file=out)
    print("the rest of the pipeline was not run; fix the failures and run the same command again", file=out)


def _run_foreground(args: list[str], root: Path, env: dict[str, str]) -> int:
    """A DVC command in the runner's own process group (Ctrl-C reaches it as it would in a shell)."""
    proc = subprocess.Popen(args, cwd=root, env=env, preexec_fn=death_signal_preexec)
    try:
        return proc.wait()
    except Interrupted:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


class _Signals:
    """SIGINT/SIGTERM/SIGHUP handling of the runner: raise Interrupted, except inside `deferred()`, which
    raises it at its end (a child being started is then recorded first and cannot be orphaned)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        # SIGHUP (the terminal closed) as SIGTERM: stop the stages rather than leave them running unseen.
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self.previous = {s: signal.signal(s, self._handle) for s in handled}

    def _handle(self, signum: int, frame: object) -> None:
        if self.depth:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            raise Interrupted(self.pending)

    def ignore(self) -> None:
        """From now on (the clean-up), ignore both: a second Ctrl-C must not cut it short."""
        for signum in self.previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def dvc_command() -> list[str]:
    """DVC of the runner's own environment, whatever PATH says."""
    return [sys.executable, "-m", "dvc"]


def _child_env() -> dict[str, str]:
    # The stage commands say `python stages/...`: make that this environment's python.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
