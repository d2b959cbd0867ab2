"""Crash test: kill `dvc repro` at random moments and mid-write, re-run, and compare with an unkilled run.

For a params file, two DVC workspaces of this repository's stages run the whole pipeline side by side,
one torch thread per process (CPU training is then bit for bit reproducible):
  - the reference: one uninterrupted `dvc repro`;
  - the crashed one: `dvc repro` started again and again, each time SIGKILLed with its whole process
    group (dvc and the stage it runs, as a power cut or an OOM killer would) inside each --targets stage
    in turn (--kills times each): after a random delay into the stage (up to --max-delay seconds) or
    the moment a temporary file of an atomic write appears (mid-checkpoint, mid-OOF, mid-submission
    write); then one last `dvc repro` runs to the end.
Throughout, every process is watched: two training processes of one (model, fold) at once count as a
second writer. At the end every output DVC records must have the reference's bytes (dvc.lock md5s), no
temporary file or writer lock may be left in the workspace, and no run may have failed other than by
its kill. Printed: the kills per stage they landed in, and the verdict.

  python bench/crash.py --params configs/demo.yaml                  # the demo config, 2 kills a stage
  python bench/crash.py --params tiny.yaml --kills 1 --max-delay 5  # what the slow test runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import write_json
from pipeline.config import complete
from recipe import make_workspace, write_params

REPO = Path(__file__).resolve().parents[1]
# What an interrupted write or run leaves (pipeline/atomic.py's temporary names, pipeline/writer.py's lock).
LEFTOVER = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.(tmp|old)(\..*)?$|^\.writer\.lock$")
RUNNING = re.compile(r"Running stage '([^']+)'")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, required=True, help="params file (an overlay is completed)")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["masks", "train", "oof", "ensemble", "predict", "evaluate"],
        help="stages (names or name prefixes) to kill in, in pipeline order",
    )
    parser.add_argument("--kills", type=int, default=2, help="kills per target stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument(
        "--max-delay", type=float, default=20.0, help="longest wait (s) into a target stage for its kill"
    )
    parser.add_argument("--work", type=Path, help="keep both workspaces here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    params = complete(yaml.safe_load(args.params.read_text()) or {})
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        report = crash_test(params, args.targets, args.kills, args.seed, args.max_delay, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
            report = crash_test(params, args.targets, args.kills, args.seed, args.max_delay, Path(tmp))
    print_report(report)
    if args.json is not None:
        write_json(args.json, report)
    if not report["survived"]:
        raise SystemExit(1)


def crash_test(
    params: dict[str, Any], targets: list[str], kills: int, seed: int, max_delay: float, work: Path
) -> dict[str, Any]:
    """Run the reference and the crashed workspace side by side; the report (see the module docstring)."""
    reference, crashed = workspace(work / "reference", params), workspace(work / "crashed", params)
    start = time.monotonic()
    with (work / "reference.log").open("w") as log:
        unkilled = subprocess.Popen(_repro(), cwd=reference, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    rng = random.Random(seed)
    by_stage: Counter[str] = Counter()
    missed: list[str] = []
    writers: list[str] = []
    failures: list[str] = []
    attempt = 0
    for target in targets:
        for _ in range(kills):
            mode = "mid-write" if attempt % 2 else "random"  # alternating over all the kills
            attempt += 1
            if not any(stage.startswith(target) for stage in _stale(crashed)):
                print(f"{target}: up to date, nothing to kill", flush=True)
                missed.append(target)
                break
            delay = rng.uniform(0.5, max_delay)
            stage, code, log_text = _run_until_killed(crashed, target, mode, delay, writers)
            if stage is None:
                print(f"{target} ({mode}): the run ended (exit code {code}) before the kill", flush=True)
                missed.append(target)
                if code != 0:
                    failures.append(f"{target}: the run failed by itself ({code}): {log_text[-500:]}")
                break
            by_stage[stage] += 1
            print(f"kill {sum(by_stage.values())} ({mode}, aimed at {target}): in {stage}", flush=True)
    final = subprocess.run(_repro(), cwd=crashed, env=_env(), capture_output=True, text=True)
    if final.returncode != 0:
        failures.append(f"the last run failed: {final.stdout[-1500:]}{final.stderr[-1500:]}")
    if unkilled.wait() != 0:
        raise SystemExit(f"the reference run failed: see {work / 'reference.log'}")
    duration = time.monotonic() - start
    print(f"both done in {duration:.0f} s", flush=True)

    ours, theirs = _outputs(crashed), _outputs(reference)
    differing = sorted(path for path in theirs if ours.get(path) != theirs[path])
    leftovers = sorted(str(p.relative_to(crashed)) for p in crashed.rglob("*") if LEFTOVER.match(p.name))
    survived = not (differing or leftovers or writers or failures)
    return {
        "kills": sum(by_stage.values()),
        "kills_by_stage": dict(sorted(by_stage.items())),
        "targets_not_reached": missed,
        "outputs_compared": len(theirs),
        "differing_outputs": differing,
        "leftovers": leftovers,
        "second_writers": writers,
        "failures": failures,
        "survived": survived,
        "seconds": round(duration, 1),
    }


def workspace(path: Path, params: dict[str, Any]) -> Path:
    """A DVC project (no git) at `path` holding this repository's stages and `params`, one process per
    fold (runtime.nproc 1: the second-writer watch counts training processes)."""
    path.mkdir(parents=True, exist_ok=True)
    make_workspace(path)
    write_params(path, {**params, "runtime": {**params["runtime"], "nproc": 1, "nnodes": 1}})
    return path


def _run_until_killed(
    work: Path, target: str, mode: str, delay: float, writers: list[str]
) -> tuple[str | None, int | None, str]:
    """Start `dvc repro` in `work`; once a stage named `target` (or starting with it) runs, SIGKILL the
    whole process group after `delay` seconds ("random") or the moment a temporary file of an atomic
    write appears ("mid-write"), or at the latest when the next stage starts (the target's outputs
    written, DVC's record of them not yet). Returns (the stage it was in, None, log) after a kill, or
    (None, exit code, log) if the run ended first. Meanwhile, any two live training processes of one
    model folder are recorded in `writers`."""
    log_path = work / "crash.log"
    folders = _output_folders(work)
    stages: list[str] = []
    pending = ""  # the log's last, unfinished line: a stage name may arrive in two reads
    with log_path.open("w") as log, log_path.open() as reader:
        proc = subprocess.Popen(
            _repro(), cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = None
        while proc.poll() is None:
            _check_writers(work, writers)
            finished, _, pending = (pending + reader.read()).rpartition("\n")
            stages += RUNNING.findall(finished)
            if deadline is None and stages and stages[-1].startswith(target):
                deadline, aimed = time.monotonic() + delay, stages[-1]
                before = {p.name for p in _written(work, folders)}
            if deadline is not None:
                due = time.monotonic() >= deadline or stages[-1] != aimed
                if mode == "mid-write" and not due:
                    fresh = (p for p in _written(work, folders) if p.name not in before)
                    due = any(LEFTOVER.match(p.name) and ".tmp" in p.name for p in fresh)
                if due:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    _wait_for_orphans(work)
                    text = log_path.read_text()
                    return aimed if stages[-1] == aimed else f"{aimed} (at its end)", None, text
            time.sleep(0.01)
    return None, proc.returncode, log_path.read_text()


def _stale(work: Path) -> set[str]:
    """The stages `dvc status` finds out of date in `work`."""
    status = subprocess.run(
        _dvc("status", "--json"), cwd=work, env=_env(), capture_output=True, text=True, check=True
    )
    return set(json.loads(status.stdout or "{}"))


def _output_folders(work: Path) -> dict[str, bool]:
    """Where the stages of `work/dvc.yaml` write, each with whether to search it recursively: a folder
    output, and a templated one up to its first `${...}` (`models/${item.model}/fold${item.fold}` ->
    `models`), whole; a file output's folder only beside it (its temporary file sits there)."""
    folders: dict[str, bool] = {}
    for stage in yaml.safe_load((work / "dvc.yaml").read_text())["stages"].values():
        stage = stage.get("do", stage)
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                fixed = path.split("${")[0]
                if fixed != path:
                    folder, recursive = fixed.rpartition("/")[0] or ".", True
                elif (work / path).is_dir():
                    folder, recursive = path, True
                else:
                    folder, recursive = str(Path(path).parent), False
                folders[folder] = folders.get(folder, False) or recursive
    return folders


def _written(work: Path, folders: dict[str, bool]) -> set[Path]:
    """The hidden files (temporaries, locks) where the stages write, none of DVC's own."""
    found = {
        p
        for name, recursive in folders.items()
        if (work / name).is_dir()
        for p in ((work / name).rglob(".*") if recursive else (work / name).glob(".*"))
    }
    return {p for p in found if ".dvc" not in p.relative_to(work).parts}


def _check_writers(work: Path, writers: list[str]) -> None:
    """Record a model folder that two training processes in `work` write at once. The harness trains
    with runtime.nproc 1, so a fold is one process; a child it forks (a DataLoader worker, or a
    subprocess between fork and exec) carries the same command line and is not another writer."""
    folders: dict[str, dict[int, int]] = {}  # model folder -> {pid: parent pid}
    for pid, parent, command in _processes(work):
        match = re.search(r"stages/train\.py .*--model-dir (\S+)", command)
        if match:
            folders.setdefault(match.group(1), {})[pid] = parent
    for folder, pids in folders.items():
        roots = sorted(pid for pid, parent in pids.items() if parent not in pids)
        if len(roots) > 1:
            writers.append(f"{folder}: {len(roots)} training processes at once (pids {roots})")


def _processes(work: Path) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of the live (not zombie) processes whose working directory is
    `work`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            if os.readlink(entry / "cwd") != str(work) or "\nState:\tZ" in status:
                continue
            parent = int(re.search(r"\nPPid:\s*(\d+)", status).group(1))
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, AttributeError):  # gone meanwhile, or not ours to read
            continue
        found.append((int(entry.name), parent, command.strip()))
    return found


