"""`python -m pipeline parallel`: its plan, and real DVC runs of a toy project whose stages sleep and fail."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import TOY_STAGES, make_toy_project, run_command, venv_env, write_params

from pipeline.errors import UserError
from pipeline.orchestration.parallel import Device, Job, Plan, parse_devices, plan_stages, select_jobs
from pipeline.progress import EpochProgress, epoch_line, parse_epoch_line

ROOT = Path(__file__).resolve().parents[1]

# The real pipeline's shape, by name: data stages, a train and an oof stage per (model, fold), then the rest.
GRAPH = {
    "demo": [],
    "masks": ["demo"],
    "split": ["masks"],
    "train@a-0": ["demo", "masks", "split"],
    "train@a-1": ["demo", "masks", "split"],
    "train@b-0": ["demo", "masks", "split"],
    "oof@a-0": ["masks", "split", "train@a-0"],
    "oof@a-1": ["masks", "split", "train@a-1"],
    "oof@b-0": ["masks", "split", "train@b-0"],
    "ensemble": ["masks", "oof@a-0", "oof@a-1", "oof@b-0"],
    "predict": ["ensemble", "train@a-0", "train@a-1", "train@b-0"],
}


def test_plan_runs_the_data_stages_first_and_each_oof_after_its_train() -> None:
    plan = plan_stages(GRAPH)
    assert plan.before == ["demo", "masks", "split"]
    assert list(plan.jobs) == ["train@a-0", "train@a-1", "train@b-0", "oof@a-0", "oof@a-1", "oof@b-0"]
    assert plan.jobs["train@a-0"] == [] and plan.jobs["oof@a-1"] == ["train@a-1"]


def test_plan_refuses_a_stage_between_parallel_ones() -> None:
    graph = {"train@a-0": [], "calibrate": ["train@a-0"], "oof@a-0": ["calibrate"]}
    with pytest.raises(UserError, match="'calibrate' sits between parallel stages"):
        plan_stages(graph)


def test_an_oof_stage_runs_when_its_train_stage_will_even_if_dvc_status_does_not_list_it_yet() -> None:
    plan = plan_stages(GRAPH)
    assert select_jobs(plan, {"train@a-1"}) == ["train@a-1", "oof@a-1"]
    assert select_jobs(plan, {"oof@b-0"}) == ["oof@b-0"]
    assert select_jobs(plan, set()) == []


def test_devices_pin_one_gpu_each_or_hide_them_all() -> None:
    gpus = parse_devices("0,1", None, cores=16)
    assert [d.name for d in gpus] == ["gpu0", "gpu1"]
    assert [d.env for d in gpus] == [
        {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"},
        {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"},
    ]
    cpus = parse_devices("cpu,cpu,cpu", 1, cores=2)
    assert [d.name for d in cpus] == ["cpu0", "cpu1", "cpu2"]
    assert all(
        d.env == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} for d in cpus
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "give GPU indices"), ("0,gpu1", "'gpu1' is neither"), ("1,1", "listed twice")],
)
def test_bad_device_lists_are_user_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_devices(text, None, cores=2)


def test_epoch_lines_round_trip() -> None:
    line = epoch_line("unet fold 2", 3, 8, 0.41234, 0.51236, 1e-3)
    assert line == "unet fold 2 epoch 3/8: train loss 0.4123, val mIoU 0.5124, lr 1.00e-03"
    assert parse_epoch_line(line) == EpochProgress(3, 8, 0.5124)
    assert parse_epoch_line(epoch_line("fpn fold 0", 1, 8, 0.5, None, 1e-3)) == EpochProgress(1, 8, None)
    assert parse_epoch_line("unet fold 0: best val mIoU 0.5 (epoch 1)") is None
    timed = epoch_line("unet fold 2", 3, 8, 0.41234, 0.51236, 1e-3, 41.234, 3.06)
    assert timed.endswith(": train loss 0.4123, val mIoU 0.5124, lr 1.00e-03 (41.2 s, val 3.1 s)")
    assert parse_epoch_line(timed) == EpochProgress(3, 8, 0.5124, 41.2, 3.1)
    untested = epoch_line("fpn fold 0", 1, 8, 0.5, None, 1e-3, 12.0)
    assert parse_epoch_line(untested) == EpochProgress(1, 8, None, 12.0, None)


def test_summary_line_names_stage_device_epoch_and_best_score() -> None:
    job = Job("train@unet-0", [], Path("x.log"), state="running", slot=Device("gpu1", {}), started=100.0)
    job.progress, job.best = EpochProgress(3, 8, 0.4), 0.45
    line = job.summary(now=165.0)
    assert re.fullmatch(r"train@unet-0\s+gpu1\s+running\s+1m05s\s+epoch 3/8\s+best val mIoU 0.4500", line)


def _parallel(project: Path, devices: str = "cpu,cpu") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "parallel", "--devices", devices, "--threads", "1"],
        cwd=project, env=venv_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())


def _intervals(project: Path) -> dict[str, tuple[float, float]]:
    events = project / "events"
    return {
        p.stem: (float(p.read_text()), float((events / f"{p.stem}.end").read_text()))
        for p in events.glob("*.start")
        if (events / f"{p.stem}.end").exists()
    }


def _max_overlap(intervals: dict[str, tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals.values()] + [(e, -1) for _, e in intervals.values()])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def _project_processes(project: Path) -> list[str]:
    """Processes still running in the project folder or naming it on their command line."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cwd, cmdline = proc.info["cwd"] or "", " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and (cwd.startswith(str(project)) or str(project) in cmdline):
            found.append(f"{proc.pid}: {cmdline}")
    return found


