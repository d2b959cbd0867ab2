"""Submission CSVs: writing, one test per malformed case, reading back, scoring, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import sklearn.metrics
from conftest import write_params

from pipeline import metrics
from pipeline.data import coco
from pipeline.data.records import CocoSet
from pipeline.errors import UserError
from pipeline.evaluation import rle
from pipeline.evaluation.sidecar import describe, read_sidecar, write_sidecar
from pipeline.evaluation.submission import (
    HEADERS,
    SubmissionWriter,
    check_submission,
    field_limit,
    iter_submission,
    score_submission,
    validate_submission,
)
from pipeline.orchestration import cli

# pycocotools' decode (inside coco.rasterize) trips a numpy 2 deprecation warning in its own code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

IMAGES = [  # (file_name, height, width); one image without objects, none square but one
    ("b/1.jpg", 6, 8),
    ("b/2.jpg", 8, 8),
    ("b/3.jpg", 5, 7),
]
CATEGORIES = [{"id": 1, "name": "paper"}, {"id": 2, "name": "can"}, {"id": 3, "name": "glass"}]
ANNOTATIONS = [
    # image 1: a small paper box on top of a big glass box (the overlap rules disagree there), plus a can.
    {"id": 1, "image_id": 1, "category_id": 3, "segmentation": [[0, 0, 6, 0, 6, 5, 0, 5]]},
    {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
    {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [[6, 3, 8, 3, 8, 6, 6, 6]]},
    {"id": 4, "image_id": 2, "category_id": 2, "segmentation": [[1, 1, 7, 1, 7, 7]]},
    {"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[0, 6, 3, 6, 3, 8, 0, 8]]},
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """test.json (images only) and truth.json (with annotations) in tmp_path."""
    images = [{"id": i + 1, "file_name": f, "height": h, "width": w} for i, (f, h, w) in enumerate(IMAGES)]
    test = tmp_path / "test.json"
    truth = tmp_path / "truth.json"
    test.write_text(json.dumps({"images": images, "categories": CATEGORIES}))
    truth.write_text(json.dumps({"images": images, "categories": CATEGORIES, "annotations": ANNOTATIONS}))
    return {"test": test, "truth": truth}


@pytest.fixture
def truth(files: dict[str, Path]) -> CocoSet:
    return coco.load_coco(files["truth"])


def _truth_masks(truth: CocoSet, size: int | None = None, overlap: coco.Overlap = "area_desc") -> dict:
    masks = {}
    for image in truth.images:
        mask = coco.rasterize(truth, image, overlap)
        if size is not None:
            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
        masks[image.file_name] = mask
    return masks


def _write(path: Path, fmt: str, masks: dict, n_classes: int = 4, order: str = "column") -> Path:
    with SubmissionWriter(path, fmt, n_classes, order) as out:
        for image_id, mask in masks.items():
            out.write(image_id, mask)
    return path


# --- writing ----------------------------------------------------------------------------------------------


def test_rle_writer_rows(tmp_path: Path, truth: CocoSet) -> None:
    masks = _truth_masks(truth)
    lines = _write(tmp_path / "s.csv", "rle", masks).read_text().splitlines()
    assert lines[0] == "image_id,class_id,EncodedPixels"
    assert len(lines) == 1 + 3 * 3
    expected = [
        f"{image_id},{label},{rle.encode(mask == label)}"
        for image_id, mask in masks.items()
        for label in (1, 2, 3)
    ]
    assert lines[1:] == expected
    assert lines[9] == "b/3.jpg,3,"  # an absent class has an empty EncodedPixels


def test_dense_writer_is_row_major_with_multi_digit_classes(tmp_path: Path) -> None:
    mask = np.array([[0, 7, 10], [255, 99, 1]], dtype=np.uint8)
    lines = _write(tmp_path / "s.csv", "dense", {"x.jpg": mask}, n_classes=256).read_text().splitlines()
    assert lines == ["image_id,PredictionString", "x.jpg,0 7 10 255 99 1"]


def test_dense_writer_matches_a_plain_join(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = {f"{i}.jpg": rng.integers(0, 256, size=(7 + i, 5), dtype=np.uint8) for i in range(5)}
    lines = _write(tmp_path / "s.csv", "dense", masks, n_classes=256).read_text().splitlines()
    assert lines[1:] == [f"{k},{' '.join(map(str, m.ravel().tolist()))}" for k, m in masks.items()]


@pytest.mark.parametrize("order", ["column", "row"])
@pytest.mark.parametrize("fmt", ["rle", "dense"])
def test_written_masks_read_back_identical(tmp_path: Path, truth: CocoSet, fmt: str, order: str) -> None:
    masks = _truth_masks(truth)
    path = _write(tmp_path / "s.csv", fmt, masks, order=order)
    read = dict(iter_submission(path, truth, None, order))
    assert list(read) == list(masks)
    for image_id, mask in masks.items():
        assert read[image_id].dtype == np.uint8
        assert np.array_equal(read[image_id], mask)


def test_writer_leaves_no_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("old content\n")
    with pytest.raises(RuntimeError), SubmissionWriter(path, "rle", 4) as out:
        out.write("a.jpg", np.zeros((2, 2), dtype=np.uint8))
        raise RuntimeError("inference crashed")
    assert path.read_text() == "old content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]  # no temporary file left behind


def test_writer_rejects_misuse(tmp_path: Path) -> None:
    with SubmissionWriter(tmp_path / "s.csv", "rle", 4) as out:
        out.write("a.jpg", np.zeros((2, 2), dtype=np.uint8))
        with pytest.raises(ValueError, match="written twice"):
            out.write("a.jpg", np.zeros((2, 2), dtype=np.uint8))
        with pytest.raises(ValueError, match=r"class indexes 0\.\.3"):
            out.write("b.jpg", np.full((2, 2), 4, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="outside"):
        out.write("c.jpg", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="valid: rle, dense"):
        SubmissionWriter(tmp_path / "t.csv", "parquet", 4)


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["rle", "dense"])
@pytest.mark.parametrize("size", [None, 4])
def test_valid_submission_has_no_problems(tmp_path: Path, truth: CocoSet, fmt: str, size: int | None) -> None:
    path = _write(tmp_path / "s.csv", fmt, _truth_masks(truth, size))
    report = check_submission(path, truth, size)
    assert report.problems == []
    assert report.fmt == fmt
    assert report.n_rows == (9 if fmt == "rle" else 3)


def _rle_lines() -> list[str]:
    """A valid rle submission with every mask empty: rows 2..10 are b/1 classes 1-3, b/2, b/3."""
    return [",".join(HEADERS["rle"])] + [f"{f},{k}," for f, _, _ in IMAGES for k in (1, 2, 3)]


def _dense_lines() -> list[str]:
    return [",".join(HEADERS["dense"])] + [f"{f}," + " ".join(["0"] * (h * w)) for f, h, w in IMAGES]


def _problems(tmp_path: Path, truth: CocoSet, lines: list[str] | bytes, size: int | None = None) -> list[str]:
    path = tmp_path / "bad.csv"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines))
    return validate_submission(path, truth, size)


def _edit(lines: list[str], row: int, text: str) -> list[str]:
    """`lines` with row `row` (1 = header) replaced."""
    return [text if i == row - 1 else line for i, line in enumerate(lines)]


def test_baseline_files_are_valid(tmp_path: Path, truth: CocoSet) -> None:
    assert _problems(tmp_path, truth, _rle_lines()) == []
    assert _problems(tmp_path, truth, _dense_lines()) == []


# One case per malformation: (the file's lines, or bytes; a problem line that must be reported).
RLE_CASES = {
    "wrong_header": (
        _edit(_rle_lines(), 1, "image_id,class,EncodedPixels"),
        "row 1: header 'image_id,class,EncodedPixels' is not 'image_id,class_id,EncodedPixels' (rle) "
        "or 'image_id,PredictionString' (dense)",
    ),
    "extra_id": (
        [*_rle_lines(), "b/9.jpg,1,"],
        "row 11: image_id 'b/9.jpg' is not an image of the test set",
    ),
    "duplicate_row": (
        [*_rle_lines(), "b/1.jpg,2,1 1"],
        "row 11: image b/1.jpg class 2: duplicate row (first at row 3)",
    ),
    "non_integer_token": (
        _edit(_rle_lines(), 2, "b/1.jpg,1,1 x"),
        "row 2: image b/1.jpg class 1: token 2 'x' is not an integer",
    ),
    "odd_token_count": (
        _edit(_rle_lines(), 3, "b/1.jpg,2,1 2 3"),
        "row 3: image b/1.jpg class 2: odd number of tokens (3); expected `start length` pairs",
    ),
    "zero_length": (
        _edit(_rle_lines(), 4, "b/1.jpg,3,5 0"),
        "row 4: image b/1.jpg class 3: run 1 (start 5) has length 0; lengths must be >= 1",
    ),
    "negative_length": (
        _edit(_rle_lines(), 5, "b/2.jpg,1,1 2 5 -3"),
        "row 5: image b/2.jpg class 1: run 2 (start 5) has length -3; lengths must be >= 1",
    ),
    "start_below_one": (
        _edit(_rle_lines(), 5, "b/2.jpg,1,0 2"),
        "row 5: image b/2.jpg class 1: run 1 starts at 0; starts are 1-indexed (>= 1)",
    ),
    "unsorted_runs": (
        _edit(_rle_lines(), 6, "b/2.jpg,2,10 2 1 2"),
        "row 6: image b/2.jpg class 2: run 2 (start 1) begins before run 1 (pixels 10-11); "
        "runs must be sorted and must not overlap",
    ),
    "overlapping_runs": (
        _edit(_rle_lines(), 6, "b/2.jpg,2,1 5 3 2"),
        "row 6: image b/2.jpg class 2: run 2 (start 3) begins inside run 1 (pixels 1-5); "
        "runs must be sorted and must not overlap",
    ),
    "run_past_the_end": (
        _edit(_rle_lines(), 8, "b/3.jpg,1,34 3"),  # b/3 is 5x7 = 35 pixels
        "row 8: image b/3.jpg class 1: run 1 (start 34, length 3) runs past the last pixel 35 of a 5x7 mask",
    ),
    "class_out_of_range": (
        [*_rle_lines(), "b/1.jpg,4,"],
        "row 11: image b/1.jpg: class_id 4 is out of range 1..3",
    ),
    "class_zero": (
        [*_rle_lines(), "b/1.jpg,0,1 1"],
        "row 11: image b/1.jpg: class_id 0 is out of range 1..3",
    ),
    "class_not_integer": (
        _edit(_rle_lines(), 2, "b/1.jpg,paper,"),
        "row 2: image b/1.jpg: class_id 'paper' is not an integer",
    ),
    "two_classes_one_pixel": (
        _edit(_edit(_rle_lines(), 2, "b/1.jpg,1,1 3 20 2"), 4, "b/1.jpg,3,8 1 21 4"),
        "row 4: image b/1.jpg: class 3 claims pixel 21, already claimed by class 1 (row 2)",
    ),
    "ragged_row_short": (
        _edit(_rle_lines(), 7, "b/2.jpg,3"),
        "row 7: 2 fields, expected 3 (image_id,class_id,EncodedPixels)",
    ),
    "ragged_row_long": (
        _edit(_rle_lines(), 7, "b/2.jpg,3,1 1,extra"),
        "row 7: 4 fields, expected 3 (image_id,class_id,EncodedPixels)",
    ),
    "huge_number": (
        _edit(_rle_lines(), 9, "b/3.jpg,2,1 " + "9" * 40),
        f"row 9: image b/3.jpg class 2: token 2 '{'9' * 30}...' is too large",
    ),
    "huge_class_id": (
        _edit(_rle_lines(), 9, "b/3.jpg," + "9" * 25 + ","),
        f"row 9: image b/3.jpg: class_id {'9' * 25} is out of range 1..3",
    ),
    "garbage_bytes_in_a_row": (
        "\n".join(_rle_lines()).encode().replace(b"b/2.jpg,3,", b"b/2.jpg,3,\xff\xfe\x00 1") + b"\n",
        "row 7: not UTF-8 text (undecodable bytes)",
    ),
    "nul_in_a_row": (
        _edit(_rle_lines(), 3, "b/1.jpg,2,1\x002"),
        "row 3: image b/1.jpg class 2: token 1 '1\\x002' is not an integer",
    ),
    "missing_image": (
        [line for line in _rle_lines() if not line.startswith("b/2.jpg")],
        "image b/2.jpg: missing (no rows)",
    ),
    "missing_classes": (
        [line for line in _rle_lines() if line not in ("b/3.jpg,1,", "b/3.jpg,3,")],
        "image b/3.jpg: no row for class 1, 3",
    ),
    "empty_file": (
        [],
        "empty file; expected the header 'image_id,class_id,EncodedPixels' (rle) or "
        "'image_id,PredictionString' (dense)",
    ),
    "header_only": (
        _rle_lines()[:1],
        "image b/1.jpg: missing (no rows)",
    ),
    "binary_garbage": (
        bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
        "row 1: header",
    ),
}

DENSE_CASES = {
    "dense_wrong_pixel_count": (
        _edit(_dense_lines(), 2, "b/1.jpg," + " ".join(["0"] * 47)),
        "row 2: image b/1.jpg: 47 values, expected 48 (6x8)",
    ),
    "dense_class_out_of_range": (
        _edit(_dense_lines(), 3, "b/2.jpg," + " ".join(["0"] * 63 + ["4"])),
        "row 3: image b/2.jpg: value 4 (pixel 64) is not a class index 0..3",
    ),
    "dense_negative_class": (
        _edit(_dense_lines(), 3, "b/2.jpg,-1 " + " ".join(["0"] * 63)),
        "row 3: image b/2.jpg: value -1 (pixel 1) is not a class index 0..3",
    ),
    "dense_non_integer_token": (
        _edit(_dense_lines(), 4, "b/3.jpg," + " ".join(["0"] * 34 + ["1.0"])),
        "row 4: image b/3.jpg: token 35 '1.0' is not an integer",
    ),
    "dense_duplicate_row": (
        [*_dense_lines(), _dense_lines()[1]],
        "row 5: image b/1.jpg: duplicate row (first at row 2)",
    ),
    "dense_extra_id": (
        [*_dense_lines(), "c.jpg,0"],
        "row 5: image_id 'c.jpg' is not an image of the test set",
    ),
    "dense_ragged_row": (
        _edit(_dense_lines(), 2, _dense_lines()[1] + ",0"),
        "row 2: 3 fields, expected 2 (image_id,PredictionString)",
    ),
    "dense_missing_image": (
        _dense_lines()[:3],
        "image b/3.jpg: missing (no row)",
    ),
}


@pytest.mark.parametrize("case", list(RLE_CASES) + list(DENSE_CASES))
def test_malformed_submission_is_reported(tmp_path: Path, truth: CocoSet, case: str) -> None:
    lines, expected = {**RLE_CASES, **DENSE_CASES}[case]
    problems = _problems(tmp_path, truth, lines)
    assert any(p.startswith(expected) for p in problems), problems


def test_each_problem_is_one_line_and_rows_keep_counting_past_blank_lines(
    tmp_path: Path, truth: CocoSet
) -> None:
    lines = _rle_lines()
    lines.insert(3, "")  # a blank line is skipped, but still a line of the file
    problems = _problems(tmp_path, truth, _edit(lines, 6, "b/2.jpg,1,1 0"))
    assert problems == ["row 6: image b/2.jpg class 1: run 1 (start 1) has length 0; lengths must be >= 1"]


def test_unterminated_quote_names_the_row(tmp_path: Path, truth: CocoSet) -> None:
    problems = _problems(tmp_path, truth, _edit(_rle_lines(), 5, 'b/2.jpg,1,"1 2'))
    assert problems[0].startswith("row 5: ")


def test_size_decides_the_pixel_count(tmp_path: Path, truth: CocoSet) -> None:
    native = _dense_lines()
    assert _problems(tmp_path, truth, native, size=None) == []
    assert "row 2: image b/1.jpg: 48 values, expected 16 (4x4)" in _problems(tmp_path, truth, native, size=4)


@pytest.mark.parametrize("fmt", ["rle", "dense"])
def test_random_corruption_never_crashes(tmp_path: Path, truth: CocoSet, fmt: str) -> None:
    rng = np.random.default_rng(7)
    clean = _write(tmp_path / "clean.csv", fmt, _truth_masks(truth)).read_bytes()
    junk = [b",", b'"', b"\n", b"\r", b"\x00", b"\xff", b"-", b"9" * 30, b" ", b"a,b,c,d", b"\xe2\x82"]
    path = tmp_path / "corrupt.csv"
    for _ in range(150):
        data = bytearray(clean)
        for _ in range(int(rng.integers(1, 5))):
            at = int(rng.integers(0, len(data)))
            if rng.random() < 0.3:
                del data[at : at + int(rng.integers(1, 20))]
            else:
                data[at:at] = junk[int(rng.integers(0, len(junk)))]
        path.write_bytes(bytes(data))
        problems = validate_submission(path, truth, None)
        assert all(isinstance(p, str) and "\n" not in p and "\r" not in p for p in problems)


def test_missing_file_is_a_user_error(tmp_path: Path, truth: CocoSet) -> None:
    with pytest.raises(UserError, match=r"nope\.csv: submission file not found"):
        validate_submission(tmp_path / "nope.csv", truth, None)


# --- scoring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["rle", "dense"])
@pytest.mark.parametrize("size", [None, 4])
def test_truth_as_submission_scores_one(tmp_path: Path, truth: CocoSet, fmt: str, size: int | None) -> None:
    path = _write(tmp_path / "s.csv", fmt, _truth_masks(truth, size))
    result = score_submission(path, truth, size, "area_desc")
    assert result["miou"] == 1.0
    assert result["iou"] == {"background": 1.0, "paper": 1.0, "can": 1.0, "glass": 1.0}


def test_truth_whose_annotations_were_all_skipped_is_refused(
    tmp_path: Path, truth: CocoSet, files: dict[str, Path]
) -> None:
    path = _write(tmp_path / "s.csv", "rle", _truth_masks(truth))
    broken = json.loads(files["truth"].read_text())
    for ann in broken["annotations"]:
        ann["category_id"] = 99
    files["truth"].write_text(json.dumps(broken))
    skipped = coco.load_coco(files["truth"], on_bad="skip")
    with pytest.raises(UserError, match=r"truth.json: all 5 annotations were skipped as bad"):
        score_submission(path, skipped, None, "area_desc")


def test_overlap_rule_reaches_the_truth(tmp_path: Path, truth: CocoSet) -> None:
    path = _write(tmp_path / "s.csv", "rle", _truth_masks(truth, overlap="area_desc"))
    assert score_submission(path, truth, None, "area_desc")["miou"] == 1.0
    # area_desc keeps the small paper box visible on top of the big glass box; max_class paints it glass.
    assert score_submission(path, truth, None, "max_class")["iou"]["paper"] < 1.0


@pytest.mark.parametrize("order", ["column", "row"])
def test_shifted_prediction_matches_independent_iou(tmp_path: Path, truth: CocoSet, order: str) -> None:
    masks = _truth_masks(truth)
    shifted = {image_id: np.roll(mask, 1, axis=1) for image_id, mask in masks.items()}
    path = _write(tmp_path / "s.csv", "rle", shifted, order=order)
    result = score_submission(path, truth, None, "area_desc", order=order)

    all_truth = np.concatenate([m.ravel() for m in masks.values()])
    all_pred = np.concatenate([m.ravel() for m in shifted.values()])
    expected = sklearn.metrics.jaccard_score(all_truth, all_pred, labels=[0, 1, 2, 3], average=None)
    assert list(result["iou"].values()) == pytest.approx(expected.tolist())
    assert result["miou"] == pytest.approx(expected.mean())
    assert 0 < result["miou"] < 1


def test_absent_class_is_nan_and_left_out_of_the_mean(tmp_path: Path, truth: CocoSet) -> None:
    masks = {
        image_id: np.where(mask == 2, 0, mask).astype(np.uint8)
        for image_id, mask in _truth_masks(truth).items()
    }
    no_cans = json.loads(Path(truth.path).read_text())
    no_cans["annotations"] = [a for a in no_cans["annotations"] if a["category_id"] != 2]
    truth_path = tmp_path / "no_cans.json"
    truth_path.write_text(json.dumps(no_cans))
    path = _write(tmp_path / "s.csv", "dense", masks)
    result = score_submission(path, coco.load_coco(truth_path), None, "area_desc")
    assert np.isnan(result["iou"]["can"])
    assert result["miou"] == 1.0


def test_scoring_an_invalid_file_names_file_and_first_problem(tmp_path: Path, truth: CocoSet) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(_edit(_rle_lines(), 3, "b/1.jpg,2,1 2 3")) + "\n")
    with pytest.raises(UserError) as info:
        score_submission(path, truth, None, "area_desc")
    message = str(info.value)
    assert message.startswith(f"{path}: invalid submission (1 problems); first: row 3: image b/1.jpg class 2")
    assert "\n" not in message


# --- command line -----------------------------------------------------------------------------------------


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_score_of_the_truth_is_one(tmp_path: Path, files: dict[str, Path], truth: CocoSet) -> None:
    submission = _write(tmp_path / "s.csv", "rle", _truth_masks(truth))
    out = tmp_path / "metrics" / "score.json"
    args = ["score", str(submission), "--truth", str(files["truth"]), "--size", "native", "--json", str(out)]
    done = _run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "mIoU 1.0000 (dataset average) over 4 classes (0 absent)"
    assert "glass       1.0000" in done.stdout
    assert json.loads(out.read_text()) == {
        "size": None,
        "miou": 1.0,
        "iou": {"background": 1.0, "paper": 1.0, "can": 1.0, "glass": 1.0},
        "average": "dataset",
    }


# A tiny truth whose masks are counted by hand: two 4x4 images, a 2x2 square of paper (1) in A's top-left
# corner, of can (2) in B's. The submission is right on A; on B it finds only the can's top row and
# calls one background pixel paper (a class B does not hold).
#   A: mIoU 1.
#   B: background TP 11 of truth 12, predicted 13 -> 11/14; can TP 2 of 4, predicted 2 -> 1/2;
#      paper TP 0, predicted 1 -> 0.  mIoU (11/14 + 1/2 + 0) / 3 = 3/7.
#   image average: (1 + 3/7) / 2 = 5/7.
#   dataset average: background 23 / (24 + 25 - 23) = 23/26, paper 4/5, can 2/4 -> (23/26 + 4/5 + 1/2) / 3.
HAND_IMAGE_MIOU = 5 / 7
HAND_DATASET_MIOU = (23 / 26 + 4 / 5 + 1 / 2) / 3


def _hand_truth(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """truth.json of the two hand-counted images, and the submission's masks."""
    square = [0, 0, 2, 0, 2, 2, 0, 2]
    data = {
        "images": [
            {"id": 1, "file_name": "A.jpg", "height": 4, "width": 4},
            {"id": 2, "file_name": "B.jpg", "height": 4, "width": 4},
        ],
        "categories": [{"id": 1, "name": "paper"}, {"id": 2, "name": "can"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square]},
            {"id": 2, "image_id": 2, "category_id": 2, "segmentation": [square]},
        ],
    }
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(data))
    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 1
    b = np.zeros((4, 4), np.uint8)
    b[0, :2] = 2  # the can's top row only
    b[3, 3] = 1  # paper where there is none
    return path, {"A.jpg": a, "B.jpg": b}


