"""What each OOF decision step earned, over seeds: paired differences with 95 % intervals.

Reads `bench/ensemble.py --json` results of the same set and params at several `train.seed`s (each a
whole K-fold run with `ensemble.calibrate` and `ensemble.postprocess` on) and prints, for each step
against the one before (weights -> calibration -> postprocess): the nested OOF mIoU difference paired by
(seed, fold) and the test mIoU difference paired by seed, each with its t-interval, and the per-class
OOF IoU of every step. With --baseline (runs of another setting, e.g. train.average_top_k, at the same
seeds), every step is also compared with the baseline's, paired the same way. Runs with a refit
(`--set refit.enabled=true`) also get the refit ensemble minus the folds alone on the test set, paired by
seed. --json writes the numbers.

  python bench/decisions.py docs/measurements/decisions/demo-s*.json \\
      --json docs/measurements/decisions-demo.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from realsets import t_interval

from pipeline.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, nargs="+", help="bench/ensemble.py --json files, one per seed")
    parser.add_argument(
        "--baseline",
        type=Path,
        nargs="+",
        help="runs of another setting at the same seeds: each step compared",
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.results]
    summary = summarize(runs)
    print(format_summary(summary))
    refits = [run["refit"] for run in runs if "refit" in run]
    if refits:
        summary["refit"] = refit_summary(refits)
        print(format_refit(summary["refit"]))
    if args.baseline:
        baseline = [json.loads(path.read_text()) for path in args.baseline]
        summary["versus_baseline"] = versus(runs, baseline)
        print(format_versus(summary["versus_baseline"]))
    if args.json:
        write_json(args.json, summary)


def versus(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step, these runs minus the baseline runs of the same seed: OOF by (seed, fold), test by seed."""
    by_seed = {run["params"]["train"]["seed"]: run for run in baseline}
    seeds = [run["params"]["train"]["seed"] for run in runs]
    missing = [seed for seed in seeds if seed not in by_seed]
    if missing:
        raise SystemExit(f"error: no baseline run of seed {missing[0]}")
    out: dict[str, Any] = {}
    for step in runs[0]["steps"]:
        pairs = [
            (run["steps"][step], by_seed[seed]["steps"][step]) for run, seed in zip(runs, seeds, strict=True)
        ]
        fold_diffs = [c["oof_folds"][k] - b["oof_folds"][k] for c, b in pairs for k in c["oof_folds"]]
        test_diffs = [c["leaderboard_miou"] - b["leaderboard_miou"] for c, b in pairs]
        out[step] = {
            "oof_miou": float(np.mean([c["oof_miou"] for c, _ in pairs])),
            "baseline_oof_miou": float(np.mean([b["oof_miou"] for _, b in pairs])),
            "test_miou": float(np.mean([c["leaderboard_miou"] for c, _ in pairs])),
            "baseline_test_miou": float(np.mean([b["leaderboard_miou"] for _, b in pairs])),
            "oof_fold_diff": paired(fold_diffs),
            "test_diff": paired(test_diffs),
        }
    return out


