"""Stage `split`: assign every training image to a fold, stratified by the classes its mask holds."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_json
from pipeline.config import load_params
from pipeline.data.folds import fold_class_counts, make_folds
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError, run_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--out", type=Path, required=True, help="folds CSV to write (image_id,fold)")
    parser.add_argument("--counts", type=Path, required=True, help="per-fold per-class image counts (JSON)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params).split

    manifest = read_manifest(args.manifest)
    file_names = manifest.train_names()
    if len(file_names) < params.n_splits:
        raise UserError(
            f"{args.manifest}: {len(file_names)} training images, fewer than split.n_splits={params.n_splits}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = make_folds(manifest.presence, params.n_splits, params.seed, manifest.classes)
    for warning in caught:
        print(f"WARNING: {warning.message}", file=sys.stderr)
    with atomic_path(args.out) as tmp:
        pd.DataFrame({"image_id": file_names, "fold": folds}).to_csv(tmp, index=False)

    counts = fold_class_counts(manifest.presence, folds, manifest.classes)
    print(counts.assign(images=np.bincount(folds, minlength=params.n_splits)).to_string())
    write_json(args.counts, {fold: {k: int(v) for k, v in row.items()} for fold, row in counts.iterrows()})


if __name__ == "__main__":
    run_main(main)
