"""Tests for pipeline.inference.oof: quantised probabilities, written from a real checkpoint or the predict
stage and read back."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_params
from PIL import Image

from pipeline.config import AugmentParams, PredictParams
from pipeline.data.geometry import Geometry
from pipeline.data.loaders import ImageDataset
from pipeline.data.manifest import ImageSet, Manifest, write_manifest
from pipeline.data.probstore import (
    dequantise,
    probabilities_writer,
    quantise,
    read_probabilities,
    write_probabilities,
)
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError
from pipeline.evaluation.submission import iter_submission
from pipeline.inference.infer import (
    Member,
    load_ensemble,
    predict_members,
    predict_probabilities,
    probabilities_to_mask,
)
from pipeline.inference.oof import write_oof
from pipeline.models.checkpoints import checkpoint_state, save_checkpoint
from pipeline.models.factory import build_model

CPU = torch.device("cpu")
STAGES = Path(__file__).resolve().parents[1] / "stages"
CLASSES = ["background", "can", "bottle"]
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

    stored = read_probabilities(out)
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
    stored = read_probabilities(tmp_path / "fold0.npz")
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


def test_write_oof_of_a_damaged_best_checkpoint_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    images = _images(tmp_path / "data")
    best = tmp_path / "best.pt"
    _checkpoint(best, AugmentParams(size=32))
    data = best.read_bytes()
    middle = len(data) // 2  # zeroed pages: torch.load alone would read them as weights
    best.write_bytes(data[:middle] + bytes(4096) + data[middle + 4096 :])
    out = tmp_path / "fold0.npz"
    with pytest.raises(UserError) as raised:
        write_oof(best, images, tmp_path / "data", PredictParams(tta="none"), CPU, out)
    assert str(raised.value).startswith(f"{best}: damaged checkpoint") and "\n" not in str(raised.value)
    assert not out.exists()


def test_read_probabilities_reads_the_documented_format(tmp_path: Path) -> None:
    # Written by numpy itself, as the module docstring describes: names, classes, p<i> uint8 (C, h, w).
    stored = [np.array([[[0, 255]], [[255, 0]]], np.uint8), np.full((2, 3, 1), 51, np.uint8)]
    np.savez_compressed(
        tmp_path / "f.npz", file_names=np.array(["a.png", "b/c.png"]), classes=np.array(["bg", "x"]),
        p0=stored[0], p1=stored[1],
    )  # fmt: skip
    oof = read_probabilities(tmp_path / "f.npz")
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
def test_read_probabilities_of_a_foreign_file_is_a_one_line_user_error(tmp_path: Path, write) -> None:
    path = tmp_path / "oof/m/fold0.npz"
    path.parent.mkdir(parents=True)
    write(path)
    with pytest.raises(UserError, match=r"oof/m/fold0\.npz: not out-of-fold probabilities") as info:
        read_probabilities(path)
    assert "\n" not in str(info.value)
    assert "re-run its oof stage" in str(info.value)


def test_read_probabilities_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"fold3\.npz: out-of-fold probabilities not found") as info:
        read_probabilities(tmp_path / "fold3.npz")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not found"):
        read_probabilities(tmp_path)  # a folder is not the file either


def _softmax(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).softmax(0)


def test_write_probabilities_round_trips_names_classes_and_each_image_s_shape(tmp_path: Path) -> None:
    items = [
        ("b/1.jpg", _softmax(3, 5, 7)),
        ("a.jpg", _softmax(3, 2, 2, seed=1)),
        ("c.png", _softmax(3, 9, 4)),
    ]
    out = tmp_path / "predictions/test.npz"
    assert write_probabilities(out, CLASSES, iter(items)) == 3
    stored = read_probabilities(out)
    assert (stored.file_names, stored.classes, len(stored)) == (["b/1.jpg", "a.jpg", "c.png"], CLASSES, 3)
    for (name, probs), (stored_name, back) in zip(items, stored, strict=True):
        assert stored_name == name and back.shape == probs.shape
        assert (back - probs).abs().max() <= 1 / 510 + 1e-7
    # What numpy itself reads: the documented arrays, nothing else.
    with np.load(out) as raw:
        assert sorted(raw.files) == ["classes", "file_names", "p0", "p1", "p2"]
        np.testing.assert_array_equal(raw["p1"], quantise(items[1][1]))
    assert [p.name for p in tmp_path.joinpath("predictions").iterdir()] == ["test.npz"]  # no temporary left


def test_write_probabilities_of_no_images_reads_back_empty(tmp_path: Path) -> None:
    write_probabilities(tmp_path / "e.npz", CLASSES, [])
    stored = read_probabilities(tmp_path / "e.npz")
    assert (stored.file_names, stored.classes, list(stored)) == ([], CLASSES, [])


def test_probabilities_writer_leaves_the_old_file_when_the_block_fails(tmp_path: Path) -> None:
    out = tmp_path / "test.npz"
    write_probabilities(out, CLASSES, [("old.jpg", _softmax(3, 2, 2))])
    with pytest.raises(RuntimeError, match="stop"), probabilities_writer(out, CLASSES) as write:
        write("new.jpg", _softmax(3, 4, 4))
        raise RuntimeError("stop")
    assert read_probabilities(out).file_names == ["old.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["test.npz"]
    with pytest.raises(ValueError, match=r"x\.jpg: probabilities must be \(3, h, w\)"):
        write_probabilities(out, CLASSES, [("x.jpg", _softmax(2, 4, 4))])
    assert read_probabilities(out).file_names == ["old.jpg"]


def test_read_probabilities_names_what_the_file_should_hold_and_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^\S*test\.npz: test probabilities not found \(run dvc repro\)$"):
        read_probabilities(tmp_path / "test.npz", "test probabilities", "run dvc repro")
    (tmp_path / "test.npz").write_text("no zip")
    with pytest.raises(UserError, match=r"test\.npz: not test probabilities \(.*\); run dvc repro$"):
        read_probabilities(tmp_path / "test.npz", "test probabilities", "run dvc repro")


@pytest.mark.parametrize(
    "p0", [np.zeros((2, 4, 4), np.uint8), np.zeros((3, 4, 4), np.float32), np.zeros((3, 4), np.uint8)]
)
def test_a_misshapen_image_array_is_a_one_line_user_error_naming_the_image(tmp_path: Path, p0) -> None:
    path = tmp_path / "f.npz"
    np.savez_compressed(path, file_names=np.array(["a.png"]), classes=np.array(CLASSES), p0=p0)
    stored = read_probabilities(path, remedy="do it again")
    with pytest.raises(UserError, match=r"f\.npz: probabilities of 'a\.png' are .* not uint8 \(3, h, w\)"):
        stored.probabilities(0)
    np.savez_compressed(path, file_names=np.array(["a.png", "b.png"]), classes=np.array(CLASSES), p0=p0)
    with pytest.raises(UserError, match=r"probabilities of 'b\.png' unreadable \(.*\); do it again$"):
        read_probabilities(path, remedy="do it again").probabilities(1)


PREDICT_MEMBERS = {  # one squashes, one crops: on wide and tall images their inference shapes differ
    "unet": AugmentParams(size=32, hflip=0.5),
    "crop": AugmentParams(size=32, hflip=0.5, resize="crop"),
}


def test_predict_stage_stores_the_merged_test_probabilities_at_the_largest_member_s_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images(tmp_path / "data")
    for name, augment in PREDICT_MEMBERS.items():
        for fold in (0, 1):
            _checkpoint(tmp_path / f"models/{name}/fold{fold}/best.pt", augment)
    weights = [[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]]
    fitted = {"members": list(PREDICT_MEMBERS), "folds": [0, 1], "classes": CLASSES, "weights": weights}
    fitted["decision"] = {"class_scales": None, "postprocess": {}}
    (tmp_path / "weights.json").write_text(json.dumps(fitted))
    manifest = Manifest(CLASSES, [1, 2], [], np.zeros((0, 3), dtype=bool), images, {"used": 0})
    write_manifest(tmp_path / "data/manifest.json", manifest)
    config = {"predict": {"tta": "auto", "batch_size": 2}, "submission": {"format": "rle", "size": None}}
    write_params(tmp_path / "params.yaml", config)
    args = ["--models", "models", "--weights", "weights.json", "--root", "data"]
    args += [
        "--manifest",
        "data/manifest.json",
        "--out",
        "sub.csv",
        "--probabilities",
        "predictions/test.npz",
        "--refits",
        "refits",
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["predict.py", *args])
    runpy.run_path(str(STAGES / "predict.py"), run_name="__main__")

    stored = read_probabilities(tmp_path / "predictions/test.npz")
    assert (stored.file_names, stored.classes) == ([im.file_name for im in images], CLASSES)
    members = []
    for name in PREDICT_MEMBERS:
        folds = load_ensemble([tmp_path / f"models/{name}/fold{k}/best.pt" for k in (0, 1)])
        members.append(Member(name, folds, "hflip"))
    direct = dict(
        predict_members(members, torch.tensor(weights), tmp_path / "data", images, [1.0], 2, 0, CPU)
    )
    written = dict(iter_submission(tmp_path / "sub.csv", ImageSet(images, 3), None))
    crop = Geometry("crop", 32, 32)
    for index, image in enumerate(images):
        probs = stored.probabilities(index)
        shapes = [(32, 32), crop.inference_shape(image.height, image.width)]
        assert tuple(probs.shape[1:]) == max(shapes, key=lambda s: s[0] * s[1])
        assert (probs - direct[index]).abs().max() <= 1 / 510 + 1e-5
        # The submission still comes from the unquantised probabilities.
        expected = probabilities_to_mask(direct[index], (image.height, image.width))
        np.testing.assert_array_equal(written[image.file_name], expected)
