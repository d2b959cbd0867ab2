"""Image geometry: what shape each image is fed to a model at, and predictions resized back to native size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import AugmentParams

# Encoders downsample 5 times, so every side fed to a model must be a multiple of 32.
SIZE_MULTIPLE = 32
# Bytes of float32 probabilities one strip of `resize_argmax` may hold: bounds the memory of a native-size
# argmax whatever the photo's size (a 4000x3000 photo with 11 classes would need 504 MiB at once).
STRIP_BYTES = 32 * 2**20

ResizeMode = Literal["squash", "crop"]


@dataclass(frozen=True)
class Geometry:
    """How a model sees images: the training geometry, recorded in checkpoints and reused for inference.

    squash: every image is resized to size x size, whatever its aspect ratio (training and inference).
    crop: images are scaled so their short side is `short_side` (aspect kept); training takes random
    size x size crops of that, inference runs on the whole scaled image, padded to multiples of 32.
    """

    mode: ResizeMode = "squash"
    size: int = 512
    short_side: int | None = None  # crop mode; None means `size`

    @property
    def scaled_short_side(self) -> int:
        return self.size if self.short_side is None else self.short_side

    def inference_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) an image of `height` x `width` is resized to before padding, for inference."""
        if self.mode == "squash":
            return self.size, self.size
        scale = self.scaled_short_side / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": self.size, "short_side": self.short_side}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Geometry:
        return cls(mode=raw["mode"], size=int(raw["size"]), short_side=raw.get("short_side"))


def padded_shape(height: int, width: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(H, W) rounded up to multiples of `multiple`."""
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def pad_to_multiple(image: np.ndarray, multiple: int = SIZE_MULTIPLE) -> np.ndarray:
    """Pad an (h, w, ...) array at the bottom and right to multiples of `multiple` by reflection.

    Reflection (not zeros) keeps the border context a convolution sees natural; the padded pixels'
    predictions are cropped away. Images smaller than the padding fall back to edge replication.
    """
    height, width = image.shape[:2]
    target_h, target_w = padded_shape(height, width, multiple)
    if (target_h, target_w) == (height, width):
        return image
    pad = [(0, target_h - height), (0, target_w - width)] + [(0, 0)] * (image.ndim - 2)
    mode = "reflect" if target_h - height < height and target_w - width < width else "edge"
    return np.pad(image, pad, mode=mode)


def source_index(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bilinear sampling along one axis as `F.interpolate(align_corners=False)` does it: for every output
    position, the two source indexes and the weight of the second (source = (out + 0.5) * scale - 0.5,
    clamped at 0)."""
    scale = in_size / out_size
    source = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    weight = (source - low).float()
    return low, high, weight


def class_argmax(probs: torch.Tensor) -> torch.Tensor:
    """(C, H, W) scores -> uint8 (H, W) labels: the argmax over classes, the first of equal maxima.

    Through `max`, whose index follows the same first-maximum rule: torch's CPU argmax over the outer
    dimension runs ~8x slower (13 ms against 1.5 ms for 11 x 256 x 256 on 2 cores), and the ensemble
    takes one per candidate weighting and image.
    """
    return probs.max(dim=0).indices.to(torch.uint8)


def resize_argmax(probs: torch.Tensor, size: tuple[int, int], strip_bytes: int = STRIP_BYTES) -> torch.Tensor:
    """(C, h, w) probabilities -> uint8 (H, W) labels: bilinear resize to `size` = (H, W), then argmax.

    The same values as `F.interpolate(probs[None], size, mode="bilinear", align_corners=False)` followed
    by argmax, computed a strip of output rows at a time (columns interpolated per strip too), so the
    temporaries stay near `strip_bytes` for any output size, a 4000x3000 photo included. Returned on
    the device of `probs`.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {tuple(probs.shape)}")
    if tuple(probs.shape[1:]) == tuple(size):
        return class_argmax(probs)
    return confident_argmax(probs, size, strip_bytes)[0]


def confident_argmax(
    probs: torch.Tensor, size: tuple[int, int], strip_bytes: int = STRIP_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h, w) probabilities -> (uint8 (H, W) argmax labels, float32 (H, W) probability of that label),
    after a bilinear resize to `size` = (H, W), in strips as `resize_argmax` (which is its first half).
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (C, h, w), got shape {tuple(probs.shape)}")
    channels, in_h, _ = probs.shape
    out_h, out_w = size
    probs = probs.float()
    strip = max(1, strip_bytes // (4 * channels * out_w * 6))  # ~six (C, strip, W) temporaries
    if strip >= out_h:
        # The whole output fits in one strip: torch's own kernel, several times faster than the gathers.
        resized = F.interpolate(probs[None], size, mode="bilinear", align_corners=False)[0]
        confidence, best = resized.max(dim=0)
        return best.to(torch.uint8), confidence
    rows_low, rows_high, row_weight = source_index(out_h, in_h, probs.device)

    def widen(rows: torch.Tensor) -> torch.Tensor:
        """Source rows `rows`, interpolated along columns to the output width: (C, len(rows), W). torch's
        kernel at an unchanged height is the column interpolation alone (scale 1 samples each row exactly)."""
        picked = probs[:, rows][None]
        return F.interpolate(picked, (picked.shape[2], out_w), mode="bilinear", align_corners=False)[0]

    labels = torch.empty((out_h, out_w), dtype=torch.uint8, device=probs.device)
    confidence = torch.empty((out_h, out_w), dtype=torch.float32, device=probs.device)
    for top in range(0, out_h, strip):
        rows = slice(top, min(out_h, top + strip))
        weight = row_weight[rows][None, :, None]
        blended = widen(rows_low[rows]) * (1 - weight) + widen(rows_high[rows]) * weight
        # max's index is argmax's: the first of equal maxima.
        confidence[rows], best = blended.max(dim=0)
        labels[rows] = best.to(torch.uint8)
    return labels, confidence


def geometry_of(augment: AugmentParams) -> Geometry:
    """The geometry the `augment` params train with, normalised: squash keeps no short side, and crop
    always names one (null means `size`), so equal geometries compare equal."""
    if augment.resize == "squash":
        return Geometry(mode="squash", size=augment.size)
    short_side = augment.size if augment.short_side is None else augment.short_side
    return Geometry(mode="crop", size=augment.size, short_side=short_side)


def build_resize(height: int, width: int | None = None) -> A.BasicTransform:
    """Resize to height x width (default square): area averaging when shrinking (no aliasing), bilinear
    when enlarging; masks always nearest. Training, evaluation and test images all go through this one
    definition."""
    return A.Resize(
        height,
        height if width is None else width,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        area_for_downscale="image",
    )


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, size): bilinear, corners not aligned (how probabilities change resolution)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
