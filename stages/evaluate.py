"""Stage `evaluate`: the ensemble's out-of-fold mIoU, each model's, a confusion plot, worst-image overlays."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import load_params
from pipeline.data.folds import read_folds
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError, run_main
from pipeline.evaluation.evaluate import (
    N_WORST,
    cv_summary,
    evaluate_oof,
    worst_images,
    write_confusion_csv,
    write_worst_overlays,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labels", type=Path, required=True, help="the ensemble's fold<k>/ OOF label PNGs")
    parser.add_argument("--report", type=Path, required=True, help="the ensemble stage's report JSON")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image truth mask PNGs")
    parser.add_argument("--folds", type=Path, required=True, help="folds CSV (image_id,fold)")
    parser.add_argument("--root", type=Path, required=True, help="images are read from ROOT/file_name")
    parser.add_argument("--metrics", type=Path, required=True, help="headline cross-validation metrics JSON")
    parser.add_argument("--details", type=Path, required=True, help="the same with fold and per-class detail")
    parser.add_argument("--confusion", type=Path, required=True, help="confusion plot CSV (actual,predicted)")
    parser.add_argument("--worst", type=Path, required=True, help="folder for the worst images' overlays")
    parser.add_argument("--n-worst", type=int, default=N_WORST, help="how many worst images to draw")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    average = load_params(args.params).metric.average

    manifest = read_manifest(args.manifest)
    report = json.loads(args.report.read_text())
    fitted_by = report.get("average", "dataset")  # reports from before the choice existed: dataset
    if fitted_by != average:
        raise UserError(f"{args.report}: scored by the {fitted_by} average, params say {average} (stale?)")
    trained = [int(k) for k in report["ensemble"]["folds"]]
    folds = read_folds(args.folds, manifest.train_names(), args.manifest)
    # The labels are the ensemble's, each fold merged with weights fitted without it, at native size.
    result = evaluate_oof(args.labels, args.masks, folds, manifest.n_classes, trained, size=None)
    summary = cv_summary(result, manifest.classes, average)
    reported = report["ensemble"]["oof_miou"]  # NaN is written as null
    scored = summary["oof_miou"]
    agree = math.isnan(scored) if reported is None else math.isclose(scored, reported, abs_tol=1e-9)
    if not agree:
        raise UserError(
            f"{args.labels}: scores {summary['oof_miou']}, but {args.report} says otherwise (stale?)"
        )
    summary["models"] = report["models"]
    summary["weights"] = report["weights"]
    summary["steps"] = report["steps"]
    summary["decision"] = report["decision"]
    write_json(args.details, summary)  # with the average's name
    # Headline numbers only, so `dvc metrics show` fits a terminal: the ensemble's OOF, what each decision
    # step after the members earned (nested), so `dvc metrics diff` shows which step moved it, and each
    # model's OOF. The weights and the best member's name are in the details.
    headline = {
        "oof_miou": summary["oof_miou"],
        "steps": {step: scores["oof_miou"] for step, scores in report["steps"].items() if step != "members"},
        "models": {name: {"oof_miou": scores["oof_miou"]} for name, scores in report["models"].items()},
    }
    write_json(args.metrics, headline)
    write_confusion_csv(args.confusion, result.confusion, manifest.classes)
    worst = worst_images(result.scores, args.n_worst)
    write_worst_overlays(args.worst, worst, args.root, args.labels, args.masks, manifest.classes, None)

    singles = ", ".join(f"{name} {s['oof_miou']:.4f}" for name, s in report["models"].items())
    print(
        f"ensemble OOF mIoU {summary['oof_miou']:.4f} ({average} average) over {summary['n_images']} images "
        f"(folds {summary['fold_miou_mean']:.4f} +- {summary['fold_miou_std']:.4f}); models: {singles}"
    )


if __name__ == "__main__":
    run_main(main)