@pytest.mark.slow
def test_stages_run_two_at_a_time_and_end_as_a_sequential_repro_does(tmp_path: Path) -> None:
    parallel = make_toy_project(tmp_path / "parallel")
    sequential = make_toy_project(tmp_path / "sequential")

    run = _parallel(parallel)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== 8 stages on 2 devices (0 up to date)" in run.stdout
    # The summary: which stage on which device, its epochs and best val mIoU, in the log of a non-terminal.
    assert re.search(r"train@a-0\s+cpu[01]\s+done\s+\S+\s+epoch 2/2\s+best val mIoU 0.2000", run.stdout)
    for stage in TOY_STAGES:
        log = (parallel / "logs/stages" / f"{stage}.log").read_text()
        assert f"Running stage '{stage}'" in log
    intervals = _intervals(parallel)
    assert set(intervals) == set(TOY_STAGES)
    assert _max_overlap(intervals) == 2  # two devices: two stages at once, never three
    for m in "ab":
        for k in (0, 1):
            assert intervals[f"oof@{m}-{k}"][0] >= intervals[f"train@{m}-{k}"][1]

    reference = run_command(["dvc", "repro"], sequential)
    assert reference.returncode == 0, reference.stderr
    # The same entries, hashes included; only the order of stages in the file follows completion order.
    assert _lock(parallel) == _lock(sequential)
    status = run_command(["dvc", "status"], parallel)
    assert "up to date" in status.stdout, status.stdout

    again = _parallel(parallel)
    assert again.returncode == 0 and "== 0 stages on 2 devices (8 up to date)" in again.stdout
    assert "Running stage" not in again.stdout + again.stderr

    # A changed param re-runs what depends on it, the oof stages included though `dvc status` lists only
    # the train ones until those have run.
    control = json.loads((parallel / "control.json").read_text())
    (parallel / "control.json").write_text(json.dumps({**control, "value": 2}))
    changed = _parallel(parallel)
    assert changed.returncode == 0 and "== 8 stages on 2 devices (0 up to date)" in changed.stdout
    assert "with 2" in (parallel / "final.txt").read_text()


@pytest.mark.slow
def test_a_failed_stage_stops_nothing_else_and_is_reported_with_its_log(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p", fail=["train@a-1"])
    run = _parallel(project)
    assert run.returncode == 1, run.stdout + run.stderr
    log = project / "logs/stages/train@a-1.log"
    # The stage command's own exit code (DVC itself exits 255 whatever the command returned).
    assert f"train@a-1: exit code 3; log {log.relative_to(project)}" in run.stdout
    assert "oof@a-1: not run (needs train@a-1)" in run.stdout
    # Everything that did not need the failed stage ran to the end; the downstream stage did not.
    done = set(_intervals(project))
    assert done == set(TOY_STAGES) - {"train@a-1", "oof@a-1"}
    assert not (project / "final.txt").exists()
    assert "exited with 3" in log.read_text()

    # Fixed, the same command finishes the job and runs only what is left.
    control = json.loads((project / "control.json").read_text())
    (project / "control.json").write_text(json.dumps({**control, "fail": []}))
    again = _parallel(project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "== 2 stages on 2 devices (6 up to date)" in again.stdout
    assert (project / "final.txt").is_file()


def _started_runner(project: Path, stdout: int) -> subprocess.Popen[str]:
    """`python -m pipeline parallel` on two CPU slots in `project`, once both its stages have started."""
    runner = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "parallel", "--devices", "cpu,cpu", "--threads", "1"],
        cwd=project, env=venv_env(), stdout=stdout, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list((project / "events").glob("*.start"))) < 2 if (project / "events").exists() else True:
        assert runner.poll() is None and time.monotonic() < deadline, "two stages never started"
        time.sleep(0.1)
    time.sleep(0.5)
    return runner


