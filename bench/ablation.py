"""Ablation: the pipeline's own stages on a real dataset, one recipe part switched at a time, side by side."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from recipe import dvc, make_workspace, pipeline_score, subprocess_env, workspace_params, write_params

EPILOG = """\
Each variant is the --params recipe with a few keys changed (`--variant NAME KEY=VALUE ...`, values in
YAML). Every variant gets its own workspace (dvc.yaml, pipeline/, stages/; `dvc init --no-scm`), trains
fold --fold of --n-splits for --epochs epochs with --threads torch threads, predicts the test set and is
scored by the leaderboard stage at each image's own size (submission.size = null). --jobs variants run
at once. A variant that changes only predict.* keys reuses the baseline's trained fold (its train stage
only rewrites the out-of-fold predictions), so it costs a prediction, not a training run.

  python bench/ablation.py /work/shared/data/medical-waste --params configs/real-cpu.yaml --epochs 12 \\
      --variant squash augment.resize=squash --variant ce-only 'train.losses={ce: 1.0}'
"""


def main() -> None:
    args = parse_args(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run_ablation(args, work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print_table(results)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="train.json, test.json, test_truth.json and images")
    parser.add_argument("--params", type=Path, required=True, help="the baseline recipe (a params.yaml)")
    parser.add_argument("--epochs", type=int, required=True, help="train.epochs of every variant")
    parser.add_argument(
        "--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"), help="repeatable"
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--n-splits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.variants = {"baseline": {}} | {v[0]: parse_overrides(v[1:]) for v in args.variant}
    return args


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['train.lr=0.01', ...] -> {'train.lr': 0.01, ...} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--variant: {pair!r} is not SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def apply(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with each 'section.key' of `overrides` set."""
    out = {section: dict(values) for section, values in params.items()}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if name not in out.get(section, {}):
            raise SystemExit(f"--variant: {key} is not a key of the params file")
        out[section][name] = value
    return out


def run_ablation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and score every variant; the predict-only ones after the baseline, from its workspace."""
    raw = yaml.safe_load(args.params.read_text())
    base = workspace_params(raw, args.data_dir.resolve(), args.fold, args.n_splits)
    base["train"]["epochs"] = args.epochs
    env = subprocess_env(args.threads)
    baseline_done = threading.Event()
    print(f"workspaces under {work}; {args.jobs} at a time, {args.threads} thread(s) each")

    def run(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        folder = work / name
        predict_only = bool(overrides) and all(key.startswith("predict.") for key in overrides)
        if predict_only:
            baseline_done.wait()
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(work / "baseline", folder, symlinks=True)
            (folder / "dvc.log").unlink()  # this variant's log starts here
        else:
            folder.mkdir(parents=True, exist_ok=True)
            make_workspace(folder)
        write_params(folder, apply(base, overrides))
        log = folder / "dvc.log"
        print(f"  {name}: started ({log})", flush=True)
        for stage in ("masks", "split"):
            dvc(folder, ["repro", "-s", stage], env, log)
        train_s = dvc(folder, ["repro", "-s", f"train@{args.fold}"], env, log)
        dvc(folder, ["repro", "leaderboard"], env, log)
        if name == "baseline":
            baseline_done.set()
        score = pipeline_score(folder)
        print(f"  {name}: mIoU {score['miou']:.3f}, train stage {train_s / 60:.1f} min", flush=True)
        minutes = train_s / 60
        return {"overrides": overrides, "train_minutes": minutes, "reused_baseline": predict_only, **score}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run, name, overrides) for name, overrides in args.variants.items()}
        try:
            results = {name: future.result() for name, future in futures.items()}
        except BaseException:
            baseline_done.set()  # release waiting variants so the pool can shut down
            raise
    return {
        "data": str(args.data_dir),
        "params": str(args.params),
        "epochs": args.epochs,
        "fold": args.fold,
        "n_splits": args.n_splits,
        "threads": args.threads,
        "jobs": args.jobs,
        "variants": results,
    }


def print_table(results: dict[str, Any]) -> None:
    """A row per variant: its overrides, train minutes, test mIoU, the change from the baseline, IoUs."""
    variants = results["variants"]
    base = variants["baseline"]["miou"]
    classes = [name for name in variants["baseline"]["iou"] if name != "background"]
    print(
        f"\n{results['data']}: fold {results['fold']} of {results['n_splits']}, {results['epochs']} epochs, "
        f"{results['threads']} thread(s) per run, {results['jobs']} runs at once; scored on the test truth"
    )
    print(f"{'variant':<16} {'train min':>9} {'mIoU':>6} {'vs base':>7}  " + "  ".join(classes))
    for name, row in variants.items():
        ious = "  ".join(_cell(row["iou"].get(c), len(c)) for c in classes)
        minutes = "(reused)" if row["reused_baseline"] else f"{row['train_minutes']:.1f}"
        print(f"{name:<16} {minutes:>9} {row['miou']:>6.3f} {row['miou'] - base:>+7.3f}  {ious}")


def _cell(value: float | None, width: int) -> str:
    text = "-" if value is None or value != value else f"{value:.3f}"
    return f"{text:>{width}}"


if __name__ == "__main__":
    main()
