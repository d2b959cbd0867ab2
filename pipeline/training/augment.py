"""Albumentations train/eval pipelines, with a fast elastic deformation weighted towards rare classes."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets

from pipeline.config import AugmentParams
from pipeline.data.geometry import build_resize

Noise = Literal["gaussian", "uniform"]

# Geometric ranges of the random affine step (the classic ShiftScaleRotate defaults, milder rotation:
# photos of trash have no canonical orientation, but large rotations mostly add reflected borders).
AFFINE_SCALE = (0.9, 1.1)
AFFINE_TRANSLATE = (-0.0625, 0.0625)
AFFINE_ROTATE = (-20.0, 20.0)


# ---------------------------------------------------------------------------------------------------------
# Rarity weights: how strongly each image is augmented (elastic) or oversampled.


def rarity_weights(presence: np.ndarray, gamma: float) -> np.ndarray:
    """Per-class rarity weight `w_c = (max_k f_k / f_c) ** gamma`, `f_c` = fraction of images containing c.

    presence: bool (N, C), column 0 is background. Returns float64 (C,) indexed by class: the most
    common foreground class gets 1, rarer classes more; background and classes absent from every image
    get 0 (they can neither raise an image's weight nor divide by zero).
    """
    presence = _check_presence(presence)
    freq = presence.mean(axis=0)
    weights = np.zeros(presence.shape[1])
    freq_fg = freq[1:]
    seen = freq_fg > 0
    if seen.any():
        weights[1:][seen] = (freq_fg[seen].max() / freq_fg[seen]) ** gamma
    return weights


def image_weights(presence: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """Per-image rarity in [0, 1]: the largest weight among the image's classes, min-max scaled.

    Scaling maps the smallest positive class weight (the most common class, 1 from `rarity_weights`) to
    0 and the largest to 1, so an image whose rarest class is the most common one gets 0 and any image
    holding the rarest class gets 1. Dividing by the max instead would leave common images at
    `1 / w_max`, which is not "no extra augmentation". Background-only images get 0. If every class
    weighs the same (one class, equal frequencies or gamma = 0) no image is rarer than another: all 0.

    presence: bool (N, C); class_weights: (C,) as returned by `rarity_weights`. Returns float64 (N,).
    """
    presence = _check_presence(presence)
    class_weights = np.asarray(class_weights, dtype=np.float64)
    if class_weights.shape != (presence.shape[1],):
        raise ValueError(
            f"class_weights has shape {class_weights.shape}, presence has {presence.shape[1]} classes"
        )
    per_image = (presence * class_weights).max(axis=1)  # 0 where no weighted class is present
    positive = class_weights[class_weights > 0]
    if positive.size == 0 or positive.max() == positive.min():
        return np.zeros(len(presence))
    low, high = positive.min(), positive.max()
    return np.where(per_image > 0, (per_image - low) / (high - low), 0.0).clip(0.0, 1.0)


def sampling_weights(presence: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """Per-image oversampling weight: the largest weight among its classes, at least 1.

    An image holding a class that is k times rarer than the most common class is drawn `k ** gamma`
    times as often as a common-class image; background-only images weigh 1 like common ones. Unlike
    `image_weights` this is never 0, so every image can still be drawn. Returns float64 (N,).
    """
    presence = _check_presence(presence)
    return np.maximum((presence * np.asarray(class_weights, dtype=np.float64)).max(axis=1), 1.0)


def elastic_probabilities(presence: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Per-image elastic probability `p_min + (p_max - p_min) * image_weight`, from the rarity weights.

    presence: bool (N, C) of the training images (the fold's training split). Returns float64 (N,).
    """
    weights = image_weights(presence, rarity_weights(presence, params.elastic_gamma))
    return params.elastic_p_min + (params.elastic_p_max - params.elastic_p_min) * weights


def elastic_probability_by_class(
    presence: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Mean elastic probability over the images containing each foreground class (NaN if none do).

    Logged once per fold, it shows how much more often rare classes are deformed than common ones.
    """
    presence = _check_presence(presence)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(class_names) != presence.shape[1] or len(probabilities) != len(presence):
        raise ValueError(
            f"presence {presence.shape}, {len(probabilities)} probabilities and "
            f"{len(class_names)} class names do not match"
        )
    result = {}
    for c in range(1, presence.shape[1]):
        rows = presence[:, c]
        result[class_names[c]] = float(probabilities[rows].mean()) if rows.any() else math.nan
    return result


def _check_presence(presence: np.ndarray) -> np.ndarray:
    presence = np.asarray(presence, dtype=bool)
    if presence.ndim != 2 or presence.shape[1] < 2:
        raise ValueError(f"presence must be (images, classes incl. background), got shape {presence.shape}")
    return presence


# ---------------------------------------------------------------------------------------------------------
# Elastic deformation.
#
# albumentations 2.x ElasticTransform (the reference): per pixel and per axis it draws noise, either
# N(0, 1) divided by the largest |value| of the whole draw ("gaussian", the default) or U(-1, 1)
# ("uniform"); blurs it with a Gaussian of std `sigma` pixels (kernel 8 sigma + 1, border replicate) and
# multiplies by `alpha`: the displacement in pixels. White noise of variance v blurred by a normalised 2-D
# Gaussian has variance v / (4 pi sigma^2), which gives `elastic_displacement_std` below. (Its
# approximate=True mode truncates the kernel to 17x17: for sigma >~ 3 that is nearly a box blur, and its
# displacements are larger than the exact mode's, 2x at sigma 10 and 10x at sigma 50.)
#
# FastElastic produces a field with the same statistics far more cheaply. White noise averaged over a
# cell of `a` pixels has variance v / a, so noise drawn on a grid of cells with that variance and blurred
# by sigma / cell cells has the same spectrum at scales >> cell. With cells of ~sigma / 4 the field is
# smooth over a cell, and a bilinear upsample of it is exact to < 1 % in std.

CELLS_PER_SIGMA = 4.0
# Displacement std (pixels) below which an elastic step is reported as doing nothing visible.
MIN_VISIBLE_DISPLACEMENT = 0.1


def elastic_displacement_std(
    shape: tuple[int, int], alpha: float, sigma: float, noise: Noise = "gaussian"
) -> float:
    """Expected std (pixels) of each displacement component of albumentations' exact ElasticTransform.

    shape: (H, W) of the image the transform sees. Away from the borders; the field's mean is 0.
    """
    return alpha * _noise_std(shape, noise) / (2.0 * math.sqrt(math.pi) * sigma)


def fast_displacement_field(
    shape: tuple[int, int], alpha: float, sigma: float, rng: np.random.Generator, noise: Noise = "gaussian"
) -> np.ndarray:
    """A random smooth displacement field (dx, dy) in pixels, float32 (H, W, 2).

    Same distribution (mean 0, std `elastic_displacement_std`, Gaussian correlation of width `sigma`)
    as albumentations' exact ElasticTransform field, built on a coarse grid and upsampled bilinearly.
    """
    height, width = shape
    cell = max(1.0, sigma / CELLS_PER_SIGMA)
    grid_h, grid_w = max(2, round(height / cell)), max(2, round(width / cell))
    cell_h, cell_w = height / grid_h, width / grid_w
    # Unit-variance uniform noise: each field value sums ~200 cells, Gaussian by the central limit
    # theorem whatever the cells' distribution, and uniform draws are 4x cheaper than normal ones.
    coarse = rng.random((grid_h, grid_w, 2), dtype=np.float32)
    coarse -= np.float32(0.5)
    coarse *= np.float32(math.sqrt(12.0) * _noise_std(shape, noise) / math.sqrt(cell_h * cell_w))
    # Gaussian with the same 4-sigma reach as OpenCV's automatic kernel, in coarse cells per axis.
    cv2.GaussianBlur(
        coarse,
        (0, 0),
        sigmaX=sigma / cell_w,
        sigmaY=sigma / cell_h,
        dst=coarse,
        borderType=cv2.BORDER_REPLICATE,
    )
    if alpha != 1.0:
        coarse *= np.float32(alpha)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=16)
def _noise_std(shape: tuple[int, int], noise: Noise) -> float:
    """Std of albumentations' per-pixel noise for an (H, W) image: U(-1, 1), or N(0, 1) / max|N|."""
    if noise == "uniform":
        return 1.0 / math.sqrt(3.0)
    if noise != "gaussian":
        raise ValueError(f"noise must be 'gaussian' or 'uniform', got {noise!r}")
    return 1.0 / _expected_max_abs_normal(2 * shape[0] * shape[1])


def _expected_max_abs_normal(n: int) -> float:
    """E[max of n |N(0, 1)|] = integral over t >= 0 of 1 - P(|N| <= t) ** n (trapezoid on a fine grid)."""
    ts = np.linspace(0.0, 12.0, 24001)
    cdf_abs = np.array([math.erf(t / math.sqrt(2.0)) for t in ts])
    survival = 1.0 - np.exp(n * np.log(np.maximum(cdf_abs, 1e-300)))
    return float(np.sum((survival[1:] + survival[:-1]) * np.diff(ts)) / 2.0)


@functools.lru_cache(maxsize=8)
def _identity_map(height: int, width: int) -> np.ndarray:
    """float32 (H, W, 2) of pixel coordinates (x, y): cv2.remap's map for 'no displacement'."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    grid = np.stack([xs, ys], axis=-1)
    grid.flags.writeable = False  # shared between calls through the cache
    return grid


class FastElastic(A.DualTransform):
    """Elastic deformation of image and mask with albumentations' alpha/sigma meaning, several times cheaper.

    The displacement field comes from `fast_displacement_field` (coarse noise, upsampled); the image is
    resampled bilinearly and the mask by nearest neighbour (one remap each), so mask labels stay valid.
    Border handling and fills follow albumentations' ElasticTransform defaults (constant 0: black image,
    background label). Targets: image and mask, and `masks` (each remapped as the mask, dtype kept: the
    dataset's uint16 instance maps travel that way).
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    class InitSchema(A.DualTransform.InitSchema):
        alpha: float
        sigma: float
        noise_distribution: Literal["gaussian", "uniform"]
        border_mode: int
        fill: float
        fill_mask: float

    def __init__(
        self,
        alpha: float = 1.0,
        sigma: float = 50.0,
        noise_distribution: Noise = "gaussian",
        border_mode: int = cv2.BORDER_CONSTANT,
        fill: float = 0.0,
        fill_mask: float = 0.0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        if alpha < 0 or sigma <= 0:
            raise ValueError(f"FastElastic needs alpha >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}")
        self.alpha = alpha
        self.sigma = sigma
        self.noise_distribution = noise_distribution
        self.border_mode = border_mode
        self.fill = fill
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        field = fast_displacement_field(
            (height, width), self.alpha, self.sigma, self.random_generator, self.noise_distribution
        )
        field += _identity_map(height, width)
        # The image is remapped through fixed-point maps (cheaper than float maps, and converting costs
        # less than it saves). Not the mask: with fixed-point maps OpenCV's nearest neighbour truncates
        # instead of rounding, a half-pixel shift against the image; the float map rounds.
        map_fixed, map_frac = cv2.convertMaps(field, None, cv2.CV_16SC2)
        return {"map_float": field, "map_fixed": map_fixed, "map_frac": map_frac}

    def apply(
        self, img: np.ndarray, map_fixed: np.ndarray, map_frac: np.ndarray, **params: Any
    ) -> np.ndarray:
        return cv2.remap(
            img,
            map_fixed,
            map_frac,
            cv2.INTER_LINEAR,
            borderMode=self.border_mode,
            borderValue=_fill(self.fill, img),
        )

    def apply_to_mask(self, mask: np.ndarray, map_float: np.ndarray, **params: Any) -> np.ndarray:
        return cv2.remap(
            mask,
            map_float,
            None,
            cv2.INTER_NEAREST,
            borderMode=self.border_mode,
            borderValue=_fill(self.fill_mask, mask),
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha", "sigma", "noise_distribution", "border_mode", "fill", "fill_mask")


def _fill(value: float, array: np.ndarray) -> tuple[float, ...]:
    channels = 1 if array.ndim == 2 else array.shape[2]
    return (value,) * min(channels, 4)


def _albumentations_elastic(params: AugmentParams) -> A.BasicTransform:
    return A.ElasticTransform(alpha=params.elastic_alpha, sigma=params.elastic_sigma, p=1.0)


def _fast_elastic(params: AugmentParams) -> A.BasicTransform:
    return FastElastic(alpha=params.elastic_alpha, sigma=params.elastic_sigma, p=1.0)


ELASTIC_IMPLS: dict[str, Callable[[AugmentParams], A.BasicTransform]] = {
    "fast": _fast_elastic,
    "albumentations": _albumentations_elastic,
}


def build_elastic(params: AugmentParams) -> A.BasicTransform:
    """The elastic transform named by `params.elastic_impl`, with p=1 (the dataset draws per-image p).

    Warns when alpha/sigma move pixels by less than `MIN_VISIBLE_DISPLACEMENT` at the training size:
    albumentations' defaults (alpha 1, sigma 50) displace by ~0.001 px, an invisible no-op.
    """
    try:
        factory = ELASTIC_IMPLS[params.elastic_impl]
    except KeyError:
        raise KeyError(
            f"unknown elastic_impl {params.elastic_impl!r}; valid: {', '.join(sorted(ELASTIC_IMPLS))}"
        ) from None
    shape = (params.size, params.size)
    std = elastic_displacement_std(shape, params.elastic_alpha, params.elastic_sigma)
    if std < MIN_VISIBLE_DISPLACEMENT:
        alpha_for_2px = 2.0 / elastic_displacement_std(shape, 1.0, params.elastic_sigma)
        warnings.warn(
            f"augment.elastic_alpha={params.elastic_alpha:g} with elastic_sigma={params.elastic_sigma:g} "
            f"moves pixels by {std:.2g} px (std) at size {params.size}: the elastic step changes nothing "
            f"visible (alpha ~{alpha_for_2px:.0f} would give ~2 px at this sigma)",
            stacklevel=2,
        )
    return factory(params)


# ---------------------------------------------------------------------------------------------------------
# Pipelines.


def build_train_geometry(params: AugmentParams) -> list[A.BasicTransform]:
    """The first training steps, which bring an image of any size to size x size.

    squash: one resize (aspect ratio lost, as `build_resize`). crop: scale so the short side is
    `short_side` (aspect kept; area averaging when shrinking), reflect-pad a side shorter than the crop,
    then a random size x size crop: the model trains at the resolution it will predict at.
    """
    if params.resize == "squash":
        return [build_resize(params.size)]
    short_side = params.size if params.short_side is None else params.short_side
    return [
        A.SmallestMaxSize(
            max_size=short_side,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            area_for_downscale="image",
        ),
        A.PadIfNeeded(params.size, params.size, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(params.size, params.size),
    ]


def build_train_transform(params: AugmentParams) -> A.Compose:
    """Bring the image to the training size first (everything after runs at that size; see
    `build_train_geometry`), then flips, right-angle rotations, a random affine, colour.

    Masks use nearest interpolation throughout. The elastic step is not included: the dataset applies
    `build_elastic(params)` afterwards with a per-image probability.
    """
    return A.Compose(
        [
            *build_train_geometry(params),
            A.HorizontalFlip(p=params.hflip),
            A.VerticalFlip(p=params.vflip),
            A.RandomRotate90(p=params.rot90),
            A.Affine(
                scale=AFFINE_SCALE,
                translate_percent=AFFINE_TRANSLATE,
                rotate=AFFINE_ROTATE,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                # Reflection keeps the image and its labels consistent without black wedges.
                border_mode=cv2.BORDER_REFLECT_101,
                p=params.shift_scale_rotate,
            ),
            A.OneOf(
                [
                    A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
                    A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=1.0),
                ],
                p=params.color,
            ),
        ]
    )
