"""Tests for pipeline.training.augment: rarity weights, elastic probabilities, FastElastic, pipelines."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import pytest
from albumentations.augmentations.geometric import functional as fgeometric

from pipeline.config import AugmentParams
from pipeline.data.geometry import build_resize
from pipeline.training.augment import (
    ELASTIC_IMPLS,
    FastElastic,
    build_elastic,
    build_train_transform,
    elastic_displacement_std,
    elastic_probabilities,
    elastic_probability_by_class,
    fast_displacement_field,
    image_weights,
    rarity_weights,
    sampling_weights,
)

# 4 images; columns background, A, B, C. A is in all 4 (f=1), B in 2 (f=1/2), C in 1 (f=1/4).
PRESENCE = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 1],
        [1, 1, 1, 0],
    ],
    dtype=bool,
)
NAMES = ["background", "A", "B", "C"]


def test_rarity_weights_match_hand_computation() -> None:
    # w_c = (max f / f_c) ** gamma; background 0.
    np.testing.assert_allclose(rarity_weights(PRESENCE, 1.0), [0, 1, 2, 4])
    np.testing.assert_allclose(rarity_weights(PRESENCE, 0.5), [0, 1, math.sqrt(2), 2])
    np.testing.assert_allclose(rarity_weights(PRESENCE, 0.0), [0, 1, 1, 1])


def test_rarity_weights_ignore_absent_classes() -> None:
    presence = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)  # class 2 in no image
    np.testing.assert_allclose(rarity_weights(presence, 1.0), [0, 1, 0])


def test_image_weights_scale_most_common_to_0_and_rarest_to_1() -> None:
    # Largest class weight per image: [1, 2, 4, 2]; min-max over class weights 1..4: (w - 1) / 3.
    np.testing.assert_allclose(image_weights(PRESENCE, rarity_weights(PRESENCE, 1.0)), [0, 1 / 3, 1, 1 / 3])
    np.testing.assert_allclose(
        image_weights(PRESENCE, rarity_weights(PRESENCE, 0.5)), [0, math.sqrt(2) - 1, 1, math.sqrt(2) - 1]
    )


def test_image_weights_background_only_image_and_equal_weights_give_0() -> None:
    presence = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1]], dtype=bool)
    np.testing.assert_allclose(image_weights(presence, rarity_weights(presence, 1.0)), [0, 1, 0, 0])
    # gamma 0: every class weighs 1, no image is rarer than another.
    np.testing.assert_allclose(image_weights(PRESENCE, rarity_weights(PRESENCE, 0.0)), [0, 0, 0, 0])


def test_sampling_weights_are_largest_class_weight_at_least_1() -> None:
    np.testing.assert_allclose(sampling_weights(PRESENCE, rarity_weights(PRESENCE, 1.0)), [1, 2, 4, 2])
    presence = np.array([[1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]], dtype=bool)
    np.testing.assert_allclose(sampling_weights(presence, rarity_weights(presence, 1.0)), [1, 1, 1, 1])


def test_elastic_probabilities_and_class_means_match_hand_computation() -> None:
    params = AugmentParams(elastic_p_min=0.1, elastic_p_max=0.8, elastic_gamma=1.0)
    p = elastic_probabilities(PRESENCE, params)
    third = 0.1 + 0.7 / 3
    np.testing.assert_allclose(p, [0.1, third, 0.8, third])
    by_class = elastic_probability_by_class(PRESENCE, p, NAMES)
    assert list(by_class) == ["A", "B", "C"]
    np.testing.assert_allclose(
        [by_class["A"], by_class["B"], by_class["C"]], [(0.1 + 2 * third + 0.8) / 4, third, 0.8]
    )


def test_elastic_probability_by_class_is_nan_for_a_class_in_no_image() -> None:
    presence = np.array([[1, 1, 0], [1, 1, 0]], dtype=bool)
    by_class = elastic_probability_by_class(presence, np.array([0.2, 0.4]), ["background", "x", "y"])
    assert by_class["x"] == pytest.approx(0.3)
    assert math.isnan(by_class["y"])


def test_weights_reject_malformed_presence() -> None:
    with pytest.raises(ValueError, match="presence"):
        rarity_weights(np.ones(4, dtype=bool), 1.0)
    with pytest.raises(ValueError, match="class_weights"):
        image_weights(PRESENCE, np.ones(3))


# ---------------------------------------------------------------------------------------------------------
# FastElastic


def _field_samples(make_field: Callable[[np.random.Generator], np.ndarray], n: int) -> np.ndarray:
    return np.stack([make_field(np.random.default_rng(seed)) for seed in range(n)])


def _reference_field(
    shape: tuple[int, int], alpha: float, sigma: float, rng: np.random.Generator, noise: str
) -> np.ndarray:
    """albumentations' exact ElasticTransform field (dx, dy) as (H, W, 2)."""
    dx, dy = fgeometric.generate_displacement_fields(shape, alpha, sigma, False, (0, 0), rng, noise)
    return np.dstack([dx, dy])


