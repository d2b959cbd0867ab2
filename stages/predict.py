"""Stage `predict`: every (model, fold) with its TTA, merged with the fitted weights, into a submission
and the test probabilities."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import load_params
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import probabilities_writer
from pipeline.ensemble.fit import read_weights
from pipeline.errors import run_main
from pipeline.evaluation.sidecar import describe, write_sidecar
from pipeline.evaluation.submission import write_submission
from pipeline.inference.infer import (
    inference_device,
    labelled_masks,
    predict_members,
    window_overlap_of,
)
from pipeline.inference.members import checkpoints_and_shares, load_members


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
    parser.add_argument(
        "--refits", type=Path, required=True, help="folder of <model>/final.pt (used with refit.enabled)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    predict, submission = params.predict, params.submission
    manifest = read_manifest(args.manifest)
    fitted = read_weights(args.weights, manifest.classes)

    refit = params.refit
    checkpoints, shares = checkpoints_and_shares(args.models, args.refits, fitted, refit)
    members = load_members(checkpoints, manifest.classes, predict.tta, shares)
    print("members: " + ", ".join(f"{m.name} (TTA {m.tta})" for m in members))
    if refit.enabled:
        n = len(fitted.folds)
        print(f"each member's refit model has {refit.weight:g} of its share, its {n} folds the rest")
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
    # The CSV is validated before it takes its name; with an invalid one neither file lands.
    with probabilities_writer(args.probabilities, manifest.classes) as store:
        masks = labelled_masks(progress, test, submission.size, fitted.decision.labels, store)
        rows = write_submission(
            masks, args.out, submission.format, submission.rle_order, manifest.test_set(), submission.size
        )
    # How the CSV is encoded, which it cannot say itself (validate and score read it).
    params_sha256 = hashlib.sha256(args.params.read_bytes()).hexdigest()
    encoding = describe(
        args.out, submission.format, submission.rle_order, submission.size, manifest.classes, params_sha256
    )
    sidecar = write_sidecar(args.out, encoding)
    rows_text = f"{len(test)} images, {rows} rows ({submission.format})"
    print(f"wrote {args.out}: {rows_text}; how it is encoded: {sidecar}")
    print(f"wrote {args.probabilities}: their merged probabilities (python -m pipeline teacher freezes them)")


if __name__ == "__main__":
    run_main(main)
