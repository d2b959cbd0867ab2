"""Benchmark: the demo's train and oof stages N at a time (`python -m pipeline parallel`) vs one `dvc repro`.

Two workspaces (dvc.yaml, pipeline/, stages/ copied; `dvc init --no-scm`) with this repository's
params.yaml (the demo: 2 models x 3 folds) and each `--set key=value` applied. Their data stages (demo,
masks, split) run untimed. Then, timed, the rest of the graph:

  sequential  `dvc repro` with --seq-threads torch threads (default: all cores) in one process at a time
  parallel    `python -m pipeline parallel --devices cpu,...` (--workers slots) of --par-threads each

Prints both wall times and their ratio, and whether the two dvc.lock files record the same outputs
(the same md5 for every model, OOF file and metric). On a GPU server the runner's `--devices 0,1,2,3`
runs a stage per GPU instead; see the README.

  python bench/parallel.py --json docs/measurements/parallel-demo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ensemble import apply

from pipeline.atomic import write_json
from pipeline.config import complete
from pipeline.training.runtime import cpu_cores
from recipe import REPO, dvc, make_workspace, subprocess_env, write_params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value (YAML value)")
    parser.add_argument("--workers", type=int, default=2, help="parallel stage slots (CPU 'devices')")
    parser.add_argument("--par-threads", type=int, default=1, help="torch threads per parallel stage")
    parser.add_argument("--seq-threads", type=int, default=cpu_cores(), help="torch threads, sequential run")
    parser.add_argument("--workspace", type=Path, help="keep the workspaces here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    params = complete(yaml.safe_load((REPO / "params.yaml").read_text()) or {})
    for item in args.sets:
        key, _, value = item.partition("=")
        apply(params, key, yaml.safe_load(value))

    with tempfile.TemporaryDirectory(prefix="bench_parallel.") as tmp:
        base = args.workspace or Path(tmp)
        works = {name: base / name for name in ("sequential", "parallel")}
        for work in works.values():
            work.mkdir(parents=True, exist_ok=True)
            make_workspace(work)
            write_params(work, params)
            (work / "logs").mkdir(exist_ok=True)
            dvc(work, ["repro", "split"], subprocess_env(args.seq_threads), work / "logs" / "dvc.log")

        seq_env = subprocess_env(args.seq_threads)
        sequential = dvc(works["sequential"], ["repro"], seq_env, works["sequential"] / "logs" / "dvc.log")

        devices = ",".join(["cpu"] * args.workers)
        command = [sys.executable, "-m", "pipeline", "parallel", "--devices", devices]
        command += ["--threads", str(args.par_threads)]
        start = time.perf_counter()
        with (works["parallel"] / "logs" / "parallel.log").open("w") as log:
            run = subprocess.run(
                command, cwd=works["parallel"], env=seq_env, stdout=log, stderr=subprocess.STDOUT
            )
        parallel = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"parallel run failed (exit {run.returncode}); see {works['parallel']}/logs")

        locks = [yaml.safe_load((w / "dvc.lock").read_text()) for w in works.values()]
        same = locks[0] == locks[1]
        differing = sorted(
            s for s in locks[0]["stages"] if locks[0]["stages"][s] != locks[1]["stages"].get(s)
        )
        metrics = {
            name: json.loads((w / "metrics" / "cv.json").read_text())["oof_miou"] for name, w in works.items()
        }
        result = {
            "sequential_s": round(sequential, 1),
            "parallel_s": round(parallel, 1),
            "speedup": round(sequential / parallel, 3),
            "workers": args.workers,
            "par_threads": args.par_threads,
            "seq_threads": args.seq_threads,
            "cores": cpu_cores(),
            "same_outputs": same,
            "stages_differing": differing,
            "oof_miou": metrics,
            "sets": args.sets,
        }
    print(f"sequential dvc repro ({args.seq_threads} threads):  {sequential:7.1f} s")
    print(f"parallel, {args.workers} stages x {args.par_threads} threads:     {parallel:7.1f} s")
    print(
        f"same outputs (dvc.lock): {same}" + ("" if same else f"; differing stages: {', '.join(differing)}")
    )
    print(f"ensemble OOF mIoU: sequential {metrics['sequential']:.4f}, parallel {metrics['parallel']:.4f}")
    print(f"speed-up sequential/parallel: {result['speedup']:.2f}x on {result['cores']} cores")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
