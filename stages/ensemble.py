"""Stage `ensemble`: on the stored OOF probabilities, fit the models' weights (then class scales and
post-processing where enabled); the nested ensemble's OOF labels and every step's scores."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import load_params
from pipeline.data.images import mask_relpath, read_mask, write_mask
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import read_probabilities
from pipeline.ensemble.fit import FittedWeights, write_weights
from pipeline.ensemble.steps import decide_on_oof, oof_report, seed_groups
from pipeline.errors import UserError, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--oof", type=Path, required=True, help="folder of <model>/fold<k>.npz probabilities")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image truth mask PNGs")
    parser.add_argument("--weights", type=Path, required=True, help="fitted weights JSON (for predict)")
    parser.add_argument("--report", type=Path, required=True, help="per-model and ensemble scores JSON")
    parser.add_argument("--labels", type=Path, required=True, help="folder for fold<k>/ ensemble OOF labels")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    manifest = read_manifest(args.manifest)
    names, folds, classes = list(params.models), params.ensemble.folds, manifest.classes
    shapes = {image.file_name: (image.height, image.width) for image in manifest.train}

    def truth(file_name: str) -> np.ndarray:
        return read_mask(args.masks / mask_relpath(file_name))

    members = [[read_probabilities(args.oof / name / f"fold{k}.npz") for k in folds] for name in names]
    for stored in (fold for member in members for fold in member):
        if stored.classes != classes:
            raise UserError(f"{stored.path}: classes {stored.classes} differ from {args.manifest}'s (stale?)")
        stray = next((name for name in stored.file_names if name not in shapes), None)
        if stray is not None:
            raise UserError(
                f"{stored.path}: image '{stray}' is not in {args.manifest} (re-run its oof stage)"
            )
    average = params.metric.average

    with atomic_dir(args.labels) as staging:

        def label_path(k: int, file_name: str) -> Path:
            return staging / f"fold{folds[k]}" / mask_relpath(file_name)

        decided = decide_on_oof(
            members,
            truth,
            shapes.__getitem__,
            len(classes),
            params.ensemble,
            average,
            lambda k, name, mask: write_mask(label_path(k, name), mask),
            lambda k, name: read_mask(label_path(k, name)),
            seed_groups([params.models[name] for name in names]) if params.ensemble.tie_seeds else None,
        )
    report = oof_report(decided, names, folds, classes, average)
    write_json(args.report, report)
    fitted = FittedWeights(names, folds, classes, np.asarray(decided.weights).tolist(), decided.decision)
    write_weights(args.weights, fitted)
    singles = ", ".join(f"{name} {r['oof_miou']:.4f}" for name, r in report["models"].items())
    steps = " -> ".join(f"{step} {r['oof_miou']:.4f}" for step, r in report["steps"].items())
    print(f"ensemble OOF mIoU ({average} average, cross-validated): {steps}; models: {singles}")
    print(f"weights: {report['weights']}")


if __name__ == "__main__":
    run_main(main)