def test_hand_truth_rasterizes_as_counted(tmp_path: Path) -> None:
    path, _ = _hand_truth(tmp_path)
    masks = _truth_masks(coco.load_coco(path))
    square = np.zeros((4, 4), np.uint8)
    square[:2, :2] = 1
    np.testing.assert_array_equal(masks["A.jpg"], square)
    np.testing.assert_array_equal(masks["B.jpg"], square * 2)


@pytest.mark.parametrize("average", ["dataset", "image"])
def test_score_submission_by_either_average_matches_the_hand_count(
    tmp_path: Path, average: metrics.Average
) -> None:
    path, masks = _hand_truth(tmp_path)
    submission = _write(tmp_path / "s.csv", "rle", masks, n_classes=3)
    result = score_submission(submission, coco.load_coco(path), None, "area_desc", average=average)
    assert result["average"] == average
    expected = {"dataset": HAND_DATASET_MIOU, "image": HAND_IMAGE_MIOU}[average]
    assert result["miou"] == pytest.approx(expected)
    if average == "image":  # each class over the images holding it: paper in A (1) and B (0), can in B
        assert result["iou"] == pytest.approx({"background": (1 + 11 / 14) / 2, "paper": 1 / 2, "can": 1 / 2})


@pytest.mark.parametrize("fmt", ["rle", "dense"])
def test_cli_score_by_the_image_average(tmp_path: Path, fmt: str) -> None:
    path, masks = _hand_truth(tmp_path)
    submission = _write(tmp_path / "s.csv", fmt, masks, n_classes=3)
    out = tmp_path / "score.json"
    args = ["score", str(submission), "--truth", str(path), "--size", "native", "--json", str(out)]
    done = _run_cli([*args, "--average", "image"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.splitlines()[0] == f"mIoU {HAND_IMAGE_MIOU:.4f} (image average) over 3 classes (0 absent)"
    )
    scored = json.loads(out.read_text())
    assert scored["average"] == "image"
    assert scored["miou"] == pytest.approx(HAND_IMAGE_MIOU)


def test_cli_average_defaults_to_the_params_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path, masks = _hand_truth(tmp_path)
    submission = _write(tmp_path / "s.csv", "dense", masks, n_classes=3)
    args = ["score", str(submission), "--truth", str(path), "--size", "native"]
    # No params.yaml: the built-in default, dataset.
    assert _cli(args, capsys)[1].startswith(f"mIoU {HAND_DATASET_MIOU:.4f} (dataset average)")
    write_params(Path("params.yaml"), {"metric": {"average": "image"}})
    assert _cli(args, capsys)[1].startswith(f"mIoU {HAND_IMAGE_MIOU:.4f} (image average)")
    assert _cli([*args, "--average", "dataset"], capsys)[1].startswith(
        f"mIoU {HAND_DATASET_MIOU:.4f} (dataset"
    )


def test_cli_score_of_a_malformed_file_fails_in_one_line(tmp_path: Path, files: dict[str, Path]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(_edit(_rle_lines(), 4, "b/1.jpg,3,5 0")) + "\n")
    out = tmp_path / "score.json"
    done = _run_cli(["score", str(bad), "--truth", str(files["truth"]), "--json", str(out)], tmp_path)
    assert done.returncode == 2
    # Besides the warning that no sidecar says the file's order, one line: the error.
    (error,) = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert error.startswith(f"error: {bad}: invalid submission")
    assert "row 4" in error
    assert not out.exists()


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stdout)."""
    try:
        cli.main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


def test_cli_validate_valid(
    tmp_path: Path, files: dict[str, Path], truth: CocoSet, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "s.csv", "dense", _truth_masks(truth))
    code, out = _cli(["validate", str(path), "--test", str(files["test"]), "--size", "native"], capsys)
    assert code == 0
    assert out.strip() == "valid: 3 rows (dense, 3 images)"


def test_cli_validate_caps_the_printed_problems(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(_rle_lines() + [f"x{i}.jpg,1," for i in range(70)]) + "\n")
    code, out = _cli(["validate", str(path), "--test", str(files["test"]), "--size", "native"], capsys)
    lines = out.splitlines()
    assert code == 1
    assert lines[0] == "row 11: image_id 'x0.jpg' is not an image of the test set"
    assert len(lines) == cli.MAX_PRINTED_PROBLEMS + 2
    assert lines[-2] == "... and 20 more problems"
    assert lines[-1] == f"invalid: 70 problems in {path}"


def test_cli_size_defaults_to_the_params_file(
    tmp_path: Path,
    files: dict[str, Path],
    truth: CocoSet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    small = _write(tmp_path / "small.csv", "dense", _truth_masks(truth, size=4))
    args = ["validate", str(small), "--test", str(files["test"])]
    # No params.yaml: the built-in default size (256) applies, so 4x4 rows are the wrong length.
    assert _cli(args, capsys)[0] == 1
    write_params(Path("params.yaml"), {"submission": {"size": 4}})
    assert _cli(args, capsys) == (0, "valid: 3 rows (dense, 3 images)\n")
    other = tmp_path / "other.yaml"
    write_params(other, {"submission": {"size": 5}})
    assert _cli([*args, "--params", str(other)], capsys)[0] == 1


def test_cli_missing_file_is_one_line_error(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match=r"nope\.csv: submission file not found"):
        cli.main(["validate", str(tmp_path / "nope.csv"), "--test", str(files["test"])])
    with pytest.raises(UserError, match=r"missing\.json: file not found"):
        cli.main(["score", str(tmp_path / "s.csv"), "--truth", str(tmp_path / "missing.json")])


def test_cli_rejects_a_bad_size(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["validate", "s.csv", "--test", str(files["test"]), "--size", "big"])
    assert info.value.code == 2
    assert "expected a positive integer or 'native'" in capsys.readouterr().err


# --- the sidecar: how a CSV is encoded ---------------------------------------------------------------------


def _cli_with_err(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run the CLI in-process, asserting success; (stdout, stderr)."""
    cli.main(args)
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_row_major_file_is_read_by_its_sidecar_and_warned_about_without_one(
    tmp_path: Path, files: dict[str, Path], truth: CocoSet, capsys: pytest.CaptureFixture[str]
) -> None:
    submission = _write(tmp_path / "s.csv", "rle", _truth_masks(truth), order="row")
    score = ["score", str(submission), "--truth", str(files["truth"]), "--size", "native"]

    # No sidecar: read as the params' column-major order, which silently scores the file wrong; so say so.
    out, err = _cli_with_err(score, capsys)
    assert not out.startswith("mIoU 1.0000")
    assert err.startswith(f"warning: {submission}: no sidecar s.json; reading it as RLE column-major")

    sidecar = write_sidecar(
        submission, describe(submission, "rle", "row", None, list(truth.classes), "0" * 64)
    )
    assert sidecar == tmp_path / "s.json"
    out, err = _cli_with_err(score, capsys)
    assert out.startswith("mIoU 1.0000") and "warning" not in err
    out, _ = _cli_with_err(["validate", str(submission), "--test", str(files["test"])], capsys)
    assert out.startswith("valid: 9 rows (rle")  # the sidecar's size (native), not the default 256

    with pytest.raises(
        UserError, match=r"s\.json: the submission is RLE row-major, not column-major as asked"
    ):
        cli.main([*score, "--order", "column"])
    with pytest.raises(
        UserError, match=r"s\.json: the submission's masks are at size native, not 32x32 as asked"
    ):
        cli.main(["validate", str(submission), "--test", str(files["test"]), "--size", "32"])


