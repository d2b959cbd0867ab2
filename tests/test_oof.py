"""Tests for pipeline.oof: quantised held-out probabilities, written from a real checkpoint and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.coco import ImageRecord
from pipeline.config import AugmentParams, ModelParams, PredictParams
from pipeline.dataset import ImageDataset
from pipeline.errors import UserError
from pipeline.geometry import Geometry
from pipeline.infer import predict_probabilities
from pipeline.models import build_model, checkpoint_state, save_checkpoint
from pipeline.oof import dequantise, held_out, quantise, read_oof, write_oof

CPU = torch.device("cpu")
CLASSES = ["background", "can", "bottle"]
TINY_MODEL = ModelParams(arch="Unet", encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8])
SIZES = [(40, 72), (64, 64), (50, 30)]  # native (height, width), three aspect ratios


def _images(root: Path) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(SIZES):
        name = f"img/{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        records.append(ImageRecord(id=i, file_name=name, height=h, width=w))
    return records


def _checkpoint(path: Path, augment: AugmentParams) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, len(CLASSES)).eval()
    save_checkpoint(path, checkpoint_state(model, TINY_MODEL, CLASSES, augment, 1, 0.5, 0))
    return model


def test_quantise_round_trip_is_within_half_a_level() -> None:
    probs = torch.rand((3, 17, 9), generator=torch.Generator().manual_seed(0)).softmax(0)
    stored = quantise(probs)
    assert stored.dtype == np.uint8 and stored.shape == (3, 17, 9)
    back = dequantise(stored)
    assert back.dtype == torch.float32
    assert (back - probs).abs().max() <= 1 / 510 + 1e-7
    np.testing.assert_array_equal(
        quantise(torch.tensor([[[0.0, 1.0, -0.2, 1.3, 0.5]]])), [[[0, 255, 0, 255, 128]]]
    )


def test_held_out_keeps_the_fold_s_images_in_manifest_order() -> None:
    images = [ImageRecord(i, f"{name}.jpg", 8, 8) for i, name in enumerate("dacb")]
    fold_of = {"d.jpg": 1, "a.jpg": 0, "c.jpg": 1, "b.jpg": 0}
    assert [im.file_name for im in held_out(images, fold_of, 1)] == ["d.jpg", "c.jpg"]
    assert held_out(images, fold_of, 2) == []


@pytest.mark.parametrize(
    ("resize", "shapes"),
    [("squash", [(32, 32)] * 3), ("crop", [(32, 58), (32, 32), (53, 32)])],  # short side scaled to 32
)
def test_write_oof_stores_each_held_out_image_at_the_model_s_inference_shape(
    tmp_path: Path, resize: str, shapes: list[tuple[int, int]]
) -> None:
    images = _images(tmp_path / "data")
    augment = AugmentParams(size=32, resize=resize, hflip=0.5, vflip=0.0)
    model = _checkpoint(tmp_path / "models/m/fold0/best.pt", augment)
    out = tmp_path / "oof/m/fold0.npz"
    predict = PredictParams(tta="auto", batch_size=2, num_workers=0)
    tta = write_oof(tmp_path / "models/m/fold0/best.pt", images, tmp_path / "data", predict, CPU, out)
    assert tta == "hflip"  # what `auto` makes of a model trained with hflip only

    stored = read_oof(out)
    assert stored.file_names == [im.file_name for im in images]
    assert stored.classes == CLASSES
    assert len(stored) == 3
    geometry = Geometry(resize, 32, 32 if resize == "crop" else None)
    # What predict computes for this one model, as float32: the stored copy is it, quantised.
    dataset = ImageDataset(tmp_path / "data", images, geometry)
    direct = dict(predict_probabilities([model], None, dataset, "hflip", [1.0], 2, 0, CPU))
    for index, (image, shape) in enumerate(zip(images, shapes, strict=True)):
        probs = stored.probabilities(index)
        assert tuple(probs.shape) == (3, *shape) == (3, *geometry.inference_shape(image.height, image.width))
        assert (probs.sum(0) - 1).abs().max() <= 3 / 510 + 1e-6
        assert (probs - direct[index]).abs().max() <= 1 / 510 + 1e-5
    assert [name for name, _ in stored] == stored.file_names


def test_write_oof_predicts_in_sliding_windows_when_switched_on(tmp_path: Path) -> None:
    images = _images(tmp_path / "data")
    augment = AugmentParams(size=32, resize="crop", hflip=0.5, vflip=0.0)
    model = _checkpoint(tmp_path / "best.pt", augment)
    predict = PredictParams(tta="none", batch_size=2, num_workers=0, sliding_window=True, window_overlap=0.5)
    write_oof(tmp_path / "best.pt", images, tmp_path / "data", predict, CPU, tmp_path / "fold0.npz")
    stored = read_oof(tmp_path / "fold0.npz")
    dataset = ImageDataset(tmp_path / "data", images, Geometry("crop", 32, 32))
    tiled = dict(predict_probabilities([model], None, dataset, "none", [1.0], 2, 0, CPU, True, 0.5))
    whole = dict(predict_probabilities([model], None, dataset, "none", [1.0], 2, 0, CPU))
    for index, image in enumerate(images):
        probs = stored.probabilities(index)
        assert tuple(probs.shape) == (3, *dataset.geometry.inference_shape(image.height, image.width))
        assert (probs - tiled[index]).abs().max() <= 1 / 510 + 1e-5
    # The two wider-than-a-tile images (32x58, 53x32) differ from whole-image inference: it was tiled.
    assert all((stored.probabilities(i) - whole[i]).abs().max() > 0.01 for i in (0, 2))


def test_write_oof_refuses_a_tta_the_checkpoint_never_trained_with(tmp_path: Path) -> None:
    images = _images(tmp_path / "data")
    _checkpoint(tmp_path / "best.pt", AugmentParams(size=32, hflip=0.5, vflip=0.0))
    out = tmp_path / "fold0.npz"
    with pytest.raises(UserError, match=r"predict\.tta 'vflip' .* augment\.vflip = 0\.0"):
        write_oof(tmp_path / "best.pt", images, tmp_path / "data", PredictParams(tta="vflip"), CPU, out)
    assert not out.exists()


def test_read_oof_reads_the_documented_format(tmp_path: Path) -> None:
    # Written by numpy itself, as the module docstring describes: names, classes, p<i> uint8 (C, h, w).
    stored = [np.array([[[0, 255]], [[255, 0]]], np.uint8), np.full((2, 3, 1), 51, np.uint8)]
    np.savez_compressed(
        tmp_path / "f.npz", file_names=np.array(["a.png", "b/c.png"]), classes=np.array(["bg", "x"]),
        p0=stored[0], p1=stored[1],
    )  # fmt: skip
    oof = read_oof(tmp_path / "f.npz")
    assert (oof.path, oof.file_names, oof.classes, len(oof)) == (
        tmp_path / "f.npz",
        ["a.png", "b/c.png"],
        ["bg", "x"],
        2,
    )
    torch.testing.assert_close(oof.probabilities(0), torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]))
    torch.testing.assert_close(oof.probabilities(1), torch.full((2, 3, 1), 0.2))


def _npz_without_probabilities(path: Path) -> None:
    np.savez_compressed(path, something=np.zeros(3))


def _truncated_npz(path: Path) -> None:
    np.savez_compressed(
        path, file_names=np.array(["a.png"]), classes=np.array(CLASSES), p0=np.zeros((3, 4, 4))
    )
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_text("file_names,classes\n"),
        lambda path: path.write_bytes(b"\x93NUMPY not really"),
        _npz_without_probabilities,
        _truncated_npz,
    ],
    ids=["text", "bad-npy", "other-npz", "truncated"],
)
def test_read_oof_of_a_foreign_file_is_a_one_line_user_error(tmp_path: Path, write) -> None:
    path = tmp_path / "oof/m/fold0.npz"
    path.parent.mkdir(parents=True)
    write(path)
    with pytest.raises(UserError, match=r"oof/m/fold0\.npz: not out-of-fold probabilities") as info:
        read_oof(path)
    assert "\n" not in str(info.value)
    assert "re-run its oof stage" in str(info.value)


def test_read_oof_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"fold3\.npz: out-of-fold probabilities not found") as info:
        read_oof(tmp_path / "fold3.npz")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not found"):
        read_oof(tmp_path)  # a folder is not the file either
