"""Test-time inference: TTA, multi-scale, sliding-window and fold ensembling that average probabilities,
streamed by batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import ttach
from torch import nn

from pipeline.config import PredictParams
from pipeline.data import records
from pipeline.data.geometry import SIZE_MULTIPLE, Geometry, resize_argmax, resize_bilinear
from pipeline.data.loaders import ImageDataset, build_inference_loader
from pipeline.ensemble.merge import merge_probabilities
from pipeline.errors import UserError
from pipeline.inference.tiling import SlidingWindow
from pipeline.models import checkpoints as model_io

TTA_TRANSFORMS: dict[str, Callable[[], ttach.Compose]] = {
    "none": lambda: ttach.Compose([]),  # one identity transform
    "hflip": lambda: ttach.Compose([ttach.HorizontalFlip()]),  # identity, hflip: 2 passes
    "vflip": lambda: ttach.Compose([ttach.VerticalFlip()]),  # identity, vflip: 2 passes
    "flips": ttach.aliases.flip_transform,  # identity, hflip, vflip, both: 4 passes
    "d4": ttach.aliases.d4_transform,  # the 8 symmetries of the square: 8 passes
}
# The training augmentation (augment.<key> > 0) each TTA set needs: a pass through a symmetry the model
# never saw in training is an out-of-distribution prediction averaged into the good ones (on a real
# street-photo set trained with vflip 0: test mIoU 0.289 with flips TTA, 0.364 with none).
TTA_NEEDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "hflip": ("hflip",),
    "vflip": ("vflip",),
    "flips": ("hflip", "vflip"),
    "d4": ("hflip", "rot90"),  # ttach's d4: rotations by 0/90/180/270, each with and without hflip
}
# `auto` picks the largest set whose needs every model's training met, in this order of preference.
_AUTO_ORDER = ("d4", "flips", "hflip", "vflip", "none")


def resolve_tta(name: str, augments: Sequence[Mapping[str, Any]]) -> str:
    """The TTA set to run for `predict.tta` = `name`, given each model's training augmentation.

    "auto" becomes the largest set of symmetries that every model was trained with; a named set that
    needs a symmetry some model never saw (augment.<key> == 0) is a `UserError` naming both keys.
    augments: the `augment` params each checkpoint records.
    """
    if name == "auto":
        return next(n for n in _AUTO_ORDER if all(_trained_with(a, TTA_NEEDS[n]) for a in augments))
    if name not in TTA_NEEDS:
        raise UserError(f"params: predict.tta '{name}' is unknown (valid: auto, {', '.join(TTA_NEEDS)})")
    for augment in augments:
        missing = next((key for key in TTA_NEEDS[name] if not augment.get(key, 0) > 0), None)
        if missing is not None:
            raise UserError(
                f"params: predict.tta '{name}' averages {_SYMMETRY[missing]} passes, but the model was "
                f"trained with augment.{missing} = {augment.get(missing, 0)}: it never saw them "
                f"(use predict.tta: auto, or train with augment.{missing} > 0)"
            )
    return name


_SYMMETRY = {"hflip": "horizontally flipped", "vflip": "vertically flipped", "rot90": "90-degree rotated"}


def _trained_with(augment: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return all(augment.get(key, 0) > 0 for key in keys)


def inference_device() -> torch.device:
    """The device the inference stages (oof, predict) run on: the first visible GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_tta(name: str) -> ttach.Compose:
    """The ttach transform set called `name` (a key of TTA_TRANSFORMS; resolve "auto" first)."""
    try:
        return TTA_TRANSFORMS[name]()
    except KeyError:
        raise KeyError(f"unknown TTA {name!r}; valid: {', '.join(TTA_TRANSFORMS)}") from None


