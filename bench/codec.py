"""Benchmark: pipeline.evaluation.rle encode/decode against pycocotools' C codec, and submission row writing.

Masks are blobby (filled ellipses and polygons, like trash objects), not noise. pycocotools gets the
Fortran-ordered uint8 array it needs, prepared outside the timing (its best case); ours is timed on
that same array and on the C-ordered bool mask an argmax comparison (`labels == k`) gives. Figures are
medians over repeats of a pass over all masks, per mask. Target: ours / pycocotools <= 1.0.

    python bench/codec.py                      # 256 and 512, small defaults
    python bench/codec.py --masks 200 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from harness import median_seconds
from pipeline.evaluation import rle
from pipeline.evaluation.submission import SubmissionWriter


def blobby_labels(rng: np.random.Generator, size: int, n_classes: int, n_objects: int) -> np.ndarray:
    """uint8 size x size label map: filled ellipses and polygons of random classes over background."""
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(n_objects):
        label = int(rng.integers(1, n_classes))
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            axes = tuple(int(v) for v in rng.integers(size // 20, size // 4, 2))
            cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, label, -1)
        else:
            radius = rng.uniform(size / 20, size / 4, 7)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            points = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
            cv2.fillPoly(labels, [points.astype(np.int32)], label)
    return labels


def bench_size(size: int, n_masks: int, repeats: int, rng: np.random.Generator) -> None:
    label_maps = [blobby_labels(rng, size, 11, int(rng.integers(2, 7))) for _ in range(n_masks)]
    masks = [labels == labels.max() for labels in label_maps]  # one class's C-ordered bool mask
    fortran = [np.asfortranarray(m.astype(np.uint8)) for m in masks]
    texts = [rle.encode(m) for m in masks]
    cocos = [mask_utils.encode(f) for f in fortran]
    for text, coco_rle, mask in zip(texts, cocos, masks, strict=True):  # same masks, both codecs agree
        assert np.array_equal(rle.decode(text, mask.shape), mask)
        assert np.array_equal(mask_utils.decode(coco_rle).astype(bool), mask)
    runs = statistics.mean(len(t.split()) / 2 for t in texts)

    def each(fn: Callable[[Any], object], items: list) -> Callable[[], None]:
        return lambda: [fn(item) for item in items]

    seconds = median_seconds(
        {
            "coco_encode": each(mask_utils.encode, fortran),
            "ours_encode_f": each(rle.encode, fortran),
            "ours_encode_c": each(rle.encode, masks),
            "coco_decode": each(mask_utils.decode, cocos),
            "ours_decode": each(lambda text: rle.decode(text, (size, size)), texts),
        },
        repeats,
    )
    us = {name: value * 1e6 / n_masks for name, value in seconds.items()}

    print(f"\n{size}x{size}: {n_masks} masks, {runs:.0f} runs per mask on average (us per mask, median)")
    print(f"  {'':34} {'ours':>8} {'pycocotools':>12} {'ratio':>7}  target <= 1.0")
    rows = [
        ("encode, same Fortran uint8 array", us["ours_encode_f"], us["coco_encode"]),
        ("encode, C-ordered bool (argmax==k)", us["ours_encode_c"], us["coco_encode"]),
        ("decode (text -> mask)", us["ours_decode"], us["coco_decode"]),
    ]
    for name, ours, theirs in rows:
        verdict = "ok" if ours <= theirs else "MISSED"
        print(f"  {name:34} {ours:8.1f} {theirs:12.1f} {ours / theirs:7.2f}  {verdict}")

    with tempfile.TemporaryDirectory() as tmp:

        def writer(fmt: str) -> Callable[[], None]:
            def write_all() -> None:
                with SubmissionWriter(Path(tmp) / f"{fmt}.csv", fmt, 11) as out:
                    for i, labels in enumerate(label_maps):
                        out.write(f"{i}.jpg", labels)

            return write_all

        seconds = median_seconds({fmt: writer(fmt) for fmt in ("rle", "dense")}, max(3, repeats // 3))
    for fmt, what in (("rle", "10 class rows"), ("dense", "1 PredictionString row")):
        print(f"  write {fmt:5} submission, {what:22}: {seconds[fmt] * 1e3 / n_masks:7.2f} ms per image")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--masks", type=int, default=40, help="masks per size")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes over all masks (median taken)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for size in args.sizes:
        bench_size(size, args.masks, args.repeats, rng)


if __name__ == "__main__":
    main()
