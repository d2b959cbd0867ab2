"""Tests for pipeline.data.pseudo, stages/pseudo.py and `python -m pipeline teacher`: thresholds, sizes, the
empty set when disabled, errors, round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_stage, write_params

from pipeline.data.geometry import confident_argmax
from pipeline.data.images import IGNORE_INDEX, read_mask
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.data.probstore import read_probabilities, write_probabilities
from pipeline.data.pseudo import pseudo_mask, read_pseudo
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError
from pipeline.orchestration import cli

STAGE = Path(__file__).resolve().parents[1] / "stages" / "pseudo.py"
CLASSES = ["background", "can", "bottle"]
TEST = [ImageRecord(7, "t/a.jpg", 20, 30), ImageRecord(9, "t/b.png", 9, 6)]


def _softmax(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).mul(4).softmax(0)


def test_pixels_below_the_threshold_get_the_ignore_index() -> None:
    # Class 1's probability per pixel; class 0 has the rest. Binary fractions: no rounding at the edges.
    can = torch.tensor([[0.875, 0.625], [0.25, 0.0]])
    probs = torch.stack([1 - can, can])
    labels, confidence = confident_argmax(probs, (2, 2))
    np.testing.assert_array_equal(labels.numpy(), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(confidence.numpy(), [[0.875, 0.625], [0.75, 1.0]])
    assert labels.dtype == torch.uint8 and confidence.dtype == torch.float32
    np.testing.assert_array_equal(pseudo_mask(probs, (2, 2), 0.75), [[1, 255], [0, 0]])  # 0.75 is kept
    np.testing.assert_array_equal(pseudo_mask(probs, (2, 2), 0.9), [[255, 255], [255, 0]])
    np.testing.assert_array_equal(pseudo_mask(probs, (2, 2), 0.0), [[1, 1], [0, 0]])
    assert IGNORE_INDEX == 255


@pytest.mark.parametrize(("in_shape", "out_shape"), [((7, 5), (23, 31)), ((8, 8), (8, 8)), ((9, 12), (4, 5))])
def test_resizing_agrees_with_torch_bilinear_then_max(in_shape: tuple, out_shape: tuple) -> None:
    probs = _softmax(4, *in_shape)
    resized = F.interpolate(probs[None], size=out_shape, mode="bilinear", align_corners=False)[0]
    expected_confidence, expected_labels = resized.max(dim=0)
    for strip_bytes in (1, 2**20):  # one row per strip, and all rows at once
        labels, confidence = confident_argmax(probs, out_shape, strip_bytes=strip_bytes)
        assert tuple(labels.shape) == out_shape
        torch.testing.assert_close(labels.long(), expected_labels)
        torch.testing.assert_close(confidence, expected_confidence)
    mask = pseudo_mask(probs, out_shape, 0.5)
    expected = np.where(expected_confidence.numpy() < 0.5, 255, expected_labels.numpy())
    np.testing.assert_array_equal(mask, expected)


def _project(tmp_path: Path, enabled: bool, threshold: float = 0.5) -> Path:
    """A manifest of the TEST images and params.yaml; the teacher folder holds only its README."""
    manifest = Manifest(CLASSES, [1, 2], [], np.zeros((0, 3), dtype=bool), TEST, {"used": 0})
    write_manifest(tmp_path / "data/manifest.json", manifest)
    config = {"pseudo": {"enabled": enabled, "threshold": threshold}}
    write_params(tmp_path / "params.yaml", config)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher/README.md").write_text("the teacher\n")
    return tmp_path


def _teacher(path: Path, images: list[ImageRecord], classes: list[str] = CLASSES, seed: int = 0) -> list:
    """A teacher file of `images`' probabilities at (h, w) of half their size; returns the probabilities."""
    probs = [
        _softmax(len(classes), image.height // 2, image.width // 2, seed=seed + i)
        for i, image in enumerate(images)
    ]
    write_probabilities(path, classes, [(im.file_name, p) for im, p in zip(images, probs, strict=True)])
    return probs


def _run_stage(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stages/pseudo.py as dvc.yaml runs it, in this process."""
    args = ["--teacher", "teacher", "--manifest", "data/manifest.json", "--out", "data/pseudo"]
    run_stage("pseudo.py", args, cwd, monkeypatch)


def _stage_error(cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run_stage(cwd, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disabled_writes_the_same_empty_set_whatever_the_teacher_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _project(tmp_path, enabled=False)
    _run_stage(project, monkeypatch)
    without = _tree(project / "data/pseudo")
    assert list(without) == ["pseudo.json"]
    _teacher(project / "teacher/test.npz", TEST)
    _run_stage(project, monkeypatch)
    assert _tree(project / "data/pseudo") == without
    _teacher(project / "teacher/test.npz", TEST[:1], ["bg", "other"], seed=5)  # not even a matching one
    _run_stage(project, monkeypatch)
    assert _tree(project / "data/pseudo") == without

    pseudo = read_pseudo(project / "data/pseudo")
    assert (pseudo.threshold, pseudo.classes, pseudo.images) == (None, CLASSES, [])
    assert pseudo.presence.shape == (0, 3) and pseudo.labelled.shape == (0,)


def test_enabled_without_a_teacher_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _project(tmp_path, enabled=True)
    assert _stage_error(project, monkeypatch, capsys) == (
        "error: pseudo.enabled is true but teacher/test.npz is missing: "
        "run dvc repro, then python -m pipeline teacher"
    )
    assert not (project / "data/pseudo").exists()


@pytest.mark.parametrize(
    ("images", "classes", "message"),
    [
        (TEST[:1], CLASSES, r"test\.npz: lacks its test image 't/b\.png' \(data/manifest\.json\)"),
        (
            [*TEST, ImageRecord(3, "x.jpg", 8, 8), ImageRecord(4, "y.jpg", 8, 8)],
            CLASSES,
            r"holds 'x\.jpg' and 1 more, not one of its test images \(data/manifest\.json\)",
        ),
        ([*TEST, TEST[1]], CLASSES, r"holds some test image twice"),
        (TEST, ["background", "can"], r"classes \['background', 'can'\] differ from data/manifest\.json's"),
    ],
    ids=["missing", "extra", "twice", "classes"],
)
def test_a_teacher_of_other_images_or_classes_is_a_one_line_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    images: list[ImageRecord],
    classes: list[str],
    message: str,
) -> None:
    project = _project(tmp_path, enabled=True)
    _teacher(project / "teacher/test.npz", images, classes)
    error = _stage_error(project, monkeypatch, capsys)
    assert error.startswith("error: teacher/test.npz: ")
    assert error.endswith("run dvc repro, then python -m pipeline teacher")
    assert re.search(message, error), error
    assert not (project / "data/pseudo").exists()


def test_a_corrupt_teacher_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _project(tmp_path, enabled=True)
    (project / "teacher/test.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert _stage_error(project, monkeypatch, capsys).startswith(
        "error: teacher/test.npz: not teacher probabilities ("
    )


def test_enabled_labels_each_test_image_at_its_own_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _project(tmp_path, enabled=True, threshold=0.6)
    probs = _teacher(project / "teacher/test.npz", list(reversed(TEST)))  # any order of the same images
    probs.reverse()
    _run_stage(project, monkeypatch)

    pseudo = read_pseudo(project / "data/pseudo")
    assert (pseudo.threshold, pseudo.classes, pseudo.images) == (0.6, CLASSES, TEST)
    assert pseudo.masks_dir == project / "data/pseudo/masks"
    raw = json.loads((project / "data/pseudo/pseudo.json").read_text())
    assert list(raw) == ["threshold", "classes", "images"]
    assert list(raw["images"][0]) == ["file_name", "id", "height", "width", "presence", "labelled"]
    stored = read_probabilities(project / "teacher/test.npz")
    for row, (image, teacher_probs) in enumerate(zip(TEST, probs, strict=True)):
        mask = read_mask(pseudo.mask_path(image))
        assert (
            pseudo.mask_path(image).relative_to(pseudo.masks_dir).as_posix() == image.file_name[:-4] + ".png"
        )
        # The stored (quantised) teacher, resized with torch to the native size, then thresholded.
        quantised = stored.probabilities(stored.file_names.index(image.file_name))
        assert (quantised - teacher_probs).abs().max() <= 1 / 510 + 1e-7
        resized = F.interpolate(quantised[None], (image.height, image.width), mode="bilinear")[0]
        confidence, labels = resized.max(dim=0)
        expected = np.where(confidence.numpy() < 0.6, 255, labels.numpy())
        np.testing.assert_array_equal(mask, expected)
        assert 0 < (expected == 255).sum() < expected.size  # the threshold cut some pixels, not all
        kept = expected[expected != 255]
        np.testing.assert_array_equal(pseudo.presence[row], [(kept == k).any() for k in range(3)])
        assert pseudo.labelled[row] == pytest.approx(kept.size / expected.size)
    assert sorted(p.name for p in (project / "data").iterdir()) == [
        "manifest.json",
        "pseudo",
    ]  # no temporaries


def test_read_pseudo_of_a_missing_or_foreign_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pseudo\.json: pseudo-labels not found \(run the pseudo stage\)$"):
        read_pseudo(tmp_path)
    for text in (
        "{",
        '{"threshold": 0.9}',
        '{"threshold": 0.9, "classes": ["a"], "images": [{"file_name": 1}]}',
    ):
        (tmp_path / "pseudo.json").write_text(text)
        with pytest.raises(
            UserError, match=r"pseudo\.json: not pseudo-labels \(.*\); re-run the pseudo stage"
        ) as info:
            read_pseudo(tmp_path)
        assert "\n" not in str(info.value)
    entry = {"file_name": "a.jpg", "id": 1, "height": 2, "width": 2, "presence": [True], "labelled": 1.0}
    (tmp_path / "pseudo.json").write_text(
        json.dumps({"threshold": 0.9, "classes": ["bg", "x"], "images": [entry]})
    )
    with pytest.raises(UserError, match=r"a\.jpg: presence needs 2 entries"):
        read_pseudo(tmp_path)


def test_cli_teacher_freezes_the_predictions_and_refuses_a_corrupt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions, out = tmp_path / "predictions/test.npz", tmp_path / "teacher/test.npz"
    with pytest.raises(
        UserError, match=r"predictions/test\.npz: test probabilities not found \(run dvc repro first\)"
    ):
        cli.main(["teacher", "--predictions", str(predictions), "--out", str(out)])
    predictions.parent.mkdir()
    _teacher(predictions, TEST)
    cli.main(["teacher", "--predictions", str(predictions), "--out", str(out)])
    assert out.read_bytes() == predictions.read_bytes()
    assert capsys.readouterr().out == (
        f"froze {predictions} as {out}: 2 test images, 3 classes (background, can, bottle); "
        "pseudo.enabled: true in params.yaml uses it\n"
    )
    frozen = out.read_bytes()

    predictions.write_bytes(predictions.read_bytes()[:-30])  # truncated: its zip directory is gone
    with pytest.raises(UserError, match=r"test\.npz: not test probabilities \(.*\); run dvc repro first$"):
        cli.main(["teacher", "--predictions", str(predictions), "--out", str(out)])
    np.savez_compressed(
        predictions, file_names=np.array(["a.jpg"]), classes=np.array(CLASSES), p0=np.zeros((2, 2))
    )
    with pytest.raises(UserError, match=r"probabilities of 'a\.jpg' are float64 \(2, 2\)"):
        cli.main(["teacher", "--predictions", str(predictions), "--out", str(out)])
    assert out.read_bytes() == frozen  # the frozen teacher is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.npz"]


def test_cli_teacher_defaults_are_dvc_yaml_s_paths() -> None:
    stages = yaml.safe_load((STAGE.parents[1] / "dvc.yaml").read_text())["stages"]
    args = cli.build_parser().parse_args(["teacher"])
    assert str(args.predictions) in stages["predict"]["outs"]
    assert f"--teacher {args.out.parent}" in stages["pseudo"]["cmd"]
    assert str(args.out.parent) in stages["pseudo"]["deps"]
