"""Benchmark: peak memory of the predict stage on one 4000x3000 photo vs a 400x300 one, native-size output.

Both photos are predicted at the same model input (crop geometry: short side `--short-side`, so both
become 341x256 at the default), so the difference in peak RSS is the cost of producing, validating and
writing a submission at the photo's own size: decoding it, the strip-wise resize + argmax
(`geometry.resize_argmax`), RLE rows at 12 Mpixel. Without strips the native-size probabilities alone
would take classes x 4000 x 3000 x 4 bytes (504 MiB for 11 classes). Runs `stages/predict.py` in a child
process per photo (a randomly initialised checkpoint; figures are memory, not accuracy).

    python bench/native.py [--size 4000x3000] [--short-side 256] [--classes 11] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from harness import predict_stage_rss
from pipeline.config import AugmentParams, ModelParams
from pipeline.models import build_model, checkpoint_state, save_checkpoint

MB = 2**20


def make_project(work: Path, sizes: list[tuple[int, int]], n_classes: int, short_side: int) -> None:
    """A photo and a test json per (width, height), one fold checkpoint and params.yaml."""
    rng = np.random.default_rng(0)
    classes = ["background"] + [f"class {k}" for k in range(1, n_classes)]
    categories = [{"id": k, "name": name} for k, name in enumerate(classes[1:], start=1)]
    (work / "data").mkdir(parents=True, exist_ok=True)
    for width, height in sizes:
        name = f"{width}x{height}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(work / "data" / name)
        images = [{"id": 1, "file_name": name, "height": height, "width": width}]
        (work / "data" / f"{width}x{height}.json").write_text(
            json.dumps({"images": images, "categories": categories})
        )
    model_params = ModelParams(arch="Unet", encoder="resnet18")
    augment = AugmentParams(size=256, resize="crop", short_side=short_side, hflip=0.5)
    model = build_model(model_params, n_classes)
    save_checkpoint(
        work / "models/fold0/best.pt", checkpoint_state(model, model_params, classes, augment, 0, 0.0, 0)
    )
    params = {
        "split": {"n_splits": 2},
        "train": {"folds": [0]},
        "predict": {"tta": "auto", "batch_size": 1, "num_workers": 0},
        "submission": {"format": "rle", "size": None},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))


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
            flags = ["--models", "models", "--root", "data", "--test-json", f"data/{w}x{h}.json"]
            flags += ["--train-json", f"data/{w}x{h}.json", "--out", f"sub_{w}x{h}.csv"]
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
