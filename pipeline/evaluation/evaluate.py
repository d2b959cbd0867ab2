"""Out-of-fold evaluation: per-image confusion matrices, either mIoU average, plot data, worst images drawn.

The confusion plot is for DVC's `confusion_normalized` template (x: predicted, y: actual). DVC's
templates count CSV rows, and one row per pixel would be ~10^7 rows, so each actual class gets exactly
`rows_per_class` rows, split over predicted classes in proportion to the pixel counts (largest-remainder
rounding). The row-normalised matrix the template draws is then exact to 1 / rows_per_class (0.1% for
1000 rows), and the file stays a few hundred kB. Raw pixel counts are not preserved; the IoUs in
reports/cv.json come from the exact per-image matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline import metrics
from pipeline.atomic import atomic_dir, atomic_path
from pipeline.data.images import image_path, mask_relpath, read_image, read_mask
from pipeline.errors import UserError

CONFUSION_ROWS_PER_CLASS = 1000
N_WORST = 8
# Class colours by index (background black), chosen to stay distinguishable; cycled past 21 classes.
PALETTE = np.array(
    [
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
        (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
        (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    dtype=np.uint8,
)  # fmt: skip
OVERLAY_ALPHA = 0.6
# Panels are drawn with their longest side in this range: small submission sizes are enlarged to be
# legible, large native photos reduced to keep the PNGs small.
PANEL_SIDE_RANGE = (256, 384)


@dataclass(frozen=True)
class ImageScore:
    """One image's out-of-fold score: mIoU over the classes present in its truth or prediction."""

    image_id: str
    fold: int
    miou: float


@dataclass
class OofResult:
    """Everything `evaluate_oof` counted."""

    # int64 (N, C, C), rows truth: one matrix per evaluated image (in `scores` order), so both averages
    # of `metrics.score` come from them; N x C x C counts stay small next to the masks they summarise.
    image_confusion: np.ndarray
    scores: list[ImageScore]  # per evaluated image, in folds.csv order
    n_skipped: int  # images of folds not in ensemble.folds (no OOF prediction expected)

    @property
    def confusion(self) -> np.ndarray:
        """int64 (C, C) summed over every evaluated image."""
        return self.image_confusion.sum(axis=0)


def evaluate_oof(
    oof_dir: str | Path,
    masks_dir: str | Path,
    folds: Mapping[str, int],
    n_classes: int,
    trained_folds: Sequence[int],
    size: int | None,
) -> OofResult:
    """Score every image's out-of-fold prediction against its truth mask, streaming one image at a time.

    The prediction of image `i` in fold `k` is `oof_dir/fold{k}/mask_relpath(i)`, a label PNG at
    `size` x `size` (or the image's own size when `size` is None); the truth `masks_dir/mask_relpath(i)`
    is resized to it with nearest neighbour, as `submission.score_submission` does, so CV and
    leaderboard measure the same thing. Images of folds not in `trained_folds` are skipped and counted.
    """
    trained = set(trained_folds)
    cms: list[np.ndarray] = []
    scores: list[ImageScore] = []
    n_skipped = 0
    for image_id, fold in tqdm(folds.items(), desc="out-of-fold", unit="image"):
        if fold not in trained:
            n_skipped += 1
            continue
        truth, pred = read_pair(oof_dir, masks_dir, image_id, fold, size)
        try:
            cm = metrics.confusion_matrix(truth, pred, n_classes)
        except ValueError as exc:
            raise UserError(
                f"{oof_path(oof_dir, image_id, fold)}: {exc} (truth or prediction is stale)"
            ) from None
        cms.append(cm)
        scores.append(ImageScore(image_id, fold, metrics.mean_iou(cm)))
    if not scores:
        raise UserError(f"{oof_dir}: no out-of-fold predictions to score (ensemble.folds: {sorted(trained)})")
    return OofResult(np.stack(cms), scores, n_skipped)


def oof_path(oof_dir: str | Path, image_id: str, fold: int) -> Path:
    """Where the label of `image_id` (held out in fold `fold`) is: the ensemble stage's layout."""
    return Path(oof_dir) / f"fold{fold}" / mask_relpath(image_id)


