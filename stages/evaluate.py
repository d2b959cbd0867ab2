"""Stage `evaluate`: out-of-fold mIoU over all training images, the confusion plot, worst-image overlays."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import coco
from pipeline.atomic import write_json
from pipeline.config import load_params
from pipeline.errors import run_main
from pipeline.evaluate import (
    N_WORST,
    cv_summary,
    evaluate_oof,
    worst_images,
    write_confusion_csv,
    write_worst_overlays,
)
from pipeline.folds import read_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--oof", type=Path, required=True, help="folder of fold{k}/ out-of-fold label PNGs")
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image truth mask PNGs")
    parser.add_argument("--folds", type=Path, required=True, help="folds CSV (image_id,fold)")
    parser.add_argument("--train-json", type=Path, required=True, help="COCO json of the training images")
    parser.add_argument("--root", type=Path, required=True, help="images are read from ROOT/file_name")
    parser.add_argument("--metrics", type=Path, required=True, help="cross-validation metrics JSON to write")
    parser.add_argument("--confusion", type=Path, required=True, help="confusion plot CSV (actual,predicted)")
    parser.add_argument("--worst", type=Path, required=True, help="folder for the worst images' overlays")
    parser.add_argument("--n-worst", type=int, default=N_WORST, help="how many worst images to draw")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)

    data = params.data
    train = coco.load_coco(args.train_json, args.root, data.on_bad_annotation, unused=data.unused_categories)
    folds = read_folds(args.folds, train)
    # Out-of-fold predictions are written at each image's own size, and scored there.
    size = None
    result = evaluate_oof(args.oof, args.masks, folds, train.n_classes, params.train.folds, size)
    summary = cv_summary(result, train.classes)
    write_json(args.metrics, summary)
    write_confusion_csv(args.confusion, result.confusion, train.classes)
    worst = worst_images(result.scores, args.n_worst)
    write_worst_overlays(args.worst, worst, args.root, args.oof, args.masks, train.classes, size)

    print(
        f"OOF mIoU {summary['oof_miou']:.4f} over {summary['n_images']} images "
        f"(folds {summary['fold_miou_mean']:.4f} +- {summary['fold_miou_std']:.4f}; "
        f"{summary['n_skipped']} images of untrained folds skipped)"
    )


if __name__ == "__main__":
    run_main(main)
