"""Benchmark: the fitted ensemble against each of its members, out-of-fold and on the test set.

One workspace (dvc.yaml, pipeline/, stages/ copied; `dvc init --no-scm`) whose params.yaml is --params
with data.* pointed at DATA_DIR (train.json, test.json, test_truth.json; submissions at each image's own
size) and each `--set key=value` applied (dotted keys, YAML values, as `dvc exp run -S`). Then
`dvc repro` of the whole graph, timed per stage kind. Each member is then scored alone on the test set:
the predict stage is run again with weights.json replaced by that member alone, and scored like the
leaderboard stage. Prints one table: per model and for the ensemble, the OOF mIoU (the ensemble's is
cross-validated: weights fitted without each fold), the leaderboard mIoU, the fitted weight, and the
per-class IoUs of both; plus the train, oof and ensemble stages' wall time. With `--set refit.enabled=true`
the submission includes each recipe's refit model, and the fold ensemble alone (predict with the refit
off) is scored beside it on the test set: the refit has no OOF. --json writes it all.

--keep-trained, with a --workspace an earlier run of the same params filled: its trained folds are kept
(`dvc commit -f` of every train stage after the code is copied, so a code change elsewhere does not
retrain them) and only what follows training runs again: a refit or a predict setting compared on the
same folds. Honest only where the code that trains has not changed in effect since (the JSON records
it: "kept_trained").

  python bench/ensemble.py ../shared/data/medical-waste --params configs/real-cpu.yaml \\
      --set split.n_splits=3 --set 'ensemble.folds=[0,1,2]' --set train.epochs=12
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import write_json
from pipeline.config import complete
from pipeline.data import coco, records
from pipeline.ensemble.decision import LabelDecision
from pipeline.ensemble.fit import FittedWeights, read_weights, write_weights
from pipeline.evaluation.submission import score_submission
from recipe import make_workspace

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="folder with train.json, test.json, test_truth.json")
    parser.add_argument("--params", type=Path, default=REPO / "configs/real-cpu.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value (YAML value)")
    parser.add_argument("--workspace", type=Path, help="keep the workspace here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument(
        "--keep-trained", action="store_true", help="keep the --workspace's trained folds (see above)"
    )
    args = parser.parse_args()
    if args.keep_trained and not (args.workspace and (args.workspace / "dvc.lock").is_file()):
        parser.error("--keep-trained needs a --workspace that an earlier run reproduced")
    with tempfile.TemporaryDirectory(prefix="bench_ensemble.") as tmp:
        work = args.workspace or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args, work)
    print(table(results))
    if args.json:
        write_json(args.json, results)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    params = complete(yaml.safe_load(args.params.read_text()) or {})
    data = args.data_dir.resolve()
    params["data"].update(
        root=str(data),
        train_json=str(data / "train.json"),
        test_json=str(data / "test.json"),
        test_truth_json=str(data / "test_truth.json"),
    )
    params["submission"]["size"] = None
    for item in args.sets:
        key, _, value = item.partition("=")
        apply(params, key, yaml.safe_load(value))
    make_workspace(work)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = work / "dvc.log"
    if args.keep_trained:
        trained = [f"train@{name}-{k}" for name in params["models"] for k in params["ensemble"]["folds"]]
        run_logged([sys.executable, "-m", "dvc", "commit", "-f", *trained], work, log)
    lines = run_logged([sys.executable, "-m", "dvc", "repro"], work, log)

    report = json.loads((work / "ensemble/report.json").read_text())
    truth = coco.load_with_training_classes(
        data / "test_truth.json", data / "train.json", data, "error", params["data"]["unused_categories"]
    )
    overlap = params["data"]["overlap"]
    fitted = read_weights(work / "ensemble/weights.json", truth.classes)
    results: dict[str, Any] = {
        "params": params,
        "kept_trained": args.keep_trained,
        "seconds": {"total": lines[-1][1], **stage_seconds(lines)},
        "ensemble": {
            "oof_miou": report["ensemble"]["oof_miou"],
            "in_sample_miou": report["in_sample_miou"],
            "oof_iou": report["ensemble"]["iou"],
            **leaderboard(work / "submissions/submission.csv", truth, overlap),
        },
        "weights": report["weights"],
        "fold_weights": report["fold_weights"],
        "models": {},
    }
    for m, name in enumerate(fitted.members):
        alone = [[float(i == m)] * len(fitted.classes) for i in range(len(fitted.members))]
        # Plain argmax, as its OOF figure is: the ensemble's decisions are the steps' business (below).
        member = dataclasses.replace(fitted, weights=alone, decision=LabelDecision())
        out = predict_with(work, data, f"alone_{name}", member, log)
        results["models"][name] = {
            "oof_miou": report["models"][name]["oof_miou"],
            "oof_iou": report["models"][name]["iou"],
            **leaderboard(out, truth, overlap),
        }
    # Each decision step on the test set: the fitted weights with the decisions up to that step; the
    # last step is the submission itself. OOF figures from the report (nested and in-sample, per fold).
    results["steps"] = {}
    steps = [step for step in report["steps"] if step != "members"]
    for step, decision in step_decisions(fitted.decision, steps).items():
        out = work / "submissions/submission.csv"
        if step != steps[-1]:
            stepped = dataclasses.replace(fitted, decision=decision)
            out = predict_with(work, data, f"step_{step}", stepped, log)
        reported = report["steps"][step]
        results["steps"][step] = {
            "oof_miou": reported["oof_miou"],
            "in_sample_miou": reported["in_sample_miou"],
            "oof_folds": reported["folds"],
            "oof_iou": reported["iou"],
            **leaderboard(out, truth, overlap),
        }
    results["decision"] = report["decision"]
    if params["refit"]["enabled"]:
        results["refit"] = refit_versus_folds(work, data, params, fitted, truth, log)
    return results


def refit_versus_folds(
    work: Path, data: Path, params: dict[str, Any], fitted: FittedWeights, truth: records.CocoSet, log: Path
) -> dict[str, Any]:
    """The submission (folds and refit models, by refit.weight) against the folds alone, on the test set."""
    folds_only = copy.deepcopy(params)
    folds_only["refit"]["enabled"] = False
    (work / "params_folds_only.yaml").write_text(yaml.safe_dump(folds_only, sort_keys=False))
    out = predict_with(work, data, "folds_only", fitted, log, params="params_folds_only.yaml")
    overlap = params["data"]["overlap"]
    epochs = {
        name: json.loads((work / "refits" / name / "refit.json").read_text()) for name in fitted.members
    }
    return {
        "weight": params["refit"]["weight"],
        "refit": {name: {"epochs": r["epochs"], "chosen_by": r["chosen_by"]} for name, r in epochs.items()},
        "with_refit": leaderboard(work / "submissions/submission.csv", truth, overlap),
        "folds_only": leaderboard(out, truth, overlap),
    }


def step_decisions(final: LabelDecision, steps: list[str]) -> dict[str, LabelDecision]:
    """The label decision in force after each step of `steps` (weights, calibration, postprocess)."""
    cumulative = {
        "weights": LabelDecision(),
        "calibration": LabelDecision(final.class_scales),
        "postprocess": final,
    }
    return {step: cumulative[step] for step in steps}


def predict_with(
    work: Path, data: Path, name: str, fitted: FittedWeights, log: Path, params: str = "params.yaml"
) -> Path:
    """The predict stage run with `fitted` in place of the ensemble's weights (and `params`); -> its CSV."""
    write_weights(work / f"{name}.json", fitted)
    out = work / f"{name}.csv"
    command = [sys.executable, "stages/predict.py", "--models", "models", "--weights", f"{name}.json"]
    command += ["--root", str(data), "--manifest", "data/manifest.json", "--out", str(out)]
    command += ["--probabilities", str(out.with_suffix(".npz")), "--refits", "refits", "--params", params]
    run_logged(command, work, log)
    return out


