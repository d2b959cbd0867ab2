"""Tests for pipeline.data.geometry: inference shapes, padding, and the strip-wise resize + argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import AugmentParams
from pipeline.data.geometry import (
    Geometry,
    class_argmax,
    geometry_of,
    pad_to_multiple,
    padded_shape,
    resize_argmax,
)


@pytest.mark.parametrize(
    ("in_shape", "out_shape"),
    [((7, 5), (30, 41)), ((16, 16), (16, 16)), ((40, 33), (9, 12)), ((1, 1), (5, 3))],
)
def test_resize_argmax_matches_torch_bilinear_then_argmax(in_shape: tuple, out_shape: tuple) -> None:
    probs = torch.rand(4, *in_shape, generator=torch.Generator().manual_seed(0)).softmax(dim=0)
    expected = F.interpolate(probs[None], size=out_shape, mode="bilinear", align_corners=False)[0].argmax(0)
    # A tiny strip budget: several strips of one row each, so strip edges are exercised.
    got = resize_argmax(probs, out_shape, strip_bytes=1)
    assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape
    torch.testing.assert_close(got.long(), expected)
    torch.testing.assert_close(resize_argmax(probs, out_shape).long(), expected)


def test_class_argmax_is_torch_argmax_with_the_first_of_equal_maxima() -> None:
    # Scores in {0, 1, 2}: most pixels hold a tie for the maximum, which the first class must win.
    scores = torch.randint(0, 3, (6, 9, 11), generator=torch.Generator().manual_seed(0)).float()
    got = class_argmax(scores)
    assert got.dtype == torch.uint8
    torch.testing.assert_close(got.long(), scores.argmax(0))
    tied = torch.tensor([[[0.5, 0.2]], [[0.5, 0.7]], [[0.1, 0.7]]])  # (3, 1, 2): ties between classes
    assert class_argmax(tied).tolist() == [[0, 1]]


def test_squash_ignores_the_aspect_and_crop_keeps_it() -> None:
    assert Geometry("squash", 128).inference_shape(480, 640) == (128, 128)
    assert Geometry("crop", 128, short_side=256).inference_shape(480, 640) == (256, 341)
    assert Geometry("crop", 128, short_side=256).inference_shape(4000, 3000) == (341, 256)
    assert Geometry("crop", 64).inference_shape(100, 50) == (128, 64)  # short side defaults to size
    augment = AugmentParams(size=96, resize="crop", short_side=200)
    assert geometry_of(augment) == Geometry("crop", 96, 200)
    assert geometry_of(AugmentParams(size=96, resize="crop")) == Geometry("crop", 96, short_side=96)
    assert geometry_of(AugmentParams(size=96, short_side=200)) == Geometry("squash", 96)
    assert Geometry.from_dict(geometry_of(augment).to_dict()) == geometry_of(augment)


def test_pad_to_multiple_reflects_at_the_bottom_and_right() -> None:
    image = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    padded = pad_to_multiple(image, multiple=4)
    assert padded.shape == (8, 4, 3) and padded_shape(5, 3, multiple=4) == (8, 4)
    np.testing.assert_array_equal(padded[:5, :3], image)
    np.testing.assert_array_equal(padded[5, :3], image[3])  # reflection: row 5 mirrors row 3
    np.testing.assert_array_equal(padded[:5, 3], image[:, 1])
    tiny = pad_to_multiple(np.ones((1, 1, 3), np.uint8), multiple=32)  # too small to reflect: edge
    assert tiny.shape == (32, 32, 3) and (tiny == 1).all()