def test_a_sidecar_of_another_file_is_refused(tmp_path: Path, files: dict[str, Path], truth: CocoSet) -> None:
    submission = _write(tmp_path / "s.csv", "rle", _truth_masks(truth))
    write_sidecar(submission, describe(submission, "rle", "column", None, list(truth.classes), "0" * 64))
    _write(tmp_path / "s.csv", "rle", _truth_masks(truth), order="row")  # replaced after predict
    with pytest.raises(
        UserError, match=r"s\.json: describes another file than .*s\.csv \(its SHA-256 differs\)"
    ):
        cli.main(["score", str(submission), "--truth", str(files["truth"])])
    (tmp_path / "s.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"s\.json: not a submission sidecar"):
        read_sidecar(submission)


def test_a_field_longer_than_any_valid_row_stops_the_read_before_it_is_held(
    tmp_path: Path, truth: CocoSet
) -> None:
    # The largest test image here is small: no valid row of it can be 1 MB long.
    assert field_limit((h, w) for _, h, w in IMAGES) == 131072  # the floor, for small images
    path = tmp_path / "long.csv"
    lines = _rle_lines()
    path.write_text("\n".join([*lines[:2], "b/1.jpg,2," + "1 1 " * 300_000, *lines[3:]]) + "\n")
    report = check_submission(path, truth, None)
    assert report.problems[0] == (
        "row 3: a field longer than any valid row of these images can hold (131072 characters); "
        "the rest was not read"
    )
    # A 512 x 512 dense row (~0.5 MB) is within the limit of its shape.
    assert field_limit([(512, 512)]) >= 4 * 512 * 512