def read_pair(
    oof_dir: str | Path, masks_dir: str | Path, image_id: str, fold: int, size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) uint8 masks of one image at the prediction's size (checked against `size`)."""
    pred_path = oof_path(oof_dir, image_id, fold)
    if not pred_path.is_file():
        raise UserError(f"{pred_path}: out-of-fold prediction not found (re-run the ensemble stage)")
    pred = read_mask(pred_path)
    truth = read_mask(Path(masks_dir) / mask_relpath(image_id))
    expected = truth.shape if size is None else (size, size)
    if pred.shape != expected:
        raise UserError(
            f"{pred_path}: prediction is {pred.shape[0]}x{pred.shape[1]}, expected "
            f"{expected[0]}x{expected[1]} (written by an older trashseg? re-run the ensemble stage)"
        )
    if truth.shape != pred.shape:
        truth = cv2.resize(truth, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_NEAREST)
    return truth, pred


def cv_summary(result: OofResult, classes: Sequence[str], average: metrics.Average) -> dict[str, Any]:
    """The reports/cv.json dict, each score by `average`: OOF mIoU of every evaluated image, per-fold mIoU
    (mean, population std), per-class IoU, and the average's name."""
    folds = np.array([s.fold for s in result.scores])
    # Only folds that have images: a trained fold without any (a hand-edited folds.csv) is left out,
    # not scored NaN and averaged.
    fold_miou = {int(k): metrics.score(result.image_confusion[folds == k], average) for k in np.unique(folds)}
    values = np.array(list(fold_miou.values()))
    iou = metrics.class_ious(result.image_confusion, average)
    return {
        "average": average,
        "oof_miou": metrics.score(result.image_confusion, average),
        "fold_miou_mean": float(np.mean(values)),
        "fold_miou_std": float(np.std(values)),
        "folds": {str(k): v for k, v in fold_miou.items()},
        "iou": dict(zip(classes, iou.tolist(), strict=True)),
        "n_images": len(result.scores),
        "n_skipped": result.n_skipped,
    }


def quantise_rows(cm: np.ndarray, rows_per_class: int) -> np.ndarray:
    """Scale each non-empty row of a (C, C) count matrix to sum to exactly `rows_per_class`.

    Largest-remainder rounding: each cell gets floor(share), then the cells with the largest remainders
    one more, so row proportions are within 1 / rows_per_class of the true ones. Empty rows stay zero.
    Returns int64 (C, C).
    """
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm * rows_per_class, totals, out=np.zeros_like(cm), where=totals > 0)
    counts = np.floor(shares).astype(np.int64)
    for row in np.flatnonzero(totals[:, 0] > 0):
        short = rows_per_class - counts[row].sum()
        remainders = shares[row] - counts[row]
        counts[row, np.argsort(-remainders, kind="stable")[:short]] += 1
    return counts


def confusion_rows(cm: np.ndarray, classes: Sequence[str], rows_per_class: int) -> pd.DataFrame:
    """(actual, predicted) class-name rows whose counts are `quantise_rows(cm, rows_per_class)`."""
    counts = quantise_rows(cm, rows_per_class)
    actual, predicted = np.nonzero(counts)
    repeats = counts[actual, predicted]
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {"actual": np.repeat(names[actual], repeats), "predicted": np.repeat(names[predicted], repeats)}
    )


def write_confusion_csv(
    path: str | Path, cm: np.ndarray, classes: Sequence[str], rows_per_class: int = CONFUSION_ROWS_PER_CLASS
) -> None:
    """Write `confusion_rows` as CSV (columns actual,predicted), atomically."""
    with atomic_path(path) as tmp:
        confusion_rows(cm, classes, rows_per_class).to_csv(tmp, index=False)


def worst_images(scores: Sequence[ImageScore], n: int) -> list[ImageScore]:
    """The `n` lowest-mIoU images, worst first (ties by image_id; images with no score come last)."""
    return sorted(scores, key=lambda s: (math.isnan(s.miou), s.miou, s.image_id))[:n]


