"""Tests for pipeline.inference.tiling: tile layout, blend window, padding, seamless blending, agreement with
whole-image inference, TTA per tile, and sliding windows through `infer.predict_probabilities`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import ttach
from PIL import Image
from torch import nn

from pipeline.config import PredictParams
from pipeline.data.geometry import Geometry
from pipeline.data.loaders import ImageDataset
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError
from pipeline.inference import infer
from pipeline.inference.tiling import (
    WINDOW_FLOOR,
    SlidingWindow,
    axis_padding,
    blend_window,
    reflect_pad,
    tile_origins,
    tile_stride,
)

CPU = torch.device("cpu")


class ConstantProbs(nn.Module):
    """The same class probabilities at every pixel, whatever the image; records each input's shape."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.register_buffer("probs", torch.tensor(probs))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        n, _, h, w = x.shape
        return self.probs[None, :, None, None].expand(n, -1, h, w).clone()


class PositionLogits(nn.Module):
    """Logits that depend on where a pixel is in the input (not flip-equivariant), plus the pixel itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cols = torch.linspace(-3, 3, w).expand(h, w)
        rows = torch.linspace(-2, 4, h)[:, None].expand(h, w)
        return torch.stack([torch.zeros(h, w), cols, rows])[None] + 2 * x


class ChannelLogits(nn.Module):
    """Pointwise (a receptive field of one pixel): class c's logit is 4 * input channel c."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return 4 * x


