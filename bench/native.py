"""Benchmark: peak memory of the predict stage on one 4000x3000 photo vs a 400x300 one, native-size output.

Both photos are predicted at the same model input (crop geometry: short side `--short-side`, so both
become 341x256 at the default), so the difference in peak RSS is the cost of producing, validating and
writing a submission at the photo's own size: decoding it, the strip-wise resize + argmax
(`geometry.resize_argmax`), RLE rows at 12 Mpixel. Without strips the native-size probabilities alone
would take classes x 4000 x 3000 x 4 bytes (504 MiB for 11 classes). Runs `stages/predict.py` in a child
process per photo, as the pipeline's predict stage runs it: one ensemble member (models/model/fold0/best.pt,
a randomly initialised checkpoint; figures are memory, not accuracy) with weight 1 in a fitted-weights
JSON, and a manifest per photo listing it as the only test image.

    python bench/native.py [--size 4000x3000] [--short-side 256] [--classes 11] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from harness import predict_stage_rss
from pipeline.config import AugmentParams, ModelParams, complete
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.data.records import ImageRecord
from pipeline.ensemble.fit import FittedWeights, write_weights
from pipeline.models.checkpoints import checkpoint_state, save_checkpoint
from pipeline.models.factory import build_model

MB = 2**20
MEMBER = "model"  # the recipe name params.yaml without a `models` section gets


def make_project(work: Path, sizes: list[tuple[int, int]], n_classes: int, short_side: int) -> None:
    """A photo and a manifest per (width, height), one member's fold checkpoint, weights.json, params.yaml."""
    rng = np.random.default_rng(0)
    classes = ["background"] + [f"class {k}" for k in range(1, n_classes)]
    (work / "data").mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        name = f"{width}x{height}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(work / "data" / name)
        photo = ImageRecord(id=1, file_name=name, height=height, width=width)
        manifest = Manifest(
            classes, list(range(1, n_classes)), [], np.zeros((0, n_classes), bool), [photo], {}
        )
        write_manifest(work / "data" / f"manifest_{width}x{height}.json", manifest)
    model_params = ModelParams(arch="Unet", encoder="resnet18")
    augment = AugmentParams(size=256, resize="crop", short_side=short_side, hflip=0.5)
    model = build_model(model_params, n_classes)
    save_checkpoint(
        work / f"models/{MEMBER}/fold0/best.pt",
        checkpoint_state(model, model_params, classes, augment, 0, 0.0, 0),
    )
    write_weights(work / "weights.json", FittedWeights([MEMBER], [0], classes, [[1.0] * n_classes]))
    params = {
        "split": {"n_splits": 2},
        "ensemble": {"folds": [0]},
        "predict": {"tta": "auto", "batch_size": 1, "num_workers": 0},
        "submission": {"format": "rle", "size": None},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(complete(params), sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the large photo")
    parser.add_argument("--short-side", type=int, default=256, help="the model's inference short side")
    parser.add_argument("--classes", type=int, default=11, help="classes including background")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temp folder)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    sizes = [(width // 10, height // 10), (width, height)]

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        make_project(work, sizes, args.classes, args.short_side)
        peaks = {}
        for w, h in sizes:
            flags = ["--models", "models", "--weights", "weights.json", "--root", "data"]
            flags += ["--manifest", f"data/manifest_{w}x{h}.json", "--out", f"sub_{w}x{h}.csv"]
            flags += ["--probabilities", f"probabilities_{w}x{h}.npz", "--refits", "refits"]
            peaks[(w, h)] = predict_stage_rss(work, flags, work / f"predict_{w}x{h}.log")
    (small, large) = sizes
    print(
        f"predict stage, 1 photo, {args.classes} classes, hflip TTA, model input short side "
        f"{args.short_side}, native-size RLE submission (peak RSS, MB):"
    )
    for w, h in sizes:
        imports, peak = peaks[(w, h)]
        print(f"  {w}x{h}: {peak / MB:7.0f} total, {(peak - imports) / MB:6.0f} above the imports")
    extra = peaks[large][1] - peaks[small][1]
    dense = args.classes * width * height * 4
    print(
        f"{width}x{height} costs {extra / MB:.0f} MB more than {small[0]}x{small[1]} "
        f"(native-size probabilities at once would be {dense / MB:.0f} MB)"
    )


if __name__ == "__main__":
    main()
