"""`python -m pipeline slurm` and `node`: job scripts run by a stand-in sbatch, and two local "nodes"."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TOY_STAGES, make_toy_project, run_command, venv_env, write_params

# SLURM's sbatch, as far as the submission script can tell: it records each job, runs it at once (a
# job's dependencies were submitted, and so have run, before it) and prints a job id.
FAKE_SBATCH = """#!/bin/bash
set -euo pipefail
n=$(( $(find "$SBATCH_SPOOL" -name '*.sh' | wc -l) + 1 ))
cat > "$SBATCH_SPOOL/job$n.sh"
echo "$*" > "$SBATCH_SPOOL/job$n.args"
bash "$SBATCH_SPOOL/job$n.sh" > "$SBATCH_SPOOL/job$n.log" 2>&1
echo "$n;cluster"
"""


def _slurm(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "slurm", *args],
        cwd=project, env=env or venv_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _jobs(script: str) -> dict[str, str]:
    """Each submitted job's variable -> the sbatch options on its line."""
    return dict(re.findall(r"^(\w+)=\$\(sbatch (.*?) <<'JOB'", script, flags=re.MULTILINE))


@pytest.mark.slow
def test_dry_run_prints_a_job_per_stage_chained_by_their_dependencies(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p")
    run = _slurm(project, "--dry-run", "--partition", "gpu", "--time", "2:00:00")
    assert run.returncode == 0, run.stderr
    script = run.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    jobs = _jobs(script)
    # `prep` has never run: a job for it first, and every stage after it.
    assert list(jobs) == ["prepare", *[s.replace("@", "_").replace("-", "_") for s in TOY_STAGES], "rest"]
    assert jobs["prepare"] == "--parsable"
    assert jobs["train_a_0"] == "--parsable --dependency=afterok:$prepare"
    assert jobs["oof_b_1"] == "--parsable --dependency=afterok:$train_b_1:$prepare"
    assert jobs["rest"].count("$") == 8
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=2:00:00" in script
    assert "--wait-for-lock repro --single-item train@a-0" in script


@pytest.mark.slow
def test_submitted_jobs_reproduce_the_project_as_dvc_repro_does(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p", epochs=1, sleep=0.1)
    reference = make_toy_project(tmp_path / "reference", epochs=1, sleep=0.1)
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = venv_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["SBATCH_SPOOL"] = str(spool)

    run = _slurm(project, env=env)
    assert run.returncode == 0, run.stdout + run.stderr + "".join(p.read_text() for p in spool.glob("*.log"))
    assert (project / "logs/slurm/submit.sh").is_file()
    assert len(list(spool.glob("*.sh"))) == 1 + 8 + 1
    assert run_command(["dvc", "repro"], reference).returncode == 0
    assert yaml.safe_load((project / "dvc.lock").read_text()) == yaml.safe_load(
        (reference / "dvc.lock").read_text()
    )

    # Up to date: only the (no-op) job for the rest.
    again = _slurm(project, "--dry-run", env=env)
    assert again.returncode == 0 and list(_jobs(again.stdout)) == ["rest"], again.stdout
    # A stale oof stage alone: its job, then the rest.
    (project / "out/b/oof1.txt").unlink()
    partial = _slurm(project, "--dry-run", env=env)
    assert list(_jobs(partial.stdout)) == ["oof_b_1", "rest"], partial.stdout


@pytest.mark.slow
def test_a_multi_node_train_stage_is_one_launcher_per_node(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p")
    write_params(project / "params.yaml", {"runtime": {"nnodes": 2, "nproc": 4}})
    run = _slurm(project, "--dry-run")
    assert run.returncode == 0, run.stderr
    train = run.stdout.split("train_a_0=$(", 1)[1].split("\nJOB\n", 1)[0]
    assert "#SBATCH --nodes=2" in train and "#SBATCH --gres=gpu:4" in train
    assert 'export TRASHSEG_RDZV_ENDPOINT="$node0:29500"' in train
    assert re.search(r"srun --ntasks-per-node=1 \S+ -m pipeline node train@a-0$", train, flags=re.MULTILINE)
    oof = run.stdout.split("oof_a_0=$(", 1)[1].split("\nJOB\n", 1)[0]
    assert "#SBATCH --nodes=1" in oof and "#SBATCH --gres=gpu:1" in oof


@pytest.mark.slow
def test_node_zero_runs_the_stage_under_dvc_and_the_other_node_its_command(tmp_path: Path) -> None:
    # Two "nodes" on this machine, sharing the project folder as nodes share a cluster filesystem.
    project = make_toy_project(tmp_path / "p", epochs=1, sleep=0.1)
    write_params(project / "params.yaml", {"runtime": {"nnodes": 2}})
    assert run_command(["dvc", "repro", "prep"], project).returncode == 0
    command = [sys.executable, "-m", "pipeline", "node", "train@a-0"]
    procs = [
        subprocess.Popen(
            command,
            cwd=project,
            env={**venv_env(), "TRASHSEG_NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert "Running stage 'train@a-0'" in outputs[0] and "Running stage" not in outputs[1]
    ran = {p.name for p in (project / "events").glob("train@a-0.ran-on-node-*")}
    assert ran == {"train@a-0.ran-on-node-0", "train@a-0.ran-on-node-1"}
    status = run_command(["dvc", "status", "train@a-0"], project)
    assert "up to date" in status.stdout, status.stdout


def test_node_without_a_rank_is_a_one_line_user_error(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    write_params(project / "params.yaml", {"runtime": {"nnodes": 2}})
    env = {k: v for k, v in venv_env().items() if k not in ("TRASHSEG_NODE_RANK", "SLURM_NODEID")}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "node", "train@a-0"],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "this node's rank is unknown: set TRASHSEG_NODE_RANK" in run.stderr


def test_slurm_submission_without_sbatch_is_a_user_error(tmp_path: Path) -> None:
    project = make_toy_project(tmp_path / "p")
    env = venv_env()
    env["PATH"] = str(Path(sys.executable).parent)  # no sbatch there
    run = _slurm(project, env=env)
    assert run.returncode == 2 and "sbatch: not found" in run.stderr and "Traceback" not in run.stderr
    assert not (project / "logs").exists()