class SoftmaxOutput(nn.Module):
    """A segmentation model that returns float32 class probabilities (softmax over dim 1) instead of logits.

    ttach merges whatever the model returns; wrapping the model in this makes it merge probabilities, so
    TTA and fold ensembling average the same quantity (the mean of softmaxes, not softmax of mean logits).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float().softmax(dim=1)


def window_overlap_of(predict: PredictParams) -> float | None:
    """The sliding-window overlap `predict` asks for: `predict.window_overlap` when
    `predict.sliding_window` is on, else None (whole-image inference)."""
    return predict.window_overlap if predict.sliding_window else None


def build_member(
    model: nn.Module, transforms: ttach.Compose, tile: int, window_overlap: float | None, tile_batch: int
) -> nn.Module:
    """`model` as an ensemble member: probabilities averaged over the TTA `transforms`; with a
    `window_overlap`, run that way on `tile` x `tile` windows (`tile_batch` at a time) and blended
    (`tiling.SlidingWindow`), so TTA applies to each window."""
    member = ttach.SegmentationTTAWrapper(SoftmaxOutput(model), transforms, merge_mode="mean")
    return member if window_overlap is None else SlidingWindow(member, tile, window_overlap, tile_batch)


def scaled_size(size: int, scale: float) -> int:
    """`size * scale` rounded to the nearest multiple of 32, halves up, never below 32."""
    if scale <= 0:
        raise UserError(f"predict.scales: scales must be positive, got {scale}")
    return max(SIZE_MULTIPLE, math.floor(size * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def normalise_weights(weights: Sequence[float] | None, n_models: int) -> list[float]:
    """Per-model ensemble weights summing to 1; None means equal weights."""
    if weights is None:
        return [1.0 / n_models] * n_models
    if len(weights) != n_models:
        raise UserError(f"ensemble weights: {len(weights)} weights for {n_models} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(
            f"predict.fold_weights: weights must be >= 0 with a positive sum, got {list(weights)}"
        )
    total = float(sum(weights))
    return [w / total for w in weights]


def ensemble_probabilities(
    members: Sequence[nn.Module], weights: Sequence[float], images: torch.Tensor, scales: Sequence[float]
) -> torch.Tensor:
    """Weighted mean of the members' probabilities over all scales, at the input resolution.

    images: (B, 3, H, W) normalised, H and W multiples of 32. members return (B, C, h, w) probabilities
    for (B, 3, h, w) inputs (SoftmaxOutput, possibly inside a ttach wrapper). Each scale resizes the images
    bilinearly to sides `scaled_size(side, scale)` and the probabilities back to (H, W) before they are
    averaged. weights: one per member, summing to 1. Returns (B, C, H, W) float32.
    """
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    for member, weight in zip(members, weights, strict=True):
        for scale in scales:
            size = (scaled_size(height, scale), scaled_size(width, scale))
            scaled = images if size == (height, width) else resize_bilinear(images, size)
            probs = member(scaled)
            if probs.shape[-2:] != (height, width):
                probs = resize_bilinear(probs, (height, width))
            share = weight / len(scales)
            total = probs.float() * share if total is None else total.add_(probs, alpha=share)
    assert total is not None, "no members or no scales"
    return total


def predict_probabilities(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None,
    dataset: ImageDataset,
    tta: str,
    scales: Sequence[float],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: bool = True,
    window_overlap: float | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (dataset index, (C, h, w) float32 probabilities on `device`) per image, in dataset order.

    (h, w) is the image's `geometry.inference_shape` (padding cropped off). Probabilities are averaged
    over TTA transforms (`tta`, a resolved name: see `resolve_tta`), scales and models (weighted by
    `weights`, normalised; None = equal). The models are moved to `device` and put in eval mode. `amp`:
    autocast on CUDA (bf16, else fp16); CPU always runs float32. Nothing is kept between batches, so
    memory is bounded by `batch_size`, not by the size of the dataset. `window_overlap`: None predicts
    each (scaled) image whole; a fraction in [0, 1) predicts it in windows of the training size
    (`dataset.geometry.size`) overlapping by that fraction, `batch_size` windows at a time, blended
    (`tiling.SlidingWindow`; at each scale, after scaling).
    """
    if not models or not scales:
        raise ValueError("predict_probabilities needs at least one model and one scale")
    shares = normalise_weights(weights, len(models))
    transforms = build_tta(tta)
    tile = dataset.geometry.size
    members = [
        build_member(m.to(device).eval(), transforms, tile, window_overlap, batch_size) for m in models
    ]
    loader = build_inference_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        # The no-grad/autocast contexts live in a function, not around the `yield`: a generator suspended
        # inside them would leak inference mode into the caller's code between batches.
        images = batch.images.to(device, non_blocking=True)
        probs = _predict_batch(members, shares, images, scales, amp)
        for index, (h, w), image_probs in zip(batch.indexes, batch.shapes, probs, strict=True):
            yield index, image_probs[:, :h, :w]


@dataclass(frozen=True)
class Member:
    """One ensemble member at inference: its fold models and how they see an image."""

    name: str
    folds: Ensemble  # the member's fold models (and refit model), classes and geometry
    tta: str  # resolved TTA name
    shares: list[float] | None = None  # each model's share of the member's probabilities; None: equal


