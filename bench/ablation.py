"""Ablation: the pipeline's own stages on a real dataset, one setting switched at a time, side by side."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import complete, params_to_dict
from recipe import (
    DATA_STAGES,
    checked,
    dvc,
    make_workspace,
    pipeline_score,
    subprocess_env,
    train_stage_name,
    with_epochs,
    workspace_params,
    write_params,
)

EPILOG = """\
Each variant is the --params file with a few keys changed (`--variant NAME KEY=VALUE ...`, values in
YAML, keys as `dvc exp run -S` takes them): `section.key` for a shared section (train.lr: every recipe
that does not set its own), `models.NAME.section.key` for one recipe's own setting (models.fpn.train.lr),
deeper keys for a mapping's entry (train.losses.ce; models.fpn.train.losses.ce starts from fpn's
losses). Every variant gets its own workspace (dvc.yaml, pipeline/, stages/; `dvc init --no-scm`) whose
params keep the recipes --models names (default: the first of the params' `models`) and ensemble.folds =
--folds (default: fold 0) of --n-splits; several recipes need 2 folds or more, as their ensemble weights
are fitted cross-validated. Each recipe trains each fold (`dvc repro -s train@M-k`) for --epochs epochs
(the shared train.epochs; a recipe's own is dropped, a variant may set either) with --threads torch
threads; then `dvc repro leaderboard` writes their OOF predictions, fits the ensemble weights (one
recipe: weight 1), predicts the test set and scores it at each image's own size (submission.size =
null). --jobs variants run at once. A variant that changes only predict.*, ensemble.grid_step or
ensemble.per_class starts from a copy of the baseline's finished workspace: DVC re-runs its oof,
ensemble, predict and leaderboard stages and skips every train stage, so it costs a prediction, not a
training run. A variant with pseudo.enabled=true waits for the baseline and freezes the baseline's test
probabilities as its teacher (`python -m pipeline teacher`): a second round on the baseline's labels.

  python bench/ablation.py ../shared/data/medical-waste --params configs/real-cpu.yaml --epochs 12 \\
      --variant crop augment.resize=crop --variant ce-only 'train.losses={ce: 1.0}' \\
      --variant slim 'models.unet.model.decoder_channels=[64, 32, 16, 8, 8]' \\
      --variant tta-none predict.tta=none
  python bench/ablation.py DATA --params configs/real-cpu.yaml --epochs 12 --models unet fpn --folds 0 1 \\
      --variant fpn-lr models.fpn.train.lr=0.003
"""

# Keys a variant may change and still reuse the baseline's trained models: no train stage depends on them.
REUSE_PREFIXES = ("predict.", "ensemble.grid_step", "ensemble.per_class")
# Keys the benchmark sets itself, and the option that sets each.
BENCH_KEYS = {
    "ensemble.folds": "--folds",
    "split.n_splits": "--n-splits",
    "data.root": "DATA_DIR",
    "data.train_json": "DATA_DIR",
    "data.test_json": "DATA_DIR",
    "data.test_truth_json": "DATA_DIR",
    "submission.size": "the benchmark (null: native-size scoring)",
}


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
    parser.add_argument("--params", type=Path, required=True, help="the baseline (a params.yaml)")
    parser.add_argument("--epochs", type=int, required=True, help="train.epochs of every recipe and variant")
    parser.add_argument(
        "--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"), help="repeatable"
    )
    parser.add_argument("--models", nargs="+", help="the recipes to train and ensemble (default: the first)")
    parser.add_argument(
        "--folds",
        "--fold",
        type=int,
        nargs="+",
        default=[0],
        help="the folds each recipe trains (default: 0)",
    )
    parser.add_argument("--n-splits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    parser.add_argument("--workdir", type=Path, help="keep the workspaces here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    bad = [k for k in args.folds if not 0 <= k < args.n_splits]
    if bad or len(set(args.folds)) != len(args.folds):
        parser.error(
            f"--folds {args.folds}: each of the {args.n_splits} folds 0..{args.n_splits - 1} at most once"
        )
    names = [v[0] for v in args.variant]
    if len(set(names)) != len(names) or "baseline" in names:
        parser.error("--variant names must differ from each other and from 'baseline'")
    args.variants = {"baseline": {}} | {v[0]: parse_overrides(v[1:]) for v in args.variant}
    return args


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['train.lr=0.01', 'models.fpn.train.lr=0.003', ...] -> {'train.lr': 0.01, ...} (values as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts) or (parts[0] == "models" and len(parts) < 3):
            raise SystemExit(
                f"--variant: {pair!r} is not SECTION.KEY=VALUE or models.NAME.SECTION[.KEY]=VALUE"
            )
        owner = next(
            (by for name, by in BENCH_KEYS.items() if key == name or key.startswith(f"{name}.")), None
        )
        if owner is not None:
            raise SystemExit(f"--variant: {key} is set by {owner}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def apply(params: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of workspace params with each dotted key of `overrides` set, as `dvc exp run -S` sets it,
    checked as the stages will read it (an unknown key or a bad value exits, naming `source`).

    A mapping missing on a key's way is made: empty for a section (a recipe's own `train`, say), else
    from the value it resolves to (models.fpn.train.losses.ce changes one entry of fpn's losses).
    A recipe the workspace does not train is refused.
    """
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] == "models" and parts[1] not in out["models"]:
            trained = ", ".join(out["models"])
            raise SystemExit(f"{source}: {key}: '{parts[1]}' is not a recipe trained here ({trained})")
        resolved = params_to_dict(checked(out, source))
        node = out
        for depth, part in enumerate(parts[:-1]):
            path = parts[: depth + 1]
            child = node.get(part)
            if child is None:
                section = len(path) == 1 or (path[0] == "models" and len(path) <= 3)
                child = node[part] = {} if section else copy.deepcopy(_lookup(resolved, path) or {})
            if not isinstance(child, dict):
                raise SystemExit(f"{source}: {key}: {'.'.join(path)} is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    checked(out, source)
    return out


def _lookup(tree: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def reuses_baseline(overrides: dict[str, Any]) -> bool:
    """Whether a variant changes only keys no train stage depends on (so the baseline's models serve)."""
    return bool(overrides) and all(key.startswith(REUSE_PREFIXES) for key in overrides)


def teaches(overrides: dict[str, Any]) -> bool:
    """Whether a variant trains on pseudo-labels (it then needs the baseline's test predictions)."""
    return overrides.get("pseudo.enabled") is True


def freeze_teacher(baseline: Path, folder: Path) -> None:
    """`python -m pipeline teacher` in `folder` from the baseline workspace's test probabilities."""
    predictions = baseline / "predictions" / "test.npz"
    subprocess.run(
        [sys.executable, "-m", "pipeline", "teacher", "--predictions", str(predictions),
         "--out", str(folder / "teacher" / "test.npz")],
        check=True,
    )  # fmt: skip


def run_ablation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and score every variant; the predict-only ones after the baseline, from its workspace."""
    raw = complete(yaml.safe_load(args.params.read_text()) or {})
    models = args.models or "first"
    base = workspace_params(raw, args.data_dir.resolve(), args.folds, args.n_splits, models, str(args.params))
    base = with_epochs(base, args.epochs)
    names = list(base["models"])
    # Every variant's params are checked before anything runs.
    variants = {name: apply(base, o, f"--variant {name}") for name, o in args.variants.items()}
    env = subprocess_env(args.threads)
    baseline_done = threading.Event()
    baseline_ok = False
    print(
        f"workspaces under {work}; recipes {', '.join(names)}, folds {args.folds}; {args.jobs} at a time, "
        f"{args.threads} thread(s) each"
    )

    def run(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        nonlocal baseline_ok
        folder = work / name
        reuse = reuses_baseline(overrides)
        if reuse or teaches(overrides):
            # Pseudo-labels come from the baseline's test predictions: its finished run is the teacher.
            baseline_done.wait()
            if not baseline_ok:
                raise SystemExit(f"{name}: the baseline failed, so there is nothing to reuse or learn from")
        if reuse:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(work / "baseline", folder, symlinks=True)
            (folder / "dvc.log").unlink(missing_ok=True)  # this variant's log starts here
        else:
            folder.mkdir(parents=True, exist_ok=True)
            make_workspace(folder)
        write_params(folder, variants[name])
        log = folder / "dvc.log"
        print(f"  {name}: started ({log})", flush=True)
        try:
            if teaches(overrides):
                freeze_teacher(work / "baseline", folder)
            for stage in DATA_STAGES:
                dvc(folder, ["repro", "-s", stage], env, log)
            train_s = {
                train_stage_name(m, k): dvc(folder, ["repro", "-s", train_stage_name(m, k)], env, log)
                for m in names
                for k in args.folds
            }
            dvc(folder, ["repro", "leaderboard"], env, log)
            if name == "baseline":
                baseline_ok = True
        finally:
            if name == "baseline":
                baseline_done.set()
        score = pipeline_score(folder)
        report = json.loads((folder / "ensemble" / "report.json").read_text())
        weights = report["weights"]
        # The held-out folds' score (OOF, cross-validated for an ensemble), next to the test set's.
        oof = report["ensemble"]
        minutes = sum(train_s.values()) / 60
        print(
            f"  {name}: OOF mIoU {oof['oof_miou']:.3f}, test mIoU {score['miou']:.3f}, "
            f"train stages {minutes:.1f} min, weights {weights}",
            flush=True,
        )
        return {
            "overrides": overrides,
            "train_minutes": minutes,
            "train_minutes_by_stage": {stage: s / 60 for stage, s in train_s.items()},
            "reused_baseline": reuse,
            "weights": weights,
            "oof_miou": oof["oof_miou"],
            "oof_iou": oof["iou"],
            **score,
        }

    def run_or_record(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        # A variant whose stage fails (a recipe that diverges, say) is a result, not the end of the run;
        # the baseline's failure is: every row is read against it.
        try:
            return run(name, overrides)
        except SystemExit as exc:
            if name == "baseline":
                raise
            first = str(exc).splitlines()[0]
            print(f"  {name}: FAILED: {first} (see {work / name / 'dvc.log'})", flush=True)
            return {"overrides": overrides, "failed": first}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(run_or_record, name, overrides) for name, overrides in args.variants.items()
        }
        try:
            results = {name: future.result() for name, future in futures.items()}
        except BaseException:
            baseline_done.set()  # release waiting variants so the pool can shut down
            raise
    return {
        "data": str(args.data_dir),
        "params": str(args.params),
        "models": names,
        "epochs": args.epochs,
        "folds": args.folds,
        "n_splits": args.n_splits,
        "threads": args.threads,
        "jobs": args.jobs,
        "variants": results,
    }


def print_table(results: dict[str, Any]) -> None:
    """A row per variant: its train minutes, test mIoU, the change from the baseline, per-class IoUs."""
    variants = results["variants"]
    base = variants["baseline"]["miou"]
    classes = [name for name in variants["baseline"]["iou"] if name != "background"]
    print(
        f"\n{results['data']}: recipes {', '.join(results['models'])} on folds {results['folds']} of "
        f"{results['n_splits']}, {results['epochs']} epochs, {results['threads']} thread(s) per run, "
        f"{results['jobs']} runs at once; ensemble scored on the test truth"
    )
    print(f"{'variant':<16} {'train min':>9} {'OOF':>6} {'mIoU':>6} {'vs base':>7}  " + "  ".join(classes))
    for name, row in variants.items():
        if "failed" in row:
            print(f"{name:<16} FAILED: {row['failed']}")
            continue
        ious = "  ".join(_cell(row["iou"].get(c), len(c)) for c in classes)
        minutes = "(reused)" if row["reused_baseline"] else f"{row['train_minutes']:.1f}"
        oof = _cell(row.get("oof_miou"), 6)
        print(f"{name:<16} {minutes:>9} {oof} {row['miou']:>6.3f} {row['miou'] - base:>+7.3f}  {ious}")
    print(
        "train min: the train stages of every recipe, summed; OOF: the ensemble stage's held-out score; "
        "mIoU (and the per-class IoUs): the leaderboard stage's, on the test truth"
    )


def _cell(value: float | None, width: int) -> str:
    text = "-" if value is None or value != value else f"{value:.3f}"
    return f"{text:>{width}}"


if __name__ == "__main__":
    main()