def write_worst_overlays(
    out_dir: str | Path,
    worst: Sequence[ImageScore],
    root: str | Path,
    oof_dir: str | Path,
    masks_dir: str | Path,
    classes: Sequence[str],
    size: int | None,
) -> list[Path]:
    """Draw image | truth | prediction for each image of `worst` to out_dir/<rank>_<stem>.png.

    The folder is replaced as a whole, so no overlay of an earlier run survives beside the new ones.
    Returns the written paths.
    """
    out_dir = Path(out_dir)
    names = []
    with atomic_dir(out_dir) as staging:
        for rank, score in enumerate(worst, start=1):
            truth, pred = read_pair(oof_dir, masks_dir, score.image_id, score.fold, size)
            image = read_image(image_path(root, score.image_id))
            title = f"#{rank}  {score.image_id}  fold {score.fold}  image mIoU {score.miou:.3f}"
            name = f"{rank:02d}_{PurePosixPath(score.image_id).stem}.png"
            render_overlay(image, truth, pred, classes, title).save(staging / name, format="PNG")
            names.append(name)
    return [out_dir / name for name in names]


def colourise(mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W) class indexes -> uint8 (H, W, 3) RGB with PALETTE (cycled past its length)."""
    return PALETTE[mask % len(PALETTE)]


def render_overlay(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, classes: Sequence[str], title: str
) -> Image.Image:
    """Three panels (image, truth over image, prediction over image) with a title and a class legend.

    image: uint8 (h, w, 3) at any size; truth, pred: uint8 (H, W) at the same size, whose aspect the
    panels keep, scaled into PANEL_SIDE_RANGE (bilinear for the photo, nearest for the masks).
    """
    height, width = pred.shape
    low, high = PANEL_SIDE_RANGE
    scale = min(max(max(height, width), low), high) / max(height, width)
    panel = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL (width, height)
    photo = np.asarray(Image.fromarray(image).resize(panel, Image.Resampling.BILINEAR), dtype=np.float32)
    panels = [photo.astype(np.uint8)]
    for mask in (truth, pred):
        scaled = np.asarray(Image.fromarray(mask).resize(panel, Image.Resampling.NEAREST))
        blend = photo * (1 - OVERLAY_ALPHA) + colourise(scaled).astype(np.float32) * OVERLAY_ALPHA
        panels.append(np.where(scaled[..., None] > 0, blend, photo).astype(np.uint8))

    font = ImageFont.load_default(size=12)
    line, gap = 16, 4
    present = sorted(set(np.unique(truth).tolist()) | set(np.unique(pred).tolist()))
    legend = _legend_layout(present, classes, font, total_width=3 * panel[0] + 2 * gap)
    legend_rows = 1 + max((row for row, _, _ in legend), default=0)
    canvas = Image.new(
        "RGB", (3 * panel[0] + 2 * gap, 2 * line + panel[1] + legend_rows * line + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black", font=font)
    for k, (array, label) in enumerate(zip(panels, ("image", "truth", "prediction"), strict=True)):
        x = k * (panel[0] + gap)
        draw.text((x + 2, line + 1), label, fill="black", font=font)
        canvas.paste(Image.fromarray(array), (x, 2 * line))
    top = 2 * line + panel[1] + gap
    for row, x, label in legend:
        colour = tuple(int(c) for c in PALETTE[label % len(PALETTE)])
        y = top + row * line
        draw.rectangle((x, y + 2, x + 10, y + 12), fill=colour, outline="black")
        draw.text((x + 14, y), classes[label], fill="black", font=font)
    return canvas


def _legend_layout(
    labels: Sequence[int], classes: Sequence[str], font: ImageFont.FreeTypeFont, total_width: int
) -> list[tuple[int, int, int]]:
    """(row, x, label) of each legend entry (swatch + name), wrapped to `total_width`."""
    layout, row, x = [], 0, 2
    for label in labels:
        width = 14 + int(font.getlength(classes[label])) + 12
        if x > 2 and x + width > total_width:
            row, x = row + 1, 2
        layout.append((row, x, label))
        x += width
    return layout
