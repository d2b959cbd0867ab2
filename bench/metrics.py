"""Benchmark: confusion-matrix accumulation, pipeline.metrics against sklearn, plus the torch path.

Label maps are 512x512 uint8 with 11 classes (filled ellipses), predictions are the truth shifted and
partly relabelled. Each method accumulates one matrix over all images; figures are medians over
repeats (methods take turns within a repeat), per image. Target: sklearn / ours >= 5.

    python bench/metrics.py
    python bench/metrics.py --images 32 --repeats 20
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import cv2
import numpy as np
import sklearn.metrics
import torch

from harness import median_seconds
from pipeline import metrics

N_CLASSES = 11


def label_map(rng: np.random.Generator, size: int) -> np.ndarray:
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 8))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(size // 20, size // 4, 2))
        label = int(rng.integers(1, N_CLASSES))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, label, -1)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads", type=int, help="torch CPU threads (default: torch's); 1 avoids spin on busy hosts"
    )
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    rng = np.random.default_rng(args.seed)
    truths = [label_map(rng, args.size) for _ in range(args.images)]
    preds = []
    for truth in truths:
        pred = np.roll(truth, int(rng.integers(1, 9)), axis=1)
        pred[rng.random(pred.shape) < 0.02] = int(rng.integers(0, N_CLASSES))
        preds.append(pred)
    labels = np.arange(N_CLASSES)

    def ours() -> np.ndarray:
        return sum(metrics.confusion_matrix(t, p, N_CLASSES) for t, p in zip(truths, preds, strict=True))

    def sklearn_cm() -> np.ndarray:
        return sum(
            sklearn.metrics.confusion_matrix(t.ravel(), p.ravel(), labels=labels)
            for t, p in zip(truths, preds, strict=True)
        )

    # numpy and sklearn take turns; the torch paths run apart, because torch's CPU worker threads keep
    # spinning for a while after each op and would slow whatever runs next on a small machine.
    groups: list[dict[str, Callable[[], object]]] = [{"ours (numpy)": ours, "sklearn": sklearn_cm}]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        # Argmax output is int64 on the device already; the transfer is not part of the metric.
        t_tensors = [torch.from_numpy(t).long().to(device) for t in truths]
        p_tensors = [torch.from_numpy(p).long().to(device) for p in preds]

        def torch_cm(device: str = device, ts: list = t_tensors, ps: list = p_tensors) -> np.ndarray:
            cm = sum(metrics.confusion_matrix_torch(t, p, N_CLASSES) for t, p in zip(ts, ps, strict=True))
            if device == "cuda":
                torch.cuda.synchronize()
            return cm.cpu().numpy()

        groups.append({f"ours (torch {device}, {torch.get_num_threads()} threads)": torch_cm})

    reference = sklearn_cm()
    for name, fn in (item for group in groups for item in group.items()):
        assert np.array_equal(np.asarray(fn()), reference), f"{name} disagrees with sklearn"

    seconds = {name: s for group in groups for name, s in median_seconds(group, args.repeats).items()}
    per_image = {name: s * 1e3 / args.images for name, s in seconds.items()}
    print(f"{args.images} images of {args.size}x{args.size}, {N_CLASSES} classes; ms per image (median)")
    for name, ms in per_image.items():
        print(f"  {name:32} {ms:8.2f} ms   sklearn / this = {per_image['sklearn'] / ms:6.1f}x")
    speedup = per_image["sklearn"] / per_image["ours (numpy)"]
    verdict = "ok" if speedup >= 5 else "MISSED"
    print(f"numpy path vs sklearn: {speedup:.1f}x faster (target >= 5x): {verdict}")


if __name__ == "__main__":
    main()