def apply(params: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted `key` (e.g. models.unet.train.lr) to `value`, creating mappings on the way."""
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
        if node is None:
            raise SystemExit(f"--set {key}: '{part}' is null in the params")
    node[last] = copy.deepcopy(value)


def run_logged(command: list[str], work: Path, log: Path) -> list[tuple[str, float]]:
    """Run `command` in `work`, its output appended to `log`; exits on failure. Returns (line, seconds
    since start) of each output line as it arrived, so DVC's 'Running stage' lines time the stages."""
    lines: list[tuple[str, float]] = []
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            lines.append((line, time.perf_counter() - start))
        code = process.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(command)} failed (exit {code}); end of {log}:\n{tail}")
    lines.append(("", time.perf_counter() - start))
    return lines


def stage_seconds(lines: list[tuple[str, float]]) -> dict[str, float]:
    """Wall seconds per stage kind (train, oof, ensemble, ...): from each 'Running stage' line to the next."""
    starts = [
        (m.group(1).split("@")[0], t)
        for line, t in lines
        if (m := re.match(r"Running stage '([^']+)'", line))
    ]
    seconds: dict[str, float] = {}
    for (kind, t), (_, t_next) in zip(starts, [*starts[1:], ("", lines[-1][1])], strict=True):
        seconds[kind] = seconds.get(kind, 0.0) + t_next - t
    return seconds


def leaderboard(submission: Path, truth: records.CocoSet, overlap: str) -> dict[str, Any]:
    result = score_submission(submission, truth, None, overlap)
    return {"leaderboard_miou": result["miou"], "leaderboard_iou": result["iou"]}


def table(results: dict[str, Any]) -> str:
    rows = [("predictor", "weight", "OOF mIoU", "test mIoU")]
    for name, scores in results["models"].items():
        weight = results["weights"][name]
        shown = f"{weight:.2f}" if isinstance(weight, float) else "per class"
        rows.append((name, shown, f"{scores['oof_miou']:.4f}", f"{scores['leaderboard_miou']:.4f}"))
    ens = results["ensemble"]
    rows.append(("ensemble (CV)", "", f"{ens['oof_miou']:.4f}", f"{ens['leaderboard_miou']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.append(
        f"in-sample ensemble OOF (weights fitted on the folds that score them): {ens['in_sample_miou']:.4f}"
    )
    if results.get("steps"):
        lines.append("decision steps (OOF nested / in-sample / test mIoU):")
        for step, scores in results["steps"].items():
            lines.append(
                f"  {step}: {scores['oof_miou']:.4f} / {scores['in_sample_miou']:.4f} / "
                f"{scores['leaderboard_miou']:.4f}"
            )
    if "refit" in results:
        refit = results["refit"]
        lines.append(
            f"test mIoU with each recipe's refit model (weight {refit['weight']}): "
            f"{refit['with_refit']['leaderboard_miou']:.4f}, the folds alone: "
            f"{refit['folds_only']['leaderboard_miou']:.4f}"
        )
    classes = list(ens["oof_iou"])
    lines.append("per-class test IoU: " + ", ".join(classes))
    for name, scores in [*results["models"].items(), ("ensemble", ens)]:
        lines.append(f"  {name}: " + " ".join(f"{scores['leaderboard_iou'][c]:.3f}" for c in classes))
    seconds = results["seconds"]
    lines.append(
        f"dvc repro wall time: {seconds['total'] / 60:.1f} min (train {seconds.get('train', 0) / 60:.1f}, "
        f"oof {seconds.get('oof', 0) / 60:.1f}, ensemble {seconds.get('ensemble', 0) / 60:.1f})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
