"""Stage `oof@<model>-<fold>`: predict the fold's held-out images with its best.pt; store probabilities."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params
from pipeline.data.folds import held_out_mask, read_folds
from pipeline.data.manifest import read_manifest
from pipeline.errors import run_main
from pipeline.inference.infer import inference_device
from pipeline.inference.oof import write_oof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the (model, fold)'s best.pt")
    parser.add_argument("--fold", type=int, required=True, help="the held-out fold")
    parser.add_argument("--root", type=Path, required=True, help="folder of the images' file_names")
    parser.add_argument("--manifest", type=Path, required=True, help="the masks stage's manifest JSON")
    parser.add_argument("--folds", type=Path, required=True, help="folds CSV (image_id,fold)")
    parser.add_argument("--out", type=Path, required=True, help="probabilities file (.npz) to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    predict = load_params(args.params).predict

    manifest = read_manifest(args.manifest)
    fold_of = read_folds(args.folds, manifest.train_names(), args.manifest)
    out = held_out_mask(manifest.train_names(), fold_of, args.fold)
    images = [image for image, held in zip(manifest.train, out, strict=True) if held]
    tta = write_oof(args.checkpoint, images, args.root, predict, inference_device(), args.out)
    window = f", sliding window (overlap {predict.window_overlap})" if predict.sliding_window else ""
    print(f"{args.out}: {len(images)} held-out images, TTA {tta} (predict.tta: {predict.tta}){window}")


if __name__ == "__main__":
    run_main(main)
