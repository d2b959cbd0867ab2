"""SLURM submission: one job per out-of-date train/oof stage (chained by dependencies), then the rest."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RuntimeParams
from pipeline.errors import UserError
from pipeline.orchestration.parallel import Plan, dvc_command, select_jobs, stage_group

# torchrun's rendezvous port on node 0 of a multi-node job.
RDZV_PORT = 29500


@dataclass(frozen=True)
class SlurmOptions:
    """What every job asks the scheduler for; `partition`/`account` None leave the cluster's defaults."""

    time: str = "24:00:00"
    cpus_per_task: int = 8
    partition: str | None = None
    account: str | None = None
    log_dir: Path = Path("logs/slurm")


def submit_script(
    root: Path, plan: Plan, stale: set[str], before_stale: bool, runtime: RuntimeParams, options: SlurmOptions
) -> str:
    """A bash script that submits the jobs with `sbatch --parsable`, each after the jobs it needs.

    - `prepare` (when a data stage is stale): `dvc repro` of the stages the parallel ones need. Then
      every parallel stage is submitted, since which of them will change is not known yet.
    - one job per stage to run (`dvc repro --single-item`), on runtime.nproc GPUs of runtime.nnodes nodes
      for a train stage, runtime.nproc GPUs of one node for a refit stage, one GPU for an oof stage;
      an oof job waits for its train job, a refit job for its model's train jobs.
    - `rest`: a plain `dvc repro` after all of them (ensemble, predict, evaluate...).
    The workspace and DVC's cache must be on a filesystem every node sees.
    """
    jobs = list(plan.jobs) if before_stale else select_jobs(plan, stale)
    python = shlex.quote(sys.executable)
    dvc = f"{shlex.join(dvc_command())} --wait-for-lock repro"
    # The stage commands say `python ...`: this environment's python on every node.
    env = f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"'
    lines = [
        "#!/bin/bash",
        f"# Written by `python -m pipeline slurm` for {root}: {len(jobs)} stage jobs, then the rest.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(root))}",
        f"mkdir -p {shlex.quote(str(options.log_dir))}",
    ]
    prepare = before_stale and bool(plan.before)
    if prepare:
        command = f"{dvc} {' '.join(map(shlex.quote, plan.before))}"
        lines += _submit("prepare", [], [*_resources("prepare", options, gpus=0, nodes=1), env, command])
    for stage in jobs:
        needs = [_var(n) for n in plan.jobs[stage] if n in jobs] + (["prepare"] if prepare else [])
        group = stage_group(stage)
        # A refit trains like a fold, on one node (stages/refit.py).
        nodes = runtime.nnodes if group == "train" else 1
        gpus = runtime.nproc if group in ("train", "refit") else 1
        header = _resources(stage, options, gpus=gpus, nodes=nodes)
        if nodes == 1:
            body = [env, f"{dvc} --single-item {shlex.quote(stage)}"]
        else:
            # One launcher per node (srun): node 0 runs the stage under DVC, the others its command;
            # their torchruns meet at node 0.
            body = [
                env,
                'node0="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                f'export TRASHSEG_RDZV_ENDPOINT="$node0:{RDZV_PORT}"',
                f"srun --ntasks-per-node=1 {python} -m pipeline node {shlex.quote(stage)}",
            ]
        lines += _submit(_var(stage), needs, [*header, *body])
    rest = [_var(s) for s in jobs] or (["prepare"] if prepare else [])
    lines += _submit("rest", rest, [*_resources("rest", options, gpus=1, nodes=1), env, dvc])
    lines.append('echo "submitted ${rest}: the rest of the pipeline, after the stage jobs"')
    return "\n".join(lines) + "\n"


def _resources(name: str, options: SlurmOptions, gpus: int, nodes: int) -> list[str]:
    log = options.log_dir / f"{name}.log"
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name=trashseg-{name}",
        f"#SBATCH --output={log}",
        f"#SBATCH --time={options.time}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={options.cpus_per_task}",
    ]
    if gpus:
        header.append(f"#SBATCH --gres=gpu:{gpus}")
    if options.partition:
        header.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        header.append(f"#SBATCH --account={options.account}")
    return [*header, "set -euo pipefail"]


def _submit(var: str, needs: list[str], script: list[str]) -> list[str]:
    """`var=$(sbatch --parsable [--dependency=afterok:$a:$b] <<script)`: the job id lands in $var."""
    dependency = f" --dependency=afterok:{':'.join(f'${n}' for n in needs)}" if needs else ""
    # --parsable prints "id" or "id;cluster": keep the id.
    return [f"{var}=$(sbatch --parsable{dependency} <<'JOB' | cut -d';' -f1", *script, "JOB", ")"]


def _var(stage: str) -> str:
    """A shell variable name for a stage's job id: train@unet-0 -> train_unet_0."""
    return re.sub(r"\W", "_", stage)


def run_on_node(root: Path, stage: str, rank: int) -> int:
    """One node's part of a multi-node train stage; its exit code.

    Node 0 runs the stage under DVC, which checks, runs and commits it; every other node runs the
    stage's command as dvc.yaml gives it (read through DVC), whose torchrun joins node 0's. Only node 0
    writes files (global rank 0), so the workspace is DVC's alone.
    """
    if rank == 0:
        return subprocess.call([*dvc_command(), "--wait-for-lock", "repro", "--single-item", stage], cwd=root)
    return subprocess.call(stage_command(root, stage), shell=True, cwd=root)


def stage_command(root: Path, stage: str) -> str:
    """The command of `stage` in the project at `root`, its ${...} resolved, as DVC would run it."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            (found,) = repo.stage.collect(stage)
            return found.cmd
    except DvcException as exc:
        raise UserError(f"{root / 'dvc.yaml'}: {exc}") from None
