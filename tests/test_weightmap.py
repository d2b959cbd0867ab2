"""Tests for pipeline.training.weightmap: the U-Net boundary weight map against hand-computed distances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import TrainParams
from pipeline.training.weightmap import (
    REACH_SIGMAS,
    BoundaryWeighting,
    boundary_weighting,
    boundary_weights,
    class_balance_weights,
    nearest_two_distances,
)

W0, SIGMA = 5.0, 3.0


def two_squares(gap: int) -> np.ndarray:
    """12x12 instance map: 3x3 square 1 at rows 4..6, cols 2..4, square 2 `gap` columns to its right."""
    instances = np.zeros((12, 12), np.uint16)
    instances[4:7, 2:5] = 1
    instances[4:7, 5 + gap : 8 + gap] = 2
    return instances


def term(d1: float, d2: float, w0: float = W0, sigma: float = SIGMA) -> float:
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def brute_force_weights(instances: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """1 + w0 exp(-(d1 + d2)^2 / 2 sigma^2) with every pixel-to-object distance computed explicitly."""
    rows, cols = np.indices(instances.shape)
    per_object = []
    for k in np.unique(instances[instances > 0]):
        ys, xs = np.nonzero(instances == k)
        dist = np.hypot(rows[..., None] - ys, cols[..., None] - xs).min(axis=-1)
        per_object.append(dist)
    d = np.sort(np.stack(per_object), axis=0)
    return 1.0 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))


# (pixel, d1, d2) worked out by hand: square 1 spans rows 4..6, cols 2..4.
GAP_1 = [
    ((5, 5), 1.0, 1.0),  # the background column between the squares
    ((3, 5), math.sqrt(2), math.sqrt(2)),  # above the gap: diagonal to (4, 4) and (4, 6)
    ((5, 4), 0.0, 2.0),  # square 1's pixel facing the gap
    ((5, 2), 0.0, 4.0),  # square 1's far side
    ((0, 0), math.sqrt(4**2 + 2**2), math.sqrt(4**2 + 6**2)),  # corner: to (4, 2) and (4, 6)
    ((11, 11), math.sqrt(5**2 + 3**2), math.sqrt(5**2 + 7**2)),  # corner: to (6, 8) and (6, 4)
]
TOUCHING = [
    ((5, 4), 0.0, 1.0),  # square 1's pixel on the shared border
    ((5, 5), 0.0, 1.0),  # square 2's pixel on the shared border
    ((5, 2), 0.0, 3.0),
    ((3, 4), 1.0, math.sqrt(2)),  # background above the seam: (4, 4) and (4, 5)
]


@pytest.mark.parametrize(("gap", "pixels"), [(1, GAP_1), (0, TOUCHING)], ids=["one_pixel_gap", "touching"])
def test_two_squares_match_hand_computed_distances(gap: int, pixels: list) -> None:
    instances = two_squares(gap)
    labels = (instances > 0).astype(np.uint8)
    weights = boundary_weights(instances, labels, 2, W0, SIGMA, class_balance=False)
    assert weights.dtype == np.float32 and weights.shape == (12, 12)
    for (row, col), d1, d2 in pixels:
        assert weights[row, col] == pytest.approx(1.0 + term(d1, d2), abs=1e-6), (row, col)
    np.testing.assert_allclose(weights, brute_force_weights(instances, W0, SIGMA), rtol=0, atol=1e-6)


def test_touching_objects_get_nearly_1_plus_w0_along_the_seam() -> None:
    # Same class, no background between them: the seam's object pixels are the heaviest of the image.
    instances = two_squares(gap=0)
    weights = boundary_weights(instances, (instances > 0).astype(np.uint8), 2, W0, SIGMA, False)
    seam = weights[4:7, 4:6]
    assert seam.min() == pytest.approx(1.0 + W0 * math.exp(-1 / (2 * SIGMA**2)), abs=1e-6)
    assert seam.min() == weights.max()


def test_term_is_0_beyond_its_reach() -> None:
    # sigma 1: reach 6 px; the corner (0, 0) has d1 + d2 = 11.7 > 6, the gap pixel 2.
    instances = two_squares(gap=1)
    weights = boundary_weights(instances, (instances > 0).astype(np.uint8), 2, W0, 1.0, False)
    assert REACH_SIGMAS == 6.0
    assert weights[0, 0] == 1.0
    assert weights[5, 5] == pytest.approx(1.0 + term(1.0, 1.0, sigma=1.0), abs=1e-6)


def test_nearest_two_distances_are_exact_within_reach() -> None:
    rng = np.random.default_rng(0)
    instances = np.zeros((40, 50), np.int32)
    for k in range(1, 6):
        r, c = rng.integers(0, 35), rng.integers(0, 45)
        instances[r : r + rng.integers(2, 9), c : c + rng.integers(2, 9)] = k
    d1, d2 = nearest_two_distances(instances, reach=10.0)
    rows, cols = np.indices(instances.shape)
    dists = []
    for k in np.unique(instances[instances > 0]):
        ys, xs = np.nonzero(instances == k)
        dists.append(np.hypot(rows[..., None] - ys, cols[..., None] - xs).min(axis=-1))
    exact = np.sort(np.stack(dists), axis=0)
    assert d1.shape == d2.shape == instances.shape
    for got, want in ((d1, exact[0]), (d2, exact[1])):
        near = want <= 10.0
        np.testing.assert_allclose(got[near], want[near], rtol=0, atol=1e-9)
        assert (got[~near] > 10.0).all()


def test_w0_0_gives_all_ones_without_instances() -> None:
    labels = (two_squares(gap=0) > 0).astype(np.uint8)
    for instances in (two_squares(gap=0), None):
        weights = boundary_weights(instances, labels, 2, 0.0, SIGMA, class_balance=False)
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights, np.ones((12, 12), np.float32))


@pytest.mark.parametrize("n_objects", [0, 1])
def test_fewer_than_two_objects_have_no_separation_term(n_objects: int) -> None:
    instances = np.zeros((12, 12), np.uint16)
    instances[4:7, 2:5] = n_objects
    weights = boundary_weights(instances, (instances > 0).astype(np.uint8), 2, W0, SIGMA, False)
    np.testing.assert_array_equal(weights, np.ones((12, 12), np.float32))


def test_class_balance_gives_each_present_class_equal_total_weight() -> None:
    # 144 px: 126 background, 9 of class 1, 9 of class 2, class 3 absent: w_c = 144 / (3 * n_c).
    instances = two_squares(gap=1)
    labels = instances.astype(np.uint8)  # square k has class k
    weights = class_balance_weights(labels, n_classes=4)
    assert weights[0, 0] == pytest.approx(144 / (3 * 126)) and weights[5, 3] == pytest.approx(144 / 27)
    assert weights[5, 7] == pytest.approx(144 / 27)
    assert weights.mean() == pytest.approx(1.0)
    for c in range(3):
        assert weights[labels == c].sum() == pytest.approx(144 / 3)
    # Added to the separation term; one class alone gives all ones.
    both = boundary_weights(instances, labels, 4, W0, SIGMA, class_balance=True)
    assert both[5, 5] == pytest.approx(144 / (3 * 126) + term(1.0, 1.0), abs=1e-6)
    ones = class_balance_weights(np.zeros((5, 5), np.uint8), 4)
    np.testing.assert_array_equal(ones, np.ones((5, 5), np.float32))


def test_bad_inputs_are_refused() -> None:
    labels = np.zeros((12, 12), np.uint8)
    with pytest.raises(ValueError, match="labels must lie in"):
        boundary_weights(None, labels + 2, 2, 0.0, SIGMA, class_balance=True)
    with pytest.raises(ValueError, match="instances must be given"):
        boundary_weights(np.zeros((4, 4), np.uint16), labels, 2, W0, SIGMA, class_balance=False)
    with pytest.raises(ValueError, match="integer"):
        nearest_two_distances(np.zeros((4, 4), np.float32), 5.0)
    with pytest.raises(ValueError, match="sigma > 0"):
        BoundaryWeighting(W0, 0.0, False, 2)


def test_boundary_weighting_from_train_params() -> None:
    assert boundary_weighting(TrainParams(), 5) is None
    weighting = boundary_weighting(TrainParams(boundary_w0=10.0, boundary_sigma=4.0), 5)
    assert weighting == BoundaryWeighting(10.0, 4.0, False, 5) and weighting.needs_instances
    balance_only = boundary_weighting(TrainParams(boundary_class_balance=True), 5)
    assert balance_only is not None and not balance_only.needs_instances
    labels = two_squares(gap=0).astype(np.uint8)
    np.testing.assert_array_equal(balance_only.weights(None, labels), class_balance_weights(labels, 5))
