"""Stage `predict`: every (model, fold) with its TTA, merged with the fitted weights, into a submission
and the test probabilities."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.config import load_params
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import probabilities_writer
from pipeline.ensemble.fit import read_weights
from pipeline.errors import UserError, run_main
from pipeline.evaluation.sidecar import describe, write_sidecar
from pipeline.evaluation.submission import SubmissionWriter, validate_submission
from pipeline.inference.infer import (
    Member,
    inference_device,
    load_ensemble,
    output_shape,
    predict_members,
    probabilities_to_mask,
    resolve_tta,
    window_overlap_of,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True, help="folder holding <model>/fold<k>/best.pt")
    parser.add_argument("--weights", type=Path, required=True, help="the ensemble stage's weights JSON")
    parser.add_argument("--root", type=Path, required=True, help="images are read from ROOT/file_name")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument(
        "--probabilities", type=Path, required=True, help="the merged test probabilities (.npz) to write"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    predict, submission = params.predict, params.submission
    manifest = read_manifest(args.manifest)
    fitted = read_weights(args.weights, manifest.classes)

    members = []
    for name in fitted.members:
        paths = [args.models / name / f"fold{k}" / "best.pt" for k in fitted.folds]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            raise UserError(
                f"{missing}: checkpoint of ensemble member '{name}' not found (run its train stage)"
            )
        folds = load_ensemble(paths)
        if folds.classes != manifest.classes:
            raise UserError(f"{paths[0]}: classes {folds.classes} differ from the data's {manifest.classes}")
        members.append(Member(name, folds, resolve_tta(predict.tta, folds.augments)))
    print("members: " + ", ".join(f"{m.name} (TTA {m.tta})" for m in members))
    if predict.sliding_window:
        print(f"sliding window: each member's training size, overlap {predict.window_overlap}")

    test = manifest.test
    probabilities = predict_members(
        members,
        torch.tensor(fitted.weights, dtype=torch.float32),
        args.root,
        test,
        predict.scales,
        predict.batch_size,
        predict.num_workers,
        inference_device(),
        predict.amp,
        window_overlap_of(predict),
    )
    n_models = sum(len(m.folds.models) for m in members)
    progress = tqdm(probabilities, desc=f"predict ({n_models} models)", total=len(test), unit="image")
    # Validate before the files take their final names: with an invalid submission neither file lands.
    with atomic_path(args.out) as tmp, probabilities_writer(args.probabilities, manifest.classes) as store:
        with SubmissionWriter(tmp, submission.format, manifest.n_classes, submission.rle_order) as writer:
            for index, probs in progress:
                mask = probabilities_to_mask(probs, output_shape(test[index], submission.size))
                writer.write(test[index].file_name, mask)
                store(test[index].file_name, probs)
        problems = validate_submission(tmp, manifest.test_set(), submission.size)
        if problems:
            raise UserError(
                f"{args.out}: invalid submission ({len(problems)} problems), first: {problems[0]}"
            )
    # How the CSV is encoded, which it cannot say itself (validate and score read it).
    params_sha256 = hashlib.sha256(args.params.read_bytes()).hexdigest()
    encoding = describe(
        args.out, submission.format, submission.rle_order, submission.size, manifest.classes, params_sha256
    )
    sidecar = write_sidecar(args.out, encoding)
    rows = f"{len(test)} images, {writer.rows} rows ({submission.format})"
    print(f"wrote {args.out}: {rows}; how it is encoded: {sidecar}")
    print(f"wrote {args.probabilities}: their merged probabilities (python -m pipeline teacher freezes them)")


if __name__ == "__main__":
    run_main(main)
