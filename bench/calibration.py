"""Benchmark: one calibration pass's labels per image, the scale-trial path against merging every trial.

`fit_calibration` tries each of `SCALES` on one class for every fit (K folds + all): S x T label maps per
image. The general path (`fit.merged_labels`) merges the members and takes the argmax over every class for
each trial weighting; `calibrate.scale_trial_labels` merges once per fit and decides each trial by one
comparison. Both are followed by the confusion matrix each trial needs. Random member probabilities at
the oof store's size, upsampled to a photo's size; medians over repeats, the paths taking turns.

    python bench/calibration.py
    python bench/calibration.py --height 480 --width 640 --classes 6 --members 2 --folds 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from harness import median_seconds
from pipeline.ensemble.calibrate import SCALES, scale_trial_labels
from pipeline.ensemble.fit import merged_labels
from pipeline.metrics import confusion_matrix_torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--stored", type=int, default=128, help="side of the stored OOF probabilities")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--folds", type=int, default=3, help="K: the fits are the K folds' and all folds'")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(0)
    shape, n_classes, n_members = (args.height, args.width), args.classes, args.members
    stored = (n_classes, args.stored, args.stored)
    member = lambda: torch.rand(stored, generator=generator).softmax(0)  # noqa: E731
    images = [[member() for _ in range(n_members)] for _ in range(args.images)]
    truth = torch.randint(0, n_classes, shape, generator=generator).to(torch.uint8)
    n_fits = args.folds + 1
    fits = np.random.default_rng(0).dirichlet(np.ones(n_members), size=(n_fits, n_classes)).transpose(0, 2, 1)
    c = 1
    trial_scales = np.ones((n_fits, len(SCALES), n_classes))
    trial_scales[:, :, c] = SCALES
    trials = torch.from_numpy((fits[:, None] * trial_scales[:, :, None, :]).astype(np.float32))
    flat = trials.reshape(-1, n_members, n_classes)

    def score(labels_of) -> None:
        for probs in images:
            for labels in labels_of(probs):
                confusion_matrix_torch(truth, labels, n_classes)

    seconds = median_seconds(
        {
            "general": lambda: score(lambda probs: merged_labels(probs, flat, shape)),
            "scale trials": lambda: score(lambda probs: scale_trial_labels(probs, shape, trials, c)),
        },
        args.repeats,
    )
    per_image = {name: s / args.images for name, s in seconds.items()}
    print(
        f"{args.height}x{args.width}, {n_classes} classes, {n_members} members, {n_fits} fits x "
        f"{len(SCALES)} scales = {n_fits * len(SCALES)} label maps per image, one thread"
    )
    for name, s in per_image.items():
        print(f"  {name:<13} {s * 1000:8.1f} ms per image")
    print(f"scale trials vs general: {per_image['general'] / per_image['scale trials']:.2f}x faster")


if __name__ == "__main__":
    main()