def format_versus(table: dict[str, Any]) -> str:
    lines = [
        "",
        "| step | OOF mIoU (vs baseline) | test mIoU (vs baseline) | OOF diff by fold [95 % CI] "
        "| test diff by seed [95 % CI] |",
    ]
    lines.append("|---|---|---|---|---|")
    for step, entry in table.items():
        lines.append(
            f"| {step} | {entry['oof_miou']:.4f} ({entry['baseline_oof_miou']:.4f}) "
            f"| {entry['test_miou']:.4f} ({entry['baseline_test_miou']:.4f}) "
            f"| {_diff(entry['oof_fold_diff'])} | {_diff(entry['test_diff'])} |"
        )
    return "\n".join(lines)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: mean OOF (nested, in-sample) and test mIoU over the runs, per-class OOF IoU, and the paired
    difference to the previous step (OOF by seed and fold, test by seed) with its 95 % interval."""
    steps = list(runs[0]["steps"])
    if any(list(run["steps"]) != steps for run in runs):
        raise SystemExit("error: the runs did not take the same decision steps")
    out: dict[str, Any] = {"runs": len(runs), "seeds": [run["params"]["train"]["seed"] for run in runs]}
    out["steps"] = {}
    for i, step in enumerate(steps):
        scores = [run["steps"][step] for run in runs]
        entry: dict[str, Any] = {
            "oof_miou": float(np.mean([s["oof_miou"] for s in scores])),
            "in_sample_miou": float(np.mean([s["in_sample_miou"] for s in scores])),
            "test_miou": float(np.mean([s["leaderboard_miou"] for s in scores])),
            "oof_iou": {c: _nanmean([s["oof_iou"][c] for s in scores]) for c in scores[0]["oof_iou"]},
            "test_iou": {
                c: _nanmean([s["leaderboard_iou"][c] for s in scores]) for c in scores[0]["leaderboard_iou"]
            },
        }
        if i:
            before = [run["steps"][steps[i - 1]] for run in runs]
            fold_diffs = [
                s["oof_folds"][k] - b["oof_folds"][k]
                for s, b in zip(scores, before, strict=True)
                for k in s["oof_folds"]
            ]
            test_diffs = [
                s["leaderboard_miou"] - b["leaderboard_miou"] for s, b in zip(scores, before, strict=True)
            ]
            entry["oof_fold_diff"] = paired(fold_diffs)
            entry["test_diff"] = paired(test_diffs)
        out["steps"][step] = entry
    return out


def refit_summary(refits: list[dict[str, Any]]) -> dict[str, Any]:
    """The test mIoU with the refit models and of the folds alone, and their difference paired by seed."""
    with_refit = [r["with_refit"]["leaderboard_miou"] for r in refits]
    folds = [r["folds_only"]["leaderboard_miou"] for r in refits]
    return {
        "weight": sorted({r["weight"] for r in refits}),
        "with_refit": float(np.mean(with_refit)),
        "folds_only": float(np.mean(folds)),
        "test_diff": paired([a - b for a, b in zip(with_refit, folds, strict=True)]),
    }


def format_refit(refit: dict[str, Any]) -> str:
    return (
        f"\nrefit (weight {refit['weight']}): test mIoU {refit['with_refit']:.4f} vs the folds alone "
        f"{refit['folds_only']:.4f}, difference by seed {_diff(refit['test_diff'])}"
    )


def paired(diffs: list[float]) -> dict[str, float]:
    """The mean of paired differences with its 95 % t-interval, and how many pairs."""
    mean, low, high = t_interval(diffs)
    return {"mean": mean, "low": low, "high": high, "pairs": len(diffs)}


def _nanmean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['runs']} runs (seeds {summary['seeds']})"]
    lines.append(
        "| step | OOF mIoU (nested) | in-sample | test mIoU | OOF diff by fold [95 % CI] "
        "| test diff by seed [95 % CI] |"
    )
    lines.append("|---|---|---|---|---|---|")
    for step, entry in summary["steps"].items():
        oof = _diff(entry.get("oof_fold_diff"))
        test = _diff(entry.get("test_diff"))
        lines.append(
            f"| {step} | {entry['oof_miou']:.4f} | {entry['in_sample_miou']:.4f} | {entry['test_miou']:.4f} "
            f"| {oof} | {test} |"
        )
    classes = list(next(iter(summary["steps"].values()))["oof_iou"])
    lines.append("")
    lines.append("| OOF IoU | " + " | ".join(classes) + " |")
    lines.append("|---|" + "---|" * len(classes))
    for step, entry in summary["steps"].items():
        cells = ["-" if entry["oof_iou"][c] is None else f"{entry['oof_iou'][c]:.3f}" for c in classes]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff(diff: dict[str, float] | None) -> str:
    if diff is None:
        return "-"
    if math.isnan(diff["low"]):
        return f"{diff['mean']:+.4f} (n={diff['pairs']})"
    return f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] (n={diff['pairs']})"


if __name__ == "__main__":
    main()