def test_fast_field_statistics_match_albumentations_exact_field() -> None:
    shape, alpha, sigma, n = (96, 96), 200.0, 8.0, 150
    fast = _field_samples(lambda rng: fast_displacement_field(shape, alpha, sigma, rng)[..., 0], n)
    ref = _field_samples(lambda rng: _reference_field(shape, alpha, sigma, rng, "gaussian")[..., 0], n)
    centre = (slice(32, 64), slice(32, 64))  # away from both fields' border handling
    expected = elastic_displacement_std(shape, alpha, sigma)
    ref_std, fast_std = ref[:, *centre].std(), fast[:, *centre].std()
    assert ref_std == pytest.approx(expected, rel=0.1)  # the closed form describes albumentations
    assert fast_std == pytest.approx(ref_std, rel=0.1)
    assert abs(fast[:, *centre].mean()) < 3 * fast_std / math.sqrt(n)

    # Smooth with the same correlation length: neighbours nearly equal, sigma apart correlated alike.
    def corr(field: np.ndarray, shift: int) -> float:
        a, b = field[:, 48, 32:64].ravel(), field[:, 48, 32 + shift : 64 + shift].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    assert corr(fast, 1) > 0.98
    assert corr(fast, 8) == pytest.approx(corr(ref, 8), abs=0.08)
    assert corr(ref, 8) == pytest.approx(math.exp(-1 / 4), abs=0.08)  # Gaussian blur of white noise


def test_fast_field_with_uniform_noise_matches_albumentations() -> None:
    shape, alpha, sigma, n = (64, 64), 100.0, 4.0, 100
    fast = _field_samples(lambda rng: fast_displacement_field(shape, alpha, sigma, rng, "uniform")[..., 1], n)
    ref = _field_samples(lambda rng: _reference_field(shape, alpha, sigma, rng, "uniform")[..., 1], n)
    assert fast[:, 24:40, 24:40].std() == pytest.approx(ref[:, 24:40, 24:40].std(), rel=0.1)


def test_fast_elastic_moves_pixels_by_its_field() -> None:
    # An image that encodes its own coordinates: after the warp, value - position = displacement.
    size, alpha, sigma = 128, 400.0, 4.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    coords = np.dstack([xs, ys, np.zeros_like(xs)])
    transform = FastElastic(alpha=alpha, sigma=sigma, p=1.0)
    transform.set_random_seed(3)
    warped = transform(image=coords, mask=np.zeros((size, size), np.uint8))["image"]
    inner = (slice(16, -16), slice(16, -16))
    dx = warped[..., 0][inner] - xs[inner]
    expected = elastic_displacement_std((size, size), alpha, sigma)
    assert expected > 1.0  # a visible deformation, not a rounding-level one
    assert dx.std() == pytest.approx(expected, rel=0.25)
    assert abs(dx.mean()) < 0.25 * expected


def test_fast_elastic_mask_keeps_only_input_labels() -> None:
    size = 96
    mask = np.full((size, size), 2, np.uint8)
    mask[20:60, 10:50] = 5
    mask[40:90, 55:90] = 9
    image = np.repeat((mask * 20)[..., None], 3, axis=2)
    transform = FastElastic(alpha=2000.0, sigma=6.0, p=1.0)
    transform.set_random_seed(0)
    out = transform(image=image, mask=mask)
    labels = set(np.unique(out["mask"]).tolist())
    assert labels <= {2, 5, 9, 0}  # 0 only as the border fill
    assert {2, 5, 9} <= labels
    assert not np.array_equal(out["mask"], mask)


