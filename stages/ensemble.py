"""Stage `ensemble`: fit the models' weights on their stored OOF probabilities; cross-validated OOF labels."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import load_params
from pipeline.data.images import mask_relpath, read_mask, write_mask
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import read_probabilities
from pipeline.ensemble.fit import (
    FittedWeights,
    fit_ensemble,
    named_weights,
    scores,
    write_ensemble_labels,
    write_weights,
)
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
    average, fitting = params.metric.average, params.ensemble
    fit = fit_ensemble(members, truth, len(classes), fitting.grid_step, fitting.per_class, average)

    with atomic_dir(args.labels) as staging:

        def write(k: int, file_name: str, mask: np.ndarray) -> None:
            write_mask(staging / f"fold{folds[k]}" / mask_relpath(file_name), mask)

        write_ensemble_labels(members, fit.fold_weights, shapes.__getitem__, write)
    ensemble = scores(fit.cross_validated, folds, classes)
    report = {
        "average": average,  # of every mIoU and IoU below, and the one the weights maximise
        "ensemble": ensemble,
        # Optimistic: the same folds chose and judge these weights. The CV score above is the honest one.
        "in_sample_miou": scores(fit.in_sample, folds, classes)["oof_miou"],
        "models": {name: scores(fit.members.take([m]), folds, classes) for m, name in enumerate(names)},
        "weights": named_weights(fit.weights, names, classes),
        "fold_weights": {
            str(k): named_weights(w, names, classes) for k, w in zip(folds, fit.fold_weights, strict=True)
        },
    }
    write_json(args.report, report)
    write_weights(args.weights, FittedWeights(names, folds, classes, np.asarray(fit.weights).tolist()))
    singles = ", ".join(f"{name} {r['oof_miou']:.4f}" for name, r in report["models"].items())
    print(f"ensemble OOF mIoU {ensemble['oof_miou']:.4f} ({average} average, cross-validated); {singles}")
    print(f"weights: {report['weights']}")


if __name__ == "__main__":
    run_main(main)
