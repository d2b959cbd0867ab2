"""Tests for pipeline.bundle: reading and checking a bundle's description, the time limit, and the test
image lists predict-bundle reads (hand-made files; the export-then-predict run is in test_e2e.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bundle.layout import (
    SPEC_FILE,
    BundleMember,
    BundleSpec,
    library_versions,
    read_spec,
    write_spec,
)
from pipeline.bundle.predict import read_test_images, within_time_limit
from pipeline.digest import sha256_file
from pipeline.errors import UserError


def _bundle(folder: Path, **changes: object) -> BundleSpec:
    """A bundle folder with one member of two 'checkpoints' (any bytes: read_spec checks hashes only)."""
    files = {}
    for fold in (0, 1):
        path = folder / f"models/unet/fold{fold}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([fold]) * 100)
        files[f"models/unet/fold{fold}.pt"] = sha256_file(path)
    spec = BundleSpec(
        classes=["background", "a", "b"],
        members=[
            BundleMember(
                "unet", "hflip", {"mode": "squash", "size": 64, "short_side": None}, list(files), [], None
            )
        ],
        weights=[[1.0, 1.0, 1.0]],
        decision={"class_scales": None, "postprocess": {}},
        scales=[1.0],
        batch_size=2,
        num_workers=0,
        amp=True,
        window_overlap=None,
        submission_format="rle",
        rle_order="column",
        size=None,
        params_sha256="0" * 64,
        versions=library_versions(),
        files=files,
    )
    spec = replace(spec, **changes)
    write_spec(folder, spec)
    return spec


def test_a_bundle_reads_back_as_written(tmp_path: Path) -> None:
    spec = _bundle(tmp_path)
    assert read_spec(tmp_path) == spec


def test_a_changed_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    _bundle(tmp_path)
    changed = tmp_path / "models/unet/fold1.pt"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\xff")
    with pytest.raises(UserError, match=r"fold1\.pt: SHA-256 differs from the one bundle\.json records"):
        read_spec(tmp_path)


def test_a_missing_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    _bundle(tmp_path)
    (tmp_path / "models/unet/fold0.pt").unlink()
    with pytest.raises(UserError, match=r"fold0\.pt: missing from the bundle"):
        read_spec(tmp_path)


def test_a_folder_without_a_description_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a trashseg bundle"):
        read_spec(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.update(version=99), "bundle format version 99"),
        (lambda raw: raw.pop("weights"), "incomplete bundle description"),
        (lambda raw: raw.update(weights=[[1.0, 1.0]]), "one row per member and one column per class"),
        (lambda raw: raw["members"][0].update(checkpoints=["models/other.pt"]), "not among the bundle's"),
        (lambda raw: raw["files"].update({"../escape.pt": "0" * 64}), "climbs out"),
        (lambda raw: raw.update(decision={"class_scales": {"a": 2.0}, "postprocess": {}}), "label decision"),
        (lambda raw: raw.update(decision={"class_scales": None, "postprocess": {"z": {}}}), "label decision"),
    ],
)
def test_a_malformed_description_is_one_line_naming_the_file(tmp_path: Path, edit, message: str) -> None:
    _bundle(tmp_path)
    raw = json.loads((tmp_path / SPEC_FILE).read_text())
    edit(raw)
    (tmp_path / SPEC_FILE).write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message) as caught:
        read_spec(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / SPEC_FILE)) and "\n" not in str(caught.value)


def test_other_library_versions_are_a_warning_not_a_refusal(tmp_path: Path, capsys) -> None:
    _bundle(tmp_path, versions={**library_versions(), "torch": "0.0.1"})
    read_spec(tmp_path)
    assert "torch 0.0.1 -> " in capsys.readouterr().err


class _Clock:
    """A clock each image of the stream advances by `step` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


def _stream(clock: _Clock, n: int):
    for index in range(n):
        clock.now += clock.step
        yield index, torch.zeros(1)


def test_a_run_that_fits_its_time_limit_passes_every_image(capsys) -> None:
    clock = _Clock(1.0)  # 10 images at 1 s each, limit 12 s
    out = list(within_time_limit(_stream(clock, 10), 10, 12.0, started=0.0, first=2, clock=clock))
    assert [index for index, _ in out] == list(range(10))
    assert "2 of 10 images after 2.0 s; projected 10 s of the 12 s limit" in capsys.readouterr().out


def test_a_run_projected_over_its_limit_stops_after_the_first_batch() -> None:
    clock = _Clock(1.0)  # 10 images at 1 s each, limit 8 s: known after the first 2
    passed = []
    with pytest.raises(UserError, match=r"2 of 10 images took 2\.0 s, projected total 10 s; stopped"):
        for item in within_time_limit(_stream(clock, 10), 10, 8.0, started=0.0, first=2, clock=clock):
            passed.append(item)
    assert len(passed) == 2


def test_the_time_before_the_first_image_counts() -> None:
    clock = _Clock(1.0)
    clock.now = 5.0  # loading the models took 5 s: 5 + 10 images x 1 s > 12 s
    with pytest.raises(UserError, match="projected total 15 s"):
        list(within_time_limit(_stream(clock, 10), 10, 12.0, started=0.0, first=2, clock=clock))


def test_test_images_from_a_folder_in_name_order_with_their_sizes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name, (h, w) in {"b.png": (8, 6), "a.jpg": (4, 5), "sub/c.png": (3, 3)}.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    records, root = read_test_images(tmp_path, None)
    assert root == tmp_path
    assert [(r.file_name, r.height, r.width) for r in records] == [
        ("a.jpg", 4, 5),
        ("b.png", 8, 6),
        ("sub/c.png", 3, 3),
    ]


def test_test_images_from_a_json_keep_its_order_and_read_from_its_folder(tmp_path: Path) -> None:
    images = [
        {"id": 7, "file_name": "z.png", "height": 4, "width": 4},
        {"id": 2, "file_name": "a.png", "height": 2, "width": 3},
    ]
    (tmp_path / "test.json").write_text(json.dumps({"images": images}))
    records, root = read_test_images(tmp_path / "test.json", None)
    assert [r.file_name for r in records] == ["z.png", "a.png"] and root == tmp_path
    assert read_test_images(tmp_path / "test.json", tmp_path / "elsewhere")[1] == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"categories": []}, "no 'images' list"),
        ({"images": []}, "'images' list is empty"),
        ([], "no 'images' list"),
    ],
)
def test_a_test_json_without_images_is_one_line(tmp_path: Path, content: object, message: str) -> None:
    (tmp_path / "test.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        read_test_images(tmp_path / "test.json", None)


def test_an_empty_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no image files"):
        read_test_images(tmp_path, None)