@pytest.mark.parametrize("axis", [0, 1])
def test_fast_elastic_mask_stays_aligned_with_image(axis: int) -> None:
    # A straight edge between labels 1 (image 50) and 2 (image 200). Where the warped image is a blend,
    # bilinear sampling straddles the edge and the nearest source pixel is the one the value is closer
    # to: the mask must agree. A half-pixel shift (truncating instead of rounding) agrees only ~half
    # the time.
    size = 96
    mask = (np.indices((size, size))[axis] >= size // 2).astype(np.uint8) + 1
    image = np.repeat(np.where(mask == 2, 200, 50).astype(np.uint8)[..., None], 3, axis=2)
    transform = FastElastic(alpha=300.0, sigma=6.0, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        value = out["image"][..., 0]
        blended = (value != 50) & (value != 200)
        assert blended.sum() > 30
        from_image = np.where(value >= 125, 2, 1)
        assert (from_image == out["mask"])[blended].mean() > 0.9


def test_fast_elastic_is_identity_when_alpha_is_0() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    mask = rng.integers(0, 11, (40, 56), dtype=np.uint8)
    out = FastElastic(alpha=0.0, sigma=10.0, p=1.0)(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)


def test_fast_elastic_composes_and_replays_with_a_seed() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (64, 64), dtype=np.uint8)

    def run(seed: int) -> np.ndarray:
        transform = A.Compose([FastElastic(alpha=500.0, sigma=5.0, p=1.0)], seed=seed)
        return transform(image=image, mask=mask)["image"]

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


# ---------------------------------------------------------------------------------------------------------
# Registry and pipelines


def test_build_elastic_uses_the_registry() -> None:
    assert isinstance(build_elastic(AugmentParams(elastic_impl="fast", elastic_alpha=300.0)), FastElastic)
    params = AugmentParams(elastic_impl="albumentations", elastic_alpha=300.0, elastic_sigma=7.0)
    reference = build_elastic(params)
    assert isinstance(reference, A.ElasticTransform)
    assert (reference.alpha, reference.sigma, reference.p) == (300.0, 7.0, 1.0)
    assert set(ELASTIC_IMPLS) == {"fast", "albumentations"}
    with pytest.raises(KeyError, match="albumentations, fast"):
        build_elastic(AugmentParams(elastic_alpha=300.0).model_copy(update=dict(elastic_impl="nope")))


def test_build_elastic_warns_when_the_deformation_is_invisible() -> None:
    with pytest.warns(UserWarning, match=r"elastic_alpha=1 with elastic_sigma=50 moves pixels by 0.001"):
        build_elastic(AugmentParams(size=512, elastic_alpha=1.0, elastic_sigma=50.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_elastic(AugmentParams(size=512, elastic_alpha=300.0, elastic_sigma=10.0))  # ~1.7 px


def test_train_transform_resizes_and_keeps_mask_labels() -> None:
    params = AugmentParams(size=64, hflip=0.5, vflip=0.5, shift_scale_rotate=1.0, color=1.0)
    transform = build_train_transform(params)
    transform.set_random_seed(0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    mask = np.zeros((100, 150), np.uint8)
    mask[10:50, 20:90], mask[60:95, 100:140] = 3, 7
    for _ in range(5):
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (64, 64) and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"]).tolist()) <= {0, 3, 7}


def test_resize_is_deterministic_and_keeps_mask_labels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (128, 128), dtype=np.uint8)
    transform = A.Compose([build_resize(64)])
    first, second = transform(image=image, mask=mask), transform(image=image, mask=mask)
    np.testing.assert_array_equal(first["image"], second["image"])
    assert first["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal(first["mask"], mask[::2, ::2])  # nearest on an exact 2x shrink


@pytest.mark.parametrize("resize", ["squash", "crop"])
@pytest.mark.parametrize("elastic_impl", sorted(ELASTIC_IMPLS))
def test_instance_maps_ride_along_as_masks_with_ids_up_to_65535(resize: str, elastic_impl: str) -> None:
    # The dataset passes the uint16 instance map as albumentations' `masks`: it must keep its dtype and
    # every id (nearest neighbour everywhere), stay aligned with the class mask (the class of each id is
    # fixed, so lut[instances] == mask after every step), and leave the random draws of image and mask
    # as they are without it.
    params = AugmentParams(
        size=48, resize=resize, hflip=0.5, vflip=0.5, rot90=0.5, shift_scale_rotate=1.0, color=1.0,
        elastic_alpha=300.0, elastic_sigma=6.0, elastic_impl=elastic_impl,
    )  # fmt: skip
    transform, elastic = build_train_transform(params), build_elastic(params)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    ids = np.array([0, 1, 255, 256, 40000, 65535], np.uint16)
    instances = np.zeros((60, 90), np.uint16)
    for k, (r, c) in enumerate([(5, 5), (5, 40), (30, 10), (30, 45), (10, 70)], start=1):
        instances[r : r + 20, c : c + 25] = ids[k]
    lut = np.zeros(65536, np.uint8)
    lut[ids] = [0, 1, 2, 1, 3, 2]  # id -> class; two ids per class for classes 1 and 2
    mask = lut[instances]
    seen: set[int] = set()
    for seed in range(4):
        plain, extra = [], []
        for with_instances in (False, True):
            transform.set_random_seed(seed)
            elastic.set_random_seed(seed)
            kwargs = {"masks": [instances]} if with_instances else {}
            out = transform(image=image, mask=mask, **kwargs)
            if with_instances:
                kwargs = {"masks": list(out["masks"])}
            out = elastic(image=out["image"], mask=out["mask"], **kwargs)
            (extra if with_instances else plain).append(out)
        np.testing.assert_array_equal(extra[0]["image"], plain[0]["image"])
        np.testing.assert_array_equal(extra[0]["mask"], plain[0]["mask"])
        moved = extra[0]["masks"][0]
        assert moved.dtype == np.uint16 and moved.shape == (48, 48)
        seen |= set(np.unique(moved).tolist())
        np.testing.assert_array_equal(lut[moved], extra[0]["mask"])
    assert {256, 40000, 65535} <= seen <= set(ids.tolist())
