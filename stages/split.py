"""Stage `split`: assign every training image to a fold, stratified by the classes its mask holds."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import coco
from pipeline.atomic import atomic_path, write_json
from pipeline.config import load_params
from pipeline.errors import UserError, run_main
from pipeline.folds import class_presence, fold_class_counts, make_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--masks", type=Path, required=True, help="folder of per-image mask PNGs")
    parser.add_argument("--train-json", type=Path, required=True, help="COCO json of the training images")
    parser.add_argument("--out", type=Path, required=True, help="folds CSV to write (image_id,fold)")
    parser.add_argument("--counts", type=Path, required=True, help="per-fold per-class image counts (JSON)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    all_params = load_params(args.params)
    params = all_params.split

    data = all_params.data
    train = coco.load_coco(args.train_json, on_bad=data.on_bad_annotation, unused=data.unused_categories)
    file_names = [image.file_name for image in train.images]
    if len(file_names) < params.n_splits:
        raise UserError(
            f"{args.train_json}: {len(file_names)} images, fewer than split.n_splits={params.n_splits}"
        )
    presence = class_presence(_read_masks(args.masks, file_names, train), train.n_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = make_folds(presence, params.n_splits, params.seed, train.classes)
    for warning in caught:
        print(f"WARNING: {warning.message}", file=sys.stderr)
    with atomic_path(args.out) as tmp:
        pd.DataFrame({"image_id": file_names, "fold": folds}).to_csv(tmp, index=False)

    counts = fold_class_counts(presence, folds, train.classes)
    print(counts.assign(images=np.bincount(folds, minlength=params.n_splits)).to_string())
    write_json(args.counts, {fold: {k: int(v) for k, v in row.items()} for fold, row in counts.iterrows()})


def _read_masks(masks_dir: Path, file_names: list[str], train: coco.CocoSet) -> Iterator[np.ndarray]:
    for name in tqdm(file_names, desc="reading masks", unit="mask"):
        path = masks_dir / coco.mask_relpath(name)
        mask = coco.read_mask(path)
        if mask.max(initial=0) >= train.n_classes:
            raise UserError(
                f"{path}: holds label {mask.max()}, but {train.path} has {train.n_classes - 1} classes "
                "(re-run the masks stage)"
            )
        yield mask


if __name__ == "__main__":
    run_main(main)
