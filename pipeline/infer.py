"""Test-time inference: TTA, multi-scale and fold ensembling that average probabilities, streamed by batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import ttach
from torch import nn

from pipeline import models as model_io
from pipeline.dataset import ImageDataset, build_eval_loader
from pipeline.errors import UserError

# Encoders downsample 5 times, so every side fed to a model must be a multiple of 32.
SIZE_MULTIPLE = 32

TTA_TRANSFORMS: dict[str, Callable[[], ttach.Compose]] = {
    "none": lambda: ttach.Compose([]),  # one identity transform
    "flips": ttach.aliases.flip_transform,  # identity, hflip, vflip, both: 4 passes
    "d4": ttach.aliases.d4_transform,  # the 8 symmetries of the square
}


def build_tta(name: str) -> ttach.Compose:
    """The ttach transform set called `name` (a key of TTA_TRANSFORMS)."""
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
        raise UserError(f"predict.fold_weights: {len(weights)} weights for {n_models} models")
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
            scaled = images if size == (height, width) else _resize(images, size)
            probs = member(scaled)
            if probs.shape[-2:] != (height, width):
                probs = _resize(probs, (height, width))
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
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (dataset indexes, (B, C, size, size) float32 probabilities on `device`) one batch at a time.

    Probabilities are averaged over TTA transforms, scales and models (weighted by `weights`, normalised;
    None = equal). The models are moved to `device` and put in eval mode. `amp`: autocast on CUDA (bf16,
    else fp16); CPU always runs float32. Nothing is kept between batches, so memory is bounded by
    `batch_size`, not by the size of the dataset.
    """
    if not models or not scales:
        raise ValueError("predict_probabilities needs at least one model and one scale")
    shares = normalise_weights(weights, len(models))
    transforms = build_tta(tta)
    members = [
        ttach.SegmentationTTAWrapper(SoftmaxOutput(m.to(device).eval()), transforms, merge_mode="mean")
        for m in models
    ]
    loader = build_eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    for images, indexes in loader:
        # The no-grad/autocast contexts live in a function, not around the `yield`: a generator suspended
        # inside them would leak inference mode into the caller's code between batches.
        images = images.to(device, non_blocking=True)
        yield indexes.tolist(), _predict_batch(members, shares, images, scales, amp)


def predict_images(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None,
    dataset: ImageDataset,
    out_size: int | None,
    tta: str,
    scales: Sequence[float],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (dataset index, uint8 label mask) per image, in dataset order, streaming batch by batch.

    The mask is `out_size` x `out_size`, or the image's own height x width (from its record) when
    `out_size` is None. Probabilities are resized bilinearly to that size before the argmax, so class
    boundaries are decided at the output resolution rather than upsampled as blocky labels.
    """
    for indexes, probs in predict_probabilities(
        models, weights, dataset, tta, scales, batch_size, num_workers, device, amp
    ):
        for index, image_probs in zip(indexes, probs, strict=True):
            if out_size is None:
                record = dataset.images[index]
                size = (record.height, record.width)
            else:
                size = (out_size, out_size)
            yield index, probabilities_to_mask(image_probs, size)


def probabilities_to_mask(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) probabilities -> uint8 (H, W) argmax labels at `size` = (H, W), resized bilinearly first."""
    if tuple(probs.shape[-2:]) != size:
        probs = _resize(probs[None], size)[0]
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()


def load_ensemble(checkpoint_paths: Sequence[str | Path]) -> tuple[list[nn.Module], list[str], int]:
    """Rebuild each fold's model from its own checkpoint -> (models in eval mode, class names, input size).

    Every checkpoint must agree on the class list and the input size; a mismatch is a UserError naming
    the offending file.
    """
    if not checkpoint_paths:
        raise ValueError("load_ensemble needs at least one checkpoint")
    models: list[nn.Module] = []
    first_path, classes, input_size = None, None, None
    for path in checkpoint_paths:
        ckpt = model_io.load_checkpoint(path)
        models.append(model_io.model_from_checkpoint(ckpt, source=str(path)))  # checks the keys it needs
        if "input_size" not in ckpt:
            raise UserError(f"{path}: not a trashseg checkpoint (missing key 'input_size')")
        if first_path is None:
            first_path, classes, input_size = path, list(ckpt["classes"]), int(ckpt["input_size"])
        elif list(ckpt["classes"]) != classes:
            raise UserError(f"{path}: classes {list(ckpt['classes'])} differ from {first_path}'s {classes}")
        elif int(ckpt["input_size"]) != input_size:
            raise UserError(
                f"{path}: input size {ckpt['input_size']} differs from {first_path}'s {input_size}"
            )
    assert classes is not None and input_size is not None
    return models, classes, input_size


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


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