def _wait_for_orphans(work: Path, seconds: float = 30.0) -> None:
    """Wait until no process runs in `work` any more: a stage that outlived its killed dvc is an orphan
    writer, which the death signal must stop within seconds."""
    deadline = time.monotonic() + seconds
    while left := _processes(work):
        if time.monotonic() > deadline:
            raise SystemExit(f"processes outlived the kill of their dvc by {seconds:.0f} s: {left}")
        time.sleep(0.05)


def _outputs(work: Path) -> dict[str, str]:
    """{output path: md5} of every output dvc.lock records (metrics and plots are outputs there too)."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def _dvc(*args: str) -> list[str]:
    """This environment's dvc with `args`, whatever PATH says."""
    return [sys.executable, "-m", "dvc", *args]


def _repro() -> list[str]:
    return _dvc("repro")


def _env() -> dict[str, str]:
    """One torch thread per process (CPU training is then bit for bit reproducible); this venv first."""
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        NO_ALBUMENTATIONS_UPDATE="1",
        DVC_NO_ANALYTICS="1",
    )


def print_report(report: dict[str, Any]) -> None:
    print(f"kills: {report['kills']} ({', '.join(f'{s} {n}' for s, n in report['kills_by_stage'].items())})")
    print(f"outputs compared with the unkilled run: {report['outputs_compared']}")
    for key in ("differing_outputs", "leftovers", "second_writers", "failures"):
        for item in report[key]:
            print(f"{key.replace('_', ' ')}: {item}")
    verdict = "survived" if report["survived"] else "NOT survived"
    outputs = "differ" if report["differing_outputs"] else "identical"
    print(f"{verdict}: {report['kills']} kills, outputs {outputs}")


if __name__ == "__main__":
    main()
