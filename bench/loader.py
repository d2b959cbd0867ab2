"""Benchmark: training images per second per CPU core through the full input pipeline.

JPEG + mask decoding, the training augmentations of one model recipe of params.yaml (--model, default
the first of its `models`; its augment section, at --size), the rarity-weighted elastic step and batch
collation, through `build_train_loader` with num_workers=0 on one pinned core, on demo images generated
at 512 px. Prints the median images/s over passes (target >= 40) and a per-step breakdown in ms per image,
without and with the boundary weight map (train.boundary_*: instance map decoded and augmented with the
mask, weights computed per item; --boundary-w0 0 leaves that row out).

    python bench/loader.py [--images 48] [--size 512] [--batch-size 8] [--repeats 3] [--params params.yaml]
                           [--model NAME] [--boundary-w0 10] [--boundary-sigma 5] [--class-balance]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from harness import demo_training_data, pin_to_one_core
from pipeline.config import AugmentParams, load_overlay
from pipeline.data.images import (
    image_path,
    instance_map_path,
    mask_relpath,
    read_image,
    read_instance_map,
    read_mask,
)
from pipeline.data.loaders import normalize
from pipeline.errors import run_main
from pipeline.training.dataset import SegmentationDataset, build_train_loader
from pipeline.training.fold_data import training_set
from pipeline.training.weightmap import BoundaryWeighting

TARGET_IMAGES_PER_S = 40.0


def images_per_second(
    dataset: SegmentationDataset, weights: np.ndarray | None, args: argparse.Namespace
) -> float:
    loader = build_train_loader(dataset, args.batch_size, num_workers=0, sample_weights=weights)
    rates = []
    for _ in range(args.repeats):
        start, seen = time.perf_counter(), 0
        for batch in loader:  # (images, masks) or (images, masks, weights)
            seen += len(batch[0])
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def breakdown(dataset: SegmentationDataset, batch_size: int) -> dict[str, float]:
    """Mean ms per image of each step, run one after another on every image."""
    boundary = dataset.boundary
    steps = dict.fromkeys(
        ["decode image + mask", "augment", "elastic (at its p)", "normalise + collate"], 0.0
    )
    if boundary is not None:
        steps = {"decode instance map": 0.0, **steps, "weight map": 0.0}
    outputs = []
    for name in dataset.file_names:
        t0 = time.perf_counter()
        image = read_image(image_path(dataset.root, name))
        mask = read_mask(dataset.masks_dir / mask_relpath(name))
        t1 = time.perf_counter()
        extra = {}
        if boundary is not None:
            extra["masks"] = [read_instance_map(instance_map_path(dataset.masks_dir, name))]
        t2 = time.perf_counter()
        out = dataset.transform(image=image, mask=mask, **extra)
        t3 = time.perf_counter()
        extra = {"masks": list(out["masks"])} if extra else {}
        outputs.append(dataset.elastic(image=out["image"], mask=out["mask"], **extra))
        t4 = time.perf_counter()
        steps["decode image + mask"] += t1 - t0
        if boundary is not None:
            steps["decode instance map"] += t2 - t1
        steps["augment"] += t3 - t2
        steps["elastic (at its p)"] += (t4 - t3) * float(np.mean(dataset.elastic_p))
    t5 = time.perf_counter()
    items = []
    for o in outputs:
        item = [normalize(o["image"]), torch.from_numpy(o["mask"].astype(np.int64))]
        if boundary is not None:
            t = time.perf_counter()
            item.append(
                torch.from_numpy(boundary.weights(o["masks"][0] if "masks" in o else None, o["mask"]))
            )
            steps["weight map"] += time.perf_counter() - t
        items.append(item)
    for i in range(0, len(items), batch_size):
        default_collate(items[i : i + batch_size])
    steps["normalise + collate"] = time.perf_counter() - t5 - steps.get("weight map", 0.0)
    return {k: v / len(outputs) * 1e3 for k, v in steps.items()}


def recipe_augment(path: Path, model: str | None) -> tuple[str, AugmentParams]:
    """(name, augment section) of recipe `model` (or the first) of the params file; the defaults if the
    file does not exist."""
    if not path.is_file():
        if model is not None:
            raise SystemExit(f"--model {model}: {path} not found")
        return f"defaults ({path} not found)", AugmentParams()
    params = load_overlay(path)
    recipe = params.recipe(model or next(iter(params.models)))
    return recipe.name, recipe.augment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="training size (the demo images are 512 px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipes' params file")
    parser.add_argument("--model", help="the recipe whose augment section to use (default: the first)")
    parser.add_argument(
        "--boundary-w0", type=float, default=10.0, help="train.boundary_w0 of the second row (0: no row)"
    )
    parser.add_argument("--boundary-sigma", type=float, default=5.0, help="train.boundary_sigma (px)")
    parser.add_argument("--class-balance", action="store_true", help="train.boundary_class_balance")
    args = parser.parse_args()
    pin_to_one_core()
    recipe, base = recipe_augment(args.params, args.model)
    params = base.model_copy(update=dict(size=args.size))

    rows: dict[str, tuple[float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"generating {args.images} demo images at 512 px ...")
        names, presence = demo_training_data(Path(tmp), args.images, 512)
        dataset, weights = training_set(params, Path(tmp) / "demo", names, Path(tmp) / "masks", presence)
        rows["without weight maps"] = (
            images_per_second(dataset, weights, args),
            breakdown(dataset, args.batch_size),
        )
        if args.boundary_w0 > 0:
            boundary = BoundaryWeighting(
                args.boundary_w0, args.boundary_sigma, args.class_balance, presence.shape[1]
            )
            weighted = SegmentationDataset(
                dataset.root,
                dataset.file_names,
                dataset.masks_dir,
                dataset.transform,
                dataset.elastic,
                dataset.elastic_p,
                boundary=boundary,
            )
            label = f"with weight maps (w0 {args.boundary_w0:g}, sigma {args.boundary_sigma:g}" + (
                ", class balance)" if args.class_balance else ")"
            )
            rows[label] = images_per_second(weighted, weights, args), breakdown(weighted, args.batch_size)

    print(
        f"{args.images} images 512 px -> {args.size} px, batch {args.batch_size}, one core, num_workers=0; "
        f"augment of recipe {recipe}"
    )
    mean_p = dataset.elastic_p.mean()
    print(f"elastic: {params.elastic_impl}, mean p {mean_p:.2f}; oversample: {params.oversample}")
    target = f"target >= {TARGET_IMAGES_PER_S:.0f}"
    for label, (rate, steps) in rows.items():
        print(f"{label}:")
        for name, ms in steps.items():
            print(f"  {name:<24}{ms:>7.2f} ms/image")
        print(f"  {'sum':<24}{sum(steps.values()):>7.2f} ms/image")
        print(f"  loader: {rate:.1f} images/s per core (median of {args.repeats} passes; {target})")


if __name__ == "__main__":
    run_main(main)
