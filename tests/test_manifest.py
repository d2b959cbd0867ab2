"""Tests for pipeline.data.manifest and the masks stage that writes it."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_params

from pipeline.config import DemoParams
from pipeline.data import coco
from pipeline.data.demo import generate_demo
from pipeline.data.images import mask_relpath, read_mask
from pipeline.data.manifest import ImageSet, Manifest, read_manifest, write_manifest
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _manifest() -> Manifest:
    train = [
        ImageRecord(7, "a/x.jpg", 40, 72),
        ImageRecord(3, "b.png", 64, 64),
        ImageRecord(9, "c d.jpg", 5, 3),
    ]
    presence = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=bool)
    test = [ImageRecord(1, "t/0.jpg", 30, 50)]
    annotations = {"used": 4, "skipped": 1, "clipped": 2, "ignored": 0}
    return Manifest(["background", "can", "bottle"], [5, 2], train, presence, test, annotations)


def test_manifest_round_trips(tmp_path: Path) -> None:
    written = _manifest()
    write_manifest(tmp_path / "data/manifest.json", written)
    read = read_manifest(tmp_path / "data/manifest.json")
    assert (read.classes, read.category_ids, read.annotations) == (
        written.classes,
        written.category_ids,
        written.annotations,
    )
    assert read.train == written.train and read.test == written.test  # ids, names and sizes
    np.testing.assert_array_equal(read.presence, written.presence)
    assert read.presence.dtype == bool
    assert read.n_classes == 3
    assert read.train_names() == ["a/x.jpg", "b.png", "c d.jpg"]
    assert read.test_set() == ImageSet(written.test, 3)
    # On disk: each training image lists the class indexes its mask holds.
    raw = json.loads((tmp_path / "data/manifest.json").read_text())
    assert [entry["classes"] for entry in raw["train"]] == [[0, 2], [0, 1, 2], [1]]


def test_a_missing_manifest_says_to_run_the_masks_stage(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"manifest\.json: manifest not found \(run the masks stage\)"):
        read_manifest(tmp_path / "manifest.json")


def _without(key: str) -> str:
    raw = json.loads(json.dumps(_raw()))
    del raw[key]
    return json.dumps(raw)


def _raw() -> dict:
    return {
        "classes": ["background", "can"],
        "category_ids": [1],
        "annotations": {"used": 1},
        "train": [{"file_name": "a.jpg", "id": 0, "height": 4, "width": 4, "classes": [0, 1]}],
        "test": [],
    }


def _with_train_entry(**entry: object) -> str:
    raw = _raw()
    raw["train"] = [{**raw["train"][0], **entry}]
    return json.dumps(raw)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        _without("train"),
        _without("classes"),
        _with_train_entry(classes=[0, 2]),  # class 2 of 2 classes
        _with_train_entry(height="tall"),
        _with_train_entry(classes="all"),
        json.dumps({**_raw(), "test": [{"file_name": "t.jpg"}]}),
    ],
    ids=["empty", "not-json", "list", "no-train", "no-classes", "class-out-of-range", "bad-height",
         "classes-string", "test-without-size"],
)  # fmt: skip
def test_a_malformed_manifest_is_a_one_line_user_error_naming_the_masks_stage(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(
        UserError, match=r"manifest\.json: not a trashseg manifest .*re-run the masks stage"
    ) as info:
        read_manifest(path)
    assert "\n" not in str(info.value)


def test_masks_stage_manifest_matches_the_masks_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_demo(tmp_path / "demo", DemoParams(n_train=6, n_test=2, image_size=32, max_objects=3))
    write_params(tmp_path / "params.yaml", {"data": {"root": "demo"}})
    args = ["--root", "demo", "--train-json", "demo/train.json", "--test-json", "demo/test.json"]
    args += ["--out", "masks", "--manifest", "manifest.json"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["masks.py", *args])
    runpy.run_path(str(ROOT / "stages/masks.py"), run_name="__main__")

    manifest = read_manifest(tmp_path / "manifest.json")
    train = coco.load_coco(tmp_path / "demo/train.json")
    test = json.loads((tmp_path / "demo/test.json").read_text())
    assert manifest.classes == train.classes and manifest.category_ids == train.category_ids
    assert manifest.train == train.images
    assert [(im.file_name, im.height, im.width) for im in manifest.test] == [
        (im["file_name"], im["height"], im["width"]) for im in test["images"]
    ]
    masks = [read_mask(tmp_path / "masks" / mask_relpath(name)) for name in manifest.train_names()]
    presence = [np.bincount(mask.ravel(), minlength=manifest.n_classes) > 0 for mask in masks]
    np.testing.assert_array_equal(manifest.presence, np.array(presence))
    assert manifest.presence[:, 1:].any()  # the demo images hold objects: not a vacuous comparison
    assert manifest.annotations["used"] == train.n_annotations
