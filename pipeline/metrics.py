"""Confusion matrices and IoU for semantic segmentation, over a whole dataset or averaged per image."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

# The metric's two definitions (params `metric.average`). "dataset" sums one confusion matrix over every
# image and divides once: a 10-pixel object weighs a thousandth of a 10,000-pixel one. "image" (cohort 1's
# competition page) scores each image alone, the mean IoU over the classes in its truth or its prediction,
# then averages the images: every image weighs the same, and a false positive on an image without the
# class costs that image a whole class's IoU of 0.
Average = Literal["dataset", "image"]
AVERAGES: tuple[Average, ...] = ("dataset", "image")


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """Count (truth, prediction) class pairs over all pixels.

    truth, pred: integer arrays of the same shape (any shape: HxW, NxHxW, flat) with classes in
    [0, n_classes); truth pixels equal to `ignore_index` are left out (they may hold any value).
    Returns an int64 (C, C) matrix, rows = truth, columns = prediction. Raises ValueError on a value
    out of range.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    _check_integer(truth, "truth")
    _check_integer(pred, "prediction")
    truth, pred = truth.reshape(-1), pred.reshape(-1)
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, pred = truth[keep], pred[keep]
    _check_range(truth, n_classes, "truth")
    _check_range(pred, n_classes, "prediction")
    # One bincount over n*truth + pred fills the whole matrix in a single pass; the index is widened
    # first so small dtypes (uint8 masks) cannot overflow, and built in place to spare two temporaries.
    index = truth.astype(np.intp)
    index *= n_classes
    np.add(index, pred, out=index, casting="unsafe")  # safe here: pred is range-checked; uint64 would refuse
    counts = np.bincount(index, minlength=n_classes * n_classes)
    return counts.astype(np.int64, copy=False).reshape(n_classes, n_classes)


def confusion_matrix_torch(
    truth: torch.Tensor, pred: torch.Tensor, n_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """`confusion_matrix` on tensors, computed where they live (GPU during validation).

    Returns an int64 (C, C) tensor on the inputs' device. The range check costs one host sync.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {tuple(truth.shape)} != prediction shape {tuple(pred.shape)}")
    for tensor, name in ((truth, "truth"), (pred, "prediction")):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class indexes, got {tensor.dtype}")
    truth, pred = truth.reshape(-1).long(), pred.reshape(-1).long()
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, pred = truth[keep], pred[keep]
    if truth.numel():
        # Both ranges in one host sync (a `.item()` per check would stall the GPU four times).
        low_t, high_t, low_p, high_p = torch.stack([*torch.aminmax(truth), *torch.aminmax(pred)]).tolist()
        for low, high, name in ((low_t, high_t, "truth"), (low_p, high_p, "prediction")):
            if low < 0 or high >= n_classes:
                raise ValueError(f"{name} holds class {low if low < 0 else high}, outside [0, {n_classes})")
    counts = torch.bincount(truth * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN) from a (C, C) confusion matrix (rows truth).

    Returns float64 (C,), NaN for a class absent from both truth and prediction (no evidence either
    way), so `mean_iou` can skip it. A torch matrix must be moved to the CPU first.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    return image_ious(cm[None])[0]


def mean_iou(cm: np.ndarray) -> float:
    """Mean of `iou_per_class` over classes present in truth or prediction; NaN if none are."""
    return float(nanmean(iou_per_class(cm)))


def image_mious(cms: np.ndarray) -> np.ndarray:
    """Per-image mIoU from per-image confusion matrices (N, C, C) -> float64 (N,): for each image the mean
    IoU over the classes in its truth or its prediction (NaN for an image with no counted pixel)."""
    return nanmean(image_ious(cms), axis=1)


def image_ious(cms: np.ndarray) -> np.ndarray:
    """Per-image, per-class IoU = TP / (TP + FP + FN) from per-image confusion matrices (N, C, C) ->
    float64 (N, C), NaN for a class in neither that image's truth nor its prediction."""
    cms = _stack(cms).astype(np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    union = cms.sum(axis=1) + cms.sum(axis=2) - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


def score(cms: np.ndarray, average: Average) -> float:
    """mIoU of a set of images from their per-image confusion matrices (N, C, C), by `average`:
    "dataset": `mean_iou` of their sum; "image": the mean of `image_mious` (images with no counted pixel,
    e.g. all ignored, are skipped). NaN for no images."""
    cms = _stack(cms)
    if checked_average(average) == "dataset":
        return mean_iou(cms.sum(axis=0))
    return float(nanmean(image_mious(cms)))


def class_ious(cms: np.ndarray, average: Average) -> np.ndarray:
    """Per-class IoU (C,) by `average`: "dataset": `iou_per_class` of the summed matrix; "image": each
    class's IoU averaged over the images whose truth or prediction holds it (NaN where none does)."""
    cms = _stack(cms)
    if checked_average(average) == "dataset":
        return iou_per_class(cms.sum(axis=0))
    return nanmean(image_ious(cms), axis=0)


def nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """float64 mean over `axis` skipping NaNs; NaN, without numpy's warning, where nothing is left (no
    class present, no image): there "no evidence" is the answer, not a mistake."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis, dtype=np.float64)


def checked_average(average: str) -> str:
    """`average` if it names one of AVERAGES, else a ValueError listing them."""
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r} (valid: {', '.join(AVERAGES)})")
    return average


def _stack(cms: np.ndarray) -> np.ndarray:
    cms = np.asarray(cms)
    if cms.ndim != 3 or cms.shape[1] != cms.shape[2]:
        raise ValueError(f"per-image confusion matrices must have shape (N, C, C), got {cms.shape}")
    return cms


def _check_integer(array: np.ndarray, name: str) -> None:
    if not (np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must hold integer class indexes, got dtype {array.dtype}")


def _check_range(values: np.ndarray, n_classes: int, name: str) -> None:
    if not values.size:
        return
    low = values.min() if np.issubdtype(values.dtype, np.signedinteger) else 0
    high = values.max()
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds class {bad}, outside [0, {n_classes})")
