"""A set of mixed sizes and aspect ratios (640x480, 480x640, 1024x768) through the real stages, crop mode,
with two models that see the images at different scales."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Run, tiny_params, write_params
from PIL import Image

from pipeline.data.geometry import Geometry
from pipeline.data.images import mask_relpath, read_mask
from pipeline.data.probstore import read_probabilities

SIZES = [(480, 640), (640, 480), (768, 1024)]  # (height, width): 640x480, 480x640 and 1024x768 photos
# As a Roboflow export: an id-0 supercategory no annotation uses, named like a real class.
CATEGORIES = [{"id": 0, "name": "can"}, {"id": 1, "name": "can"}, {"id": 2, "name": "bottle"}]

# The tiny config, cropped from each photo's short side, scored at each image's own size.
MIXED = {
    "augment": {"resize": "crop", "short_side": 96, "vflip": 0.0},
    "model": {"decoder_channels": None},
    "train": {"batch_size": 2},
    "predict": {"batch_size": 2, "tta": "auto"},
    "submission": {"size": None},
    "data": {
        "root": "data/photos",
        "train_json": "data/photos/train.json",
        "test_json": "data/photos/test.json",
        "test_truth_json": "data/photos/test_truth.json",
    },
}
# Two recipes whose inference shapes differ for every image (short side 96 and 128): the ensemble merges
# their probabilities and scores them at each image's own size.
MODELS = {
    "unet": {"model": {"decoder_channels": [32, 16, 16, 8, 8]}},
    "fpn": {"model": {"arch": "FPN"}, "augment": {"short_side": 128}},
}
SHORT_SIDE = {"unet": 96, "fpn": 128}


def _write_set(root: Path, name: str, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """n photos cycling through SIZES, each with a can (rectangle) and a bottle (triangle) on noise;
    -> (COCO images, COCO annotations)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        height, width = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        w, h = width // 4, height // 4
        pixels[y0 : y0 + h, x0 : x0 + w] = (200, 40, 40)
        file_name = f"{name}/{i:02d}.jpg"
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / file_name, quality=90)
        images.append({"id": i, "file_name": file_name, "height": height, "width": width})
        can = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        bottle = [width - 10, height - 10, width - 10 - w, height - 10, width - 10, height - 10 - h]
        for k, (category, polygon) in enumerate([(1, can), (2, bottle)]):
            # No iscrowd, area or bbox: what labelme-style exports write.
            annotations.append(
                {"id": 2 * i + k, "image_id": i, "category_id": category, "segmentation": [polygon]}
            )
    return images, annotations


@pytest.mark.slow
def test_mixed_sizes_train_predict_and_score_at_native_size(dvc_project: Path, run: Run) -> None:
    work = dvc_project
    data = work / "data" / "photos"
    data.mkdir(parents=True)
    train_images, train_annotations = _write_set(data, "train", 6, seed=1)
    test_images, test_annotations = _write_set(data, "test", 3, seed=2)
    sets = {
        "train": {"images": train_images, "annotations": train_annotations},
        "test": {"images": test_images},
        "test_truth": {"images": test_images, "annotations": test_annotations},
    }
    for name, content in sets.items():
        (data / f"{name}.json").write_text(json.dumps({**content, "categories": CATEGORIES}))

    params = tiny_params(MIXED, {"models": MODELS})
    write_params(work / "params.yaml", params)

    repro = run(["dvc", "repro", "evaluate", "leaderboard"], work)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    # The unused id-0 category is reported once and kept, so class indexes do not shift.
    assert repro.stdout.count("category id 0 'can' is used by no annotation") == 1

    # Each model's out-of-fold probabilities, every training image in exactly one fold, at the shape the
    # model sees it: the short side scaled to the model's own short_side, the aspect ratio kept.
    n_classes = len(CATEGORIES) + 1
    for model, short_side in SHORT_SIDE.items():
        geometry = Geometry(mode="crop", size=64, short_side=short_side)
        stored = {}
        for fold in (0, 1):
            oof = read_probabilities(work / "oof" / model / f"fold{fold}.npz")
            stored |= {name: oof.probabilities(i) for i, name in enumerate(oof.file_names)}
        assert sorted(stored) == sorted(image["file_name"] for image in train_images)
        for image in train_images:
            probs = stored[image["file_name"]]
            assert probs.shape == (n_classes, *geometry.inference_shape(image["height"], image["width"]))
            assert probs.sum(dim=0).sub(1).abs().max() < 0.02  # probabilities, up to the uint8 rounding
    # The ensemble's out-of-fold labels, which evaluate scores, at each training image's own size.
    for image in train_images:
        fold_pngs = list((work / "ensemble" / "oof").glob(f"fold*/{mask_relpath(image['file_name'])}"))
        assert len(fold_pngs) == 1
        assert read_mask(fold_pngs[0]).shape == (image["height"], image["width"])

    submission = work / "submissions/submission.csv"
    validate = ["-m", "pipeline", "validate", str(submission), "--test", str(data / "test.json")]
    valid = run([sys.executable, *validate, "--size", "native"], work)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    board = json.loads((work / "metrics/leaderboard.json").read_text())
    assert 0.0 <= board["miou"] <= 1.0
    cv = json.loads((work / "metrics/cv.json").read_text())
    details = json.loads((work / "reports/cv.json").read_text())
    assert details["n_images"] == 6 and 0.0 <= cv["oof_miou"] <= 1.0
    assert details["oof_miou"] == cv["oof_miou"] and set(cv["models"]) == set(MODELS)
