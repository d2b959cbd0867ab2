"""Stage `predict`: ensemble every trained fold with TTA over the test images into a validated submission."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import coco
from pipeline.atomic import atomic_path
from pipeline.config import load_params
from pipeline.dataset import ImageDataset
from pipeline.errors import UserError, run_main
from pipeline.infer import load_ensemble, predict_images, resolve_tta
from pipeline.submission import SubmissionWriter, validate_submission


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True, help="folder holding fold{k}/best.pt")
    parser.add_argument("--root", type=Path, required=True, help="images are read from ROOT/file_name")
    parser.add_argument("--test-json", type=Path, required=True, help="COCO json listing the test images")
    parser.add_argument("--train-json", type=Path, required=True, help="training json: decides the classes")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)

    checkpoints = [args.models / f"fold{k}" / "best.pt" for k in params.train.folds]
    for fold, path in zip(params.train.folds, checkpoints, strict=True):
        if not path.is_file():
            raise UserError(f"{path}: checkpoint of fold {fold} not found (in train.folds; run train@{fold})")
    ensemble = load_ensemble(checkpoints)
    models, classes = ensemble.models, ensemble.classes
    data = params.data
    test = coco.load_with_training_classes(
        args.test_json, args.train_json, args.root, data.on_bad_annotation, data.unused_categories
    )
    if test.classes != classes:
        raise UserError(f"{args.test_json}: classes {test.classes} differ from the models' {classes}")

    predict, submission = params.predict, params.submission
    tta = resolve_tta(predict.tta, ensemble.augments)
    print(f"TTA: {tta} (predict.tta: {predict.tta})")
    masks = predict_images(
        models,
        weights=predict.fold_weights,
        dataset=ImageDataset(args.root, test.images, ensemble.geometry),
        out_size=submission.size,
        tta=tta,
        scales=predict.scales,
        batch_size=predict.batch_size,
        num_workers=predict.num_workers,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        amp=predict.amp,
    )
    progress = tqdm(masks, desc=f"predict ({len(models)} folds)", total=len(test.images), unit="image")
    # Validate before the file takes its final name: an invalid submission never lands at --out.
    with atomic_path(args.out) as tmp:
        with SubmissionWriter(tmp, submission.format, len(classes), submission.rle_order) as writer:
            for index, mask in progress:
                writer.write(test.images[index].file_name, mask)
        problems = validate_submission(tmp, test, submission.size)
        if problems:
            raise UserError(
                f"{args.out}: invalid submission ({len(problems)} problems), first: {problems[0]}"
            )
    print(f"wrote {args.out}: {len(test.images)} images, {writer.rows} rows ({submission.format})")


if __name__ == "__main__":
    run_main(main)