def predict_members(
    members: Sequence[Member],
    weights: torch.Tensor,
    root: str | Path,
    images: Sequence[records.ImageRecord],
    scales: Sequence[float],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: bool = True,
    window_overlap: float | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (index into `images`, (C, h, w) merged probabilities) per image, in order, streaming.

    Each member averages its fold models (by its `shares`) with its own TTA at its own geometry
    (`predict_probabilities`; with `window_overlap`, in sliding windows of the member's own training size);
    the members' probabilities are then merged with `weights` (M, C) at the largest member's shape
    (`merge_probabilities`). One image per member is held at a time (plus each member's batch).
    """
    streams = [
        predict_probabilities(
            member.folds.models,
            member.shares,
            ImageDataset(root, images, member.folds.geometry),
            member.tta,
            scales,
            batch_size,
            num_workers,
            device,
            amp,
            window_overlap,
        )
        for member in members
    ]
    for outputs in zip(*streams, strict=True):
        index = outputs[0][0]
        assert all(other[0] == index for other in outputs), "members yield images in the same order"
        yield index, merge_probabilities([probs for _, probs in outputs], weights.to(device))


def output_shape(record: records.ImageRecord, out_size: int | None) -> tuple[int, int]:
    """(H, W) of a prediction: out_size x out_size, or the image's own size when out_size is None."""
    return (record.height, record.width) if out_size is None else (out_size, out_size)


def probabilities_to_mask(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) probabilities -> uint8 (H, W) argmax labels at `size` = (H, W), resized bilinearly first."""
    return resize_argmax(probs, size).cpu().numpy()


def labelled_masks(
    probabilities: Iterable[tuple[int, torch.Tensor]],
    images: Sequence[records.ImageRecord],
    out_size: int | None,
    to_labels: Callable[[torch.Tensor, tuple[int, int]], np.ndarray] = probabilities_to_mask,
    store: Callable[[str, torch.Tensor], None] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(file name, uint8 mask at `output_shape`) for each (index into `images`, probabilities) of a
    prediction stream, as a submission is written: `to_labels(probs, (H, W))` labels them (argmax by
    default; the ensemble's `LabelDecision.labels` in predict). `store`, if given, also receives each
    image's (file name, probabilities) as they come."""
    for index, probs in probabilities:
        record = images[index]
        if store is not None:
            store(record.file_name, probs)
        yield record.file_name, to_labels(probs, output_shape(record, out_size))


@dataclass(frozen=True)
class Ensemble:
    """Fold models rebuilt from their checkpoints, with what they were trained on."""

    models: list[nn.Module]  # eval mode, on the CPU
    classes: list[str]  # background first, shared by every model
    geometry: Geometry  # shared by every model
    augments: list[dict[str, Any]]  # each model's training augmentation (for `resolve_tta`)


def load_ensemble(checkpoint_paths: Sequence[str | Path]) -> Ensemble:
    """Rebuild each fold's model from its own checkpoint.

    Every checkpoint must agree on the class list and the input geometry; a mismatch is a UserError
    naming the offending file.
    """
    if not checkpoint_paths:
        raise ValueError("load_ensemble needs at least one checkpoint")
    models: list[nn.Module] = []
    augments: list[dict[str, Any]] = []
    first_path, classes, geometry = None, None, None
    for path in checkpoint_paths:
        ckpt = model_io.load_checkpoint(path)
        models.append(model_io.model_from_checkpoint(ckpt, source=str(path)))  # checks the keys it needs
        for key in ("geometry", "augment"):
            if key not in ckpt:
                raise UserError(
                    f"{path}: checkpoint has no '{key}' (an older trashseg wrote it; re-run its train stage)"
                )
        augments.append(dict(ckpt["augment"]))
        ckpt_geometry = Geometry.from_dict(ckpt["geometry"])
        if first_path is None:
            first_path, classes, geometry = path, list(ckpt["classes"]), ckpt_geometry
        elif list(ckpt["classes"]) != classes:
            raise UserError(f"{path}: classes {list(ckpt['classes'])} differ from {first_path}'s {classes}")
        elif ckpt_geometry != geometry:
            raise UserError(f"{path}: input geometry {ckpt_geometry} differs from {first_path}'s {geometry}")
    assert classes is not None and geometry is not None
    return Ensemble(models, classes, geometry, augments)


def _predict_batch(
    members: Sequence[nn.Module],
    shares: Sequence[float],
    images: torch.Tensor,
    scales: Sequence[float],
    amp: bool,
) -> torch.Tensor:
    with torch.inference_mode(), _autocast(images.device, amp):
        return ensemble_probabilities(members, shares, images, scales)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA if `amp` (bf16 where supported, else fp16); CPU inference stays float32."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