@pytest.mark.slow
def test_a_runner_killed_outright_takes_its_stages_with_it(tmp_path: Path) -> None:
    # SIGKILL gives the runner no chance to stop anything: its stages' dvc processes get the death
    # signal, and each stage in turn (the toy stage asks for it as stages/train.py does).
    project = make_toy_project(tmp_path / "p", epochs=20, sleep=0.5)
    runner = _started_runner(project, subprocess.DEVNULL)
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 20
    while _project_processes(project):
        assert time.monotonic() < deadline, _project_processes(project)
        time.sleep(0.1)
    assert not list((project / "events").glob("*.end"))  # none went on to finish its stage


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_stops_every_stage_and_the_next_run_finishes_the_job(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    # SIGINT is what Ctrl-C in its terminal sends; SIGHUP what closing the terminal sends.
    project = make_toy_project(tmp_path / "p", epochs=4, sleep=0.5)
    runner = _started_runner(project, subprocess.PIPE)
    runner.send_signal(sig)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == code, output
    assert f"{sig.name}: stopping 2 running stages" in output
    assert _project_processes(project) == []
    assert not list((project / "events").glob("*.end"))  # stopped mid-way, not left to finish

    # The same command again finishes the job, with what an uninterrupted `dvc repro` records.
    again = _parallel(project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "== 8 stages on 2 devices (0 up to date)" in again.stdout
    reference = make_toy_project(tmp_path / "reference", epochs=4, sleep=0.5)
    assert run_command(["dvc", "repro"], reference).returncode == 0
    assert _lock(project) == _lock(reference)


@pytest.mark.slow
def test_dvc_locks_held_by_another_process_are_waited_out_not_failures(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p")
    # Another DVC process (this test, alive) "writes" oof@a-0's output: first while the runner asks
    # `dvc status` (which read-locks every output), then again while oof@a-0 would start.
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    held = {"write": {str(project / "out/a/oof0.txt"): {"pid": os.getpid(), "cmd": "dvc repro (another)"}}}
    (project / ".dvc/tmp").mkdir(exist_ok=True)
    rwlock.write_text(json.dumps(held))
    runner = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "parallel", "--devices", "cpu", "--threads", "1"],
        cwd=project, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert runner.stdout is not None
    lines = []
    for line in runner.stdout:
        lines.append(line)
        if line.startswith("== 8 stages"):
            rwlock.write_text(json.dumps(held))
        if "dvc status: another DVC process holds a lock" in line or "after a DVC lock" in line:
            rwlock.write_text("{}")  # the other process is done
    output = "".join(lines)
    assert runner.wait(timeout=60) == 0, output
    assert "dvc status: another DVC process holds a lock; retry 1" in output
    assert re.search(r"oof@a-0\s+cpu0\s+running.*retry 1 after a DVC lock", output), output
    assert "is busy" in (project / "logs/stages/oof@a-0.log").read_text()
    assert (project / "final.txt").is_file()


def test_parallel_outside_a_dvc_project_is_a_user_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "parallel", "--devices", "cpu"],
        cwd=tmp_path, env=venv_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "no dvc.yaml here" in run.stderr and "Traceback" not in run.stderr


def test_parallel_refuses_ddp_stages_it_would_squeeze_onto_one_device(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    write_params(tmp_path / "params.yaml", {"runtime": {"nproc": 2}})
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "parallel", "--devices", "0,1"],
        cwd=tmp_path, env=venv_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "runtime.nproc is 2" in run.stderr and "gives each stage one device" in run.stderr


def test_plan_of_the_real_dvc_yaml() -> None:
    from pipeline.orchestration.parallel import read_graph

    plan = plan_stages(read_graph(ROOT))
    assert plan.before == ["demo", "masks", "split", "pseudo"]
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    folds = yaml.safe_load((ROOT / "params.yaml").read_text())["ensemble"]["folds"]
    expected = {f"{kind}@{m}-{k}" for kind in ("train", "oof") for m in models for k in folds}
    expected |= {f"refit@{m}" for m in models}
    assert set(plan.jobs) == expected
    assert plan.jobs["refit@unet"] == [f"train@unet-{k}" for k in folds]
    assert isinstance(plan, Plan)