def _small_fcn(seed: int = 0) -> nn.Module:
    """Three 3x3 convolutions then softmax: each output pixel sees 3 pixels each way (7x7)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.Softmax(dim=1),
    ).eval()


@pytest.mark.parametrize(
    ("tile", "overlap", "stride"),
    [(32, 0.5, 16), (32, 0.0, 32), (32, 0.99, 1), (512, 0.25, 384), (64, 0.3, 45)],
)
def test_stride_is_the_tile_less_its_overlap_rounded_at_least_one(
    tile: int, overlap: float, stride: int
) -> None:
    assert tile_stride(tile, overlap) == stride


@pytest.mark.parametrize("overlap", [1.0, -0.1])
def test_an_overlap_outside_0_to_1_is_a_user_error(overlap: float) -> None:
    with pytest.raises(UserError, match=r"predict\.window_overlap must be at least 0 and below 1"):
        SlidingWindow(nn.Identity(), 32, overlap)


@pytest.mark.parametrize(
    ("length", "tile", "stride"),
    [(32, 32, 16), (80, 32, 16), (81, 32, 16), (100, 32, 32), (37, 32, 3), (33, 32, 30)],
)
def test_tile_origins_cover_the_side_at_the_stride_and_the_last_ends_at_the_border(
    length: int, tile: int, stride: int
) -> None:
    origins = tile_origins(length, tile, stride)
    assert origins[0] == 0 and origins[-1] + tile == length
    assert len(origins) == math.ceil((length - tile) / stride) + 1
    steps = np.diff(origins)
    assert (steps[:-1] == stride).all() and (steps > 0).all() and (steps <= stride).all()
    covered = np.zeros(length, bool)
    for origin in origins:
        covered[origin : origin + tile] = True
    assert covered.all()
    with pytest.raises(ValueError, match="cannot hold a tile"):
        tile_origins(tile - 1, tile, stride)


def test_axis_padding_adds_the_margin_to_long_sides_and_pads_short_ones_to_the_tile() -> None:
    assert axis_padding(100, 32, 8) == (8, 8)
    assert axis_padding(33, 32, 0) == (0, 0)
    assert axis_padding(32, 32, 8) == (0, 0)  # exactly one tile: nothing to add
    assert axis_padding(20, 32, 8) == (6, 6)
    assert axis_padding(19, 32, 8) == (6, 7)  # centred, the odd pixel after


@pytest.mark.parametrize(("tile", "band"), [(32, 4), (32, 0), (7, 1), (512, 64), (1, 0)])
def test_blend_window_is_positive_symmetric_and_floor_only_in_the_edge_bands(tile: int, band: int) -> None:
    window = blend_window(tile, band)
    assert window.shape == (tile,) and window.dtype == torch.float32
    assert (window > 0).all() and (window <= 1).all()
    torch.testing.assert_close(window, window.flip(0))
    assert (window[:band] == np.float32(WINDOW_FLOOR)).all()
    assert (window[band : tile - band] > WINDOW_FLOOR).all()
    if tile - 2 * band > 8:
        assert window.max() > 0.99  # the core rises to ~1 in its middle


def test_reflect_pad_mirrors_as_numpy_does_even_beyond_the_side_and_replicates_a_single_pixel() -> None:
    x = torch.arange(2 * 6 * 5, dtype=torch.float32).reshape(1, 2, 6, 5)
    for pads in [(2, 3, 1, 4), (0, 0, 0, 0), (11, 7, 9, 13)]:  # top, bottom, left, right
        got = reflect_pad(x, *pads)
        expected = np.pad(x.numpy(), [(0, 0), (0, 0), pads[:2], pads[2:]], mode="reflect")
        np.testing.assert_array_equal(got.numpy(), expected)
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]])  # one pixel high: no mirror image vertically
    got = reflect_pad(row, 2, 1, 1, 4)
    mirrored = np.pad(row.numpy(), [(0, 0), (0, 0), (0, 0), (1, 4)], mode="reflect")
    np.testing.assert_array_equal(
        got.numpy(), np.pad(mirrored, [(0, 0), (0, 0), (2, 1), (0, 0)], mode="edge")
    )


@pytest.mark.parametrize("overlap", [0.0, 0.3, 0.5, 0.75])
@pytest.mark.parametrize("size", [(64, 64), (70, 45), (100, 33), (20, 9), (1, 50), (32, 32)])
def test_a_constant_model_gives_exactly_its_constant_everywhere(
    size: tuple[int, int], overlap: float
) -> None:
    # Sizes: divisible by the stride, not, shorter than a tile on one side, a single row, exactly a tile.
    probs = [0.7, 0.2, 0.1]
    model = ConstantProbs(probs)
    got = SlidingWindow(model, 32, overlap, tile_batch=5)(torch.randn(2, 3, *size))
    assert got.shape == (2, 3, *size) and got.dtype == torch.float32
    assert (got - torch.tensor(probs)[None, :, None, None]).abs().max() < 1e-6  # no seams, no border drift
    assert all(shape[1:] == (3, 32, 32) and shape[0] <= 5 for shape in model.shapes)  # tiles, batched


def test_an_image_of_one_tile_or_less_is_one_pass_on_the_image_padded_to_the_tile() -> None:
    model = _small_fcn()
    x = torch.randn(2, 3, 32, 32)
    window = SlidingWindow(model, 32, 0.5)
    with torch.no_grad():
        assert torch.equal(window(x), model(x))  # bit-identical: squash geometry at scale 1 is a no-op
        small = torch.randn(1, 3, 20, 27)
        expected = model(reflect_pad(small, 6, 6, 2, 3))[..., 6:26, 2:29]
        assert torch.equal(window(small), expected)


@pytest.mark.parametrize("overlap", [0.5, 0.75])
@pytest.mark.parametrize("size", [(64, 64), (64, 75)])
def test_tiles_agree_with_the_whole_image_away_from_its_borders(
    size: tuple[int, int], overlap: float
) -> None:
    # A 3-pixel receptive field radius, less than the edge band (overlap / 4 of the tile: 4 or 6 pixels)
    # where tile predictions only get the floor weight: inside the image by more than the radius, every
    # blended pixel comes from tiles that saw all it depends on. Measured: 1.2e-7.
    model = _small_fcn()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        tiled, whole = SlidingWindow(model, 32, overlap, tile_batch=3)(x), model(x)
    assert (tiled - whole)[..., 4:-4, 4:-4].abs().max() < 1e-5
    assert (tiled - whole).abs().max() > 1e-3  # at the borders, mirrored context differs from zero padding


def test_the_tile_batch_bounds_each_call_and_does_not_change_the_result() -> None:
    model, x = _small_fcn(), torch.randn(3, 3, 70, 50)
    with torch.no_grad():
        one, seven = SlidingWindow(model, 32, 0.5, 1)(x), SlidingWindow(model, 32, 0.5, 7)(x)
    torch.testing.assert_close(one, seven, rtol=0, atol=1e-6)


def _blocks(generator: torch.Generator, n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) images of random 8x8 single-colour blocks."""
    low = torch.randn(n, 3, size // 8, size // 8, generator=generator)
    return F.interpolate(low, scale_factor=8, mode="nearest")


def test_a_real_smp_model_tiled_agrees_with_whole_image_inference_on_most_pixels() -> None:
    # A random-init Unet's argmax follows its huge receptive field's padding, not the content: tiled vs
    # whole agreed on 54-100% of the inner pixels across seeds, no better than a shifted copy of the
    # whole-image argmax. So the model first learns a local rule (class = the brightest channel) for
    # 30 steps (~3 s): then, measured over 4 seeds, 92-99% agree (seed 0: 98%) while the whole-image
    # argmax shifted by 8 px agrees on only 35-38%.
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=3, decoder_channels=[32, 32, 16, 16, 16])
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = _blocks(generator, 8, 64)
        loss = F.cross_entropy(model(x), x.argmax(1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    member = infer.SoftmaxOutput(model.eval())
    x = _blocks(generator, 2, 128)
    with torch.no_grad():
        tiled, whole = SlidingWindow(member, 64, 0.5, tile_batch=8)(x), member(x)
    assert tiled.shape == whole.shape == (2, 3, 128, 128)
    torch.testing.assert_close(tiled.sum(1), torch.ones(2, 128, 128))
    inner = (slice(None), slice(16, -16), slice(16, -16))
    tiled_labels, whole_labels = tiled.argmax(1), whole.argmax(1)
    assert (tiled_labels[inner] == whole_labels[inner]).float().mean() > 0.9
    assert (tiled_labels[inner] == whole_labels.roll(8, -1)[inner]).float().mean() < 0.6


def test_tta_runs_on_each_tile() -> None:
    # 48x80 with a 32 tile and stride 16 pads to 64x96, whose tile layout is its own mirror image, so
    # flips commute with tiling: flips TTA inside the window must equal the mean of the de-flipped tiled
    # predictions of the flipped images. The model depends on where a pixel is in its input, so TTA
    # (or its absence) shows.
    member = infer.SoftmaxOutput(PositionLogits())
    x = torch.randn(1, 3, 48, 80)
    with_tta = SlidingWindow(ttach.SegmentationTTAWrapper(member, infer.build_tta("flips")), 32, 0.5)(x)
    plain = SlidingWindow(member, 32, 0.5)
    flips = [plain(x.flip(dims)).flip(dims) for dims in ([], [-1], [-2], [-2, -1])]
    torch.testing.assert_close(with_tta, torch.stack(flips).mean(0))
    assert (with_tta - plain(x)).abs().max() > 0.05


def _write_images(root: Path, sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(sizes):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img/{i}.png")
        records.append(ImageRecord(id=i, file_name=f"img/{i}.png", height=h, width=w))
    return records


@pytest.mark.parametrize("scales", [[1.0], [0.5, 1.5]])
def test_predict_probabilities_in_sliding_windows_at_the_crop_inference_shape(
    tmp_path: Path, scales: list[float]
) -> None:
    # Crop geometry, tile 32: the images scale to 32x58, 53x32 and 32x32, then pad to multiples of 32.
    records = _write_images(tmp_path, [(40, 72), (50, 30), (32, 32)])
    dataset = ImageDataset(tmp_path, records, Geometry("crop", 32, 32))
    model = ChannelLogits()
    tiled = dict(infer.predict_probabilities([model], None, dataset, "hflip", scales, 2, 0, CPU, True, 0.5))
    assert {shape[1:] for shape in model.shapes} == {(3, 32, 32)}  # only tiles of the training size
    assert max(shape[0] for shape in model.shapes) <= 2  # predict's batch_size is the tile batch
    whole = dict(infer.predict_probabilities([model], None, dataset, "hflip", scales, 2, 0, CPU))
    for index, record in enumerate(records):
        assert tiled[index].shape == (3, *dataset.geometry.inference_shape(record.height, record.width))
        # A pointwise model needs no context, so tiling it changes nothing.
        torch.testing.assert_close(tiled[index], whole[index], rtol=0, atol=1e-5)


def test_sliding_window_on_a_squash_geometry_changes_nothing(tmp_path: Path) -> None:
    dataset = ImageDataset(tmp_path, _write_images(tmp_path, [(40, 72), (50, 30)]), Geometry("squash", 32))
    model = _small_fcn()
    tiled = dict(infer.predict_probabilities([model], None, dataset, "none", [1.0], 2, 0, CPU, True, 0.5))
    for index, probs in infer.predict_probabilities([model], None, dataset, "none", [1.0], 2, 0, CPU):
        assert torch.equal(tiled[index], probs)


def test_window_overlap_of_reads_the_predict_params() -> None:
    assert infer.window_overlap_of(PredictParams()) is None
    assert infer.window_overlap_of(PredictParams(window_overlap=0.25)) is None
    assert infer.window_overlap_of(PredictParams(sliding_window=True, window_overlap=0.25)) == 0.25
