"""Bad input to the masks stage: one test per case, each a one-line error naming the file and the item.

Each case runs `stages/masks.py` as a subprocess on a small valid dataset with one thing broken, and checks
exit code 2, a single `error:` line on stderr, no traceback, and an output folder and manifest left exactly
as they were.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_params
from PIL import Image

from pipeline.data import coco
from pipeline.data.images import read_mask
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 48
CATEGORIES = [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Metal"}]


@dataclass
class Dataset:
    """A small valid dataset: root/imgs/*.jpg, train.json, test.json, params.yaml, an earlier run's output
    (masks folder and manifest)."""

    root: Path
    train: dict[str, Any] | str  # a str is written verbatim (for broken json)
    test: dict[str, Any]
    out: Path
    manifest: Path
    params: Path

    @property
    def train_json(self) -> Path:
        return self.root / "train.json"

    @property
    def test_json(self) -> Path:
        return self.root / "test.json"

    def save(self) -> None:
        self.train_json.write_text(self.train if isinstance(self.train, str) else json.dumps(self.train))
        self.test_json.write_text(json.dumps(self.test))

    def run_stage(self) -> subprocess.CompletedProcess[str]:
        self.save()
        command = [sys.executable, str(REPO / "stages" / "masks.py"), "--root", str(self.root),
                   "--train-json", str(self.train_json), "--test-json", str(self.test_json),
                   "--out", str(self.out), "--manifest", str(self.manifest),
                   "--params", str(self.params)]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def write_jpeg(path: Path, height: int = H, width: int = W, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ds(tmp_path: Path) -> Dataset:
    root = tmp_path / "data"
    for i, name in enumerate(["imgs/0.jpg", "imgs/1.jpg", "imgs/t0.jpg"]):
        write_jpeg(root / name, seed=i)
    images = [{"id": i, "file_name": f"imgs/{i}.jpg", "height": H, "width": W} for i in (0, 1)]
    annotations = [
        {"id": 10, "image_id": 0, "category_id": 1, "segmentation": [[2, 2, 30, 2, 30, 20, 2, 20]],
         "area": 504, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[5, 5, 40, 8, 20, 35]],
         "area": 500, "iscrowd": 0},
    ]  # fmt: skip
    train = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    test_images = [{"id": 0, "file_name": "imgs/t0.jpg", "height": H, "width": W}]
    test = {"images": test_images, "categories": CATEGORIES}
    params = tmp_path / "params.yaml"
    write_params(params, {"data": {"on_bad_annotation": "error"}})
    out = tmp_path / "masks"
    out.mkdir()
    (out / "classes.json").write_text('{"classes": ["from", "an", "earlier", "run"]}')
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"from": "an earlier run"}')
    return Dataset(root, train, test, out, manifest, params)


def expect_error(ds: Dataset, *fragments: str) -> str:
    """Run the stage, check it failed cleanly without touching its outputs, return the error line."""
    before, beside = snapshot(ds.out), sorted(ds.out.parent.iterdir())
    manifest = ds.manifest.read_bytes() if ds.manifest.exists() else None
    result = ds.run_stage()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert snapshot(ds.out) == before
    assert (ds.manifest.read_bytes() if ds.manifest.exists() else None) == manifest
    assert sorted(ds.out.parent.iterdir()) == beside  # no temporary folder or file left behind
    return errors[0]


def first_ann(ds: Dataset) -> dict[str, Any]:
    return ds.train["annotations"][0]


# --- the json itself --------------------------------------------------------------------------------------


def test_not_json(ds: Dataset) -> None:
    ds.train = "images: [oops"
    expect_error(ds, "train.json", "not valid JSON", "line 1")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_list(ds: Dataset, key: str) -> None:
    del ds.train[key]
    expect_error(ds, "train.json", f"'{key}'")


def test_training_set_without_any_annotation(ds: Dataset) -> None:
    ds.train["annotations"] = []
    expect_error(ds, "train.json", "'annotations' is empty")


def test_annotation_for_unknown_image(ds: Dataset) -> None:
    first_ann(ds)["image_id"] = 99
    expect_error(ds, "train.json", "annotation id 10", "image_id 99 is not in 'images'")


def test_annotation_with_unknown_category(ds: Dataset) -> None:
    first_ann(ds)["category_id"] = 7
    expect_error(ds, "train.json", "annotation id 10", "category_id 7 is not in 'categories'")


def test_polygon_with_odd_number_of_coordinates(ds: Dataset) -> None:
    first_ann(ds)["segmentation"] = [[2, 2, 30, 2, 30, 20, 2]]
    expect_error(ds, "train.json", "annotation id 10", "polygon 0 has an odd number of coordinates (7)")


def test_polygon_with_fewer_than_three_points(ds: Dataset) -> None:
    first_ann(ds)["segmentation"] = [[2, 2, 30, 2, 30, 20, 2, 20], [1, 1, 5, 5]]
    expect_error(ds, "train.json", "annotation id 10", "polygon 1 has 2 points")


def test_polygon_far_outside_the_image(ds: Dataset) -> None:
    # pycocotools would need gigabytes (and crash past 4e8): refused before it is asked.
    first_ann(ds)["segmentation"] = [[2, 2, 1e9, 2, 30, 20]]
    expect_error(
        ds, "train.json", "annotation id 10", "polygon 0 reaches (1e+09, 2)", "outside the 40x48 image"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("image_id", [0]), ("image_id", 0.0), ("category_id", {"id": 1}), ("category_id", True)],
)
def test_annotation_ids_must_be_integers(ds: Dataset, key: str, value: object) -> None:
    first_ann(ds)[key] = value
    expect_error(ds, "train.json", "annotation id 10", f"'{key}' must be an integer, got {value!r}")


def test_duplicate_image_id(ds: Dataset) -> None:
    ds.train["images"][1]["id"] = 0
    expect_error(ds, "train.json", "image id 0 appears twice", "imgs/1.jpg")


def test_duplicate_file_name(ds: Dataset) -> None:
    ds.train["images"][1]["file_name"] = "imgs/0.jpg"
    expect_error(ds, "train.json", "image id 1", "'imgs/0.jpg' appears twice")


def test_file_names_differing_only_by_case(ds: Dataset) -> None:
    # One file on macOS and Windows: the second image's mask would overwrite the first's.
    ds.train["images"][1]["file_name"] = "IMGS/0.jpg"
    expect_error(ds, "train.json", "image id 1", "'IMGS/0.jpg' and 'imgs/0.jpg' differ only by case")


def test_deeply_nested_json(ds: Dataset) -> None:
    ds.train = "[" * 100_000 + "]" * 100_000
    expect_error(ds, "train.json", "nested too deeply")


def test_absolute_file_name(ds: Dataset) -> None:
    ds.train["images"][0]["file_name"] = str(ds.root / "imgs" / "0.jpg")
    expect_error(ds, "train.json", "image id 0", "is absolute")


@pytest.mark.parametrize("name", [".", "./", "imgs/..", "imgs/", "imgs/.", "imgs\\"])
def test_file_name_that_names_a_folder(ds: Dataset, name: str) -> None:
    ds.train["images"][0]["file_name"] = name
    expect_error(ds, "train.json", "image id 0", repr(name))


def test_file_name_climbing_out_of_the_root(ds: Dataset) -> None:
    write_jpeg(ds.root.parent / "outside.jpg")
    ds.train["images"][0]["file_name"] = "imgs/../../outside.jpg"
    expect_error(ds, "train.json", "image id 0", "'imgs/../../outside.jpg' climbs out of the data root")


def test_train_and_test_categories_differ(ds: Dataset) -> None:
    ds.test["categories"] = [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Glass"}]
    expect_error(ds, "test.json", "train.json", "category 2 is 'Glass'", "'Metal'")


def test_duplicate_category_id(ds: Dataset) -> None:
    ds.train["categories"] = [*CATEGORIES, {"id": 2, "name": "Glass"}]
    expect_error(ds, "train.json", "category id 2 appears twice")


def test_test_json_lacks_a_training_category(ds: Dataset) -> None:
    ds.test["categories"] = CATEGORIES[:1]
    expect_error(ds, "test.json", "no category id 2", "'Metal' in", "train.json")


def test_test_json_has_a_category_the_training_json_lacks(ds: Dataset) -> None:
    ds.test["categories"] = [*CATEGORIES, {"id": 9, "name": "Glass"}]
    expect_error(ds, "test.json", "category id 9 ('Glass') is not in", "train.json")


# --- the image files ---------------------------------------------------------------------------------------


def test_missing_image_file(ds: Dataset) -> None:
    (ds.root / "imgs" / "t0.jpg").unlink()
    expect_error(ds, "imgs/t0.jpg", "image file not found")


def test_empty_image_file(ds: Dataset) -> None:
    (ds.root / "imgs" / "1.jpg").write_bytes(b"")
    expect_error(ds, "imgs/1.jpg", "empty")


def test_truncated_jpeg(ds: Dataset) -> None:
    # The last training image, so masks for the others are already written when it fails.
    path = ds.root / "imgs" / "1.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(ds, "imgs/1.jpg", "truncated")


def test_file_that_is_not_an_image(ds: Dataset) -> None:
    (ds.root / "imgs" / "0.jpg").write_text("definitely not a JPEG\n")
    expect_error(ds, "imgs/0.jpg", "not an image")


def test_image_size_differs_from_the_json(ds: Dataset) -> None:
    write_jpeg(ds.root / "imgs" / "1.jpg", height=H, width=W + 2)
    expect_error(ds, "imgs/1.jpg", f"image is {H}x{W + 2}", f"json says {H}x{W}")


def _png_claiming(path: Path, height: int, width: int) -> None:
    """A valid PNG header that claims height x width pixels, in a file of under 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.mark.parametrize("claimed", [20000, 9000])
def test_a_tiny_file_claiming_a_huge_image_is_refused_before_decoding(ds: Dataset, claimed: int) -> None:
    # 20000 x 20000 is over PIL's own limit; 9000 x 9000 is under it, but not the size the json says.
    _png_claiming(ds.root / "imgs" / "t0.jpg", claimed, claimed)
    line = expect_error(ds, "imgs/t0.jpg")
    assert "too many pixels" in line if claimed == 20000 else f"image is {claimed}x{claimed}" in line


def test_an_image_over_the_pixel_cap_is_refused_from_its_json(ds: Dataset) -> None:
    write_params(ds.params, {"data": {"max_image_pixels": 100}})
    expect_error(ds, "train.json", "image id 0 (imgs/0.jpg)", "over data.max_image_pixels (100)")


def test_failure_mid_write_creates_no_output(ds: Dataset) -> None:
    for path in ds.out.iterdir():
        path.unlink()
    ds.out.rmdir()
    ds.manifest.unlink()
    path = ds.root / "imgs" / "1.jpg"
    path.write_bytes(path.read_bytes()[:100])
    expect_error(ds, "imgs/1.jpg")
    assert not ds.out.exists() and not ds.manifest.exists()


# --- problems that are counted, not fatal -----------------------------------------------------------------


def test_out_of_image_coordinates_are_clipped_and_counted(ds: Dataset) -> None:
    first_ann(ds)["segmentation"] = [[-10, -5, 30, -5, 30, 20, -10, 20]]
    result = ds.run_stage()
    assert result.returncode == 0, result.stderr
    assert "1 clipped to the image" in result.stdout
    mask = read_mask(ds.out / "imgs" / "0.png")
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[0:20, 0:30] = 1  # the polygon intersected with the image
    np.testing.assert_array_equal(mask, expected)
    assert coco.load_coco(ds.train_json).clipped == 1
    assert read_manifest(ds.manifest).annotations["clipped"] == 1


def test_skip_bad_annotations_counts_them(ds: Dataset) -> None:
    first_ann(ds)["category_id"] = 7
    ds.train["annotations"][1]["segmentation"] = [[1, 2, 3]]
    write_params(ds.params, {"data": {"on_bad_annotation": "skip"}})
    result = ds.run_stage()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # Paper is named by no annotation (annotation 10 names category 7); Metal by the skipped annotation 11.
    assert len(lines) == 2 and "category id 1 'Paper' is used by no annotation: kept as class 1" in lines[0]
    assert "0 used, 2 skipped" in lines[1] and "annotation id 10" in lines[1]
    assert not read_mask(ds.out / "imgs" / "0.png").any()
    manifest = read_manifest(ds.manifest)
    assert manifest.annotations["skipped"] == 2 and manifest.annotations["used"] == 0
    assert manifest.presence.tolist() == [[True, False, False], [True, False, False]]  # background only
    loaded = coco.load_coco(ds.train_json, on_bad="skip")
    assert loaded.skipped == 2 and loaded.n_annotations == 0
    assert "train.json: annotation id 11" in loaded.problems[1] and "odd number" in loaded.problems[1]
    with pytest.raises(UserError, match="annotation id 10"):
        coco.load_coco(ds.train_json, on_bad="error")


def split_command(ds: Dataset, tmp_path: Path) -> list[str]:
    return [sys.executable, str(REPO / "stages" / "split.py"), "--manifest", str(ds.manifest),
            "--out", str(tmp_path / "folds.csv"), "--counts", str(tmp_path / "counts.json"),
            "--params", str(ds.params)]  # fmt: skip


def test_split_skips_what_masks_skipped(ds: Dataset, tmp_path: Path) -> None:
    # on_bad_annotation is applied once, by the masks stage: the split reads its manifest, never the json,
    # so it splits what the masks stage kept instead of failing on the annotation it skipped.
    ds.train["annotations"][1]["segmentation"] = [[1, 2, 3, 4]]
    write_params(
        ds.params,
        {"data": {"on_bad_annotation": "skip"}, "split": {"n_splits": 2}, "ensemble": {"folds": [0, 1]}},
    )
    assert ds.run_stage().returncode == 0
    assert read_manifest(ds.manifest).annotations["skipped"] == 1
    result = subprocess.run(
        split_command(ds, tmp_path), capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    header, *rows = (tmp_path / "folds.csv").read_text().splitlines()
    assert header == "image_id,fold"
    assert sorted(row.split(",")[0] for row in rows) == ["imgs/0.jpg", "imgs/1.jpg"]  # both images kept


def test_valid_dataset_passes(ds: Dataset) -> None:
    result = ds.run_stage()
    assert result.returncode == 0, result.stderr
    classes = json.loads((ds.out / "classes.json").read_text())
    assert classes == {"classes": ["background", "Paper", "Metal"], "category_ids": [1, 2]}
    assert len(result.stdout.strip().splitlines()) == 1  # the summary; no category is unused
    assert read_mask(ds.out / "imgs" / "0.png")[10, 10] == 1
    assert read_mask(ds.out / "imgs" / "1.png")[12, 20] == 2
    written = sorted(p.name for p in ds.out.parent.iterdir())
    assert written == ["data", "manifest.json", "masks", "params.yaml"]
    manifest = read_manifest(ds.manifest)
    assert (manifest.classes, manifest.category_ids) == (["background", "Paper", "Metal"], [1, 2])
    assert manifest.train_names() == ["imgs/0.jpg", "imgs/1.jpg"]
    assert [(im.file_name, im.height, im.width) for im in manifest.test] == [("imgs/t0.jpg", H, W)]
    # The classes each written mask holds, as the split and training read them.
    assert manifest.presence.tolist() == [[True, True, False], [True, False, True]]
    assert manifest.annotations == {"used": 2, "skipped": 0, "clipped": 0, "ignored": 0}


# --- real-world exports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("unused", ["keep", "drop"])
def test_roboflow_export_with_an_unused_category_named_like_a_class(
    ds: Dataset, tmp_path: Path, unused: str
) -> None:
    # Roboflow adds an id-0 category named after the dataset that no annotation uses; here it is "Paper".
    roboflow = [{"id": 0, "name": "Paper", "supercategory": "none"}, *CATEGORIES]
    ds.train["categories"] = ds.test["categories"] = roboflow
    write_params(
        ds.params,
        {"data": {"unused_categories": unused}, "split": {"n_splits": 2}, "ensemble": {"folds": [0, 1]}},
    )
    result = ds.run_stage()
    assert result.returncode == 0, result.stderr
    reports = [line for line in result.stdout.splitlines() if "used by no annotation" in line]
    fate = "kept as class 1" if unused == "keep" else "dropped"
    assert reports == [
        f"{ds.train_json}: category id 0 'Paper' is used by no annotation: {fate} "
        f"(data.unused_categories: {'drop removes it' if unused == 'keep' else 'keep keeps it as a class'})"
    ]
    names = ["Paper (id 0)", "Paper (id 1)", "Metal"] if unused == "keep" else ["Paper", "Metal"]
    ids = [0, 1, 2] if unused == "keep" else [1, 2]
    assert json.loads((ds.out / "classes.json").read_text()) == {
        "classes": ["background", *names],
        "category_ids": ids,
    }
    offset = 1 if unused == "keep" else 0  # kept, the id-0 category holds class 1
    assert read_mask(ds.out / "imgs" / "0.png")[10, 10] == 1 + offset
    assert read_mask(ds.out / "imgs" / "1.png")[12, 20] == 2 + offset

    manifest = read_manifest(ds.manifest)
    assert (manifest.classes, manifest.category_ids) == (["background", *names], ids)
    assert manifest.presence[:, 1 + offset : 3 + offset].tolist() == [[True, False], [False, True]]
    # The split stage reads the masks stage's manifest, so its class list matches the masks'; it does not
    # repeat the report.
    done = subprocess.run(split_command(ds, tmp_path), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "used by no annotation" not in done.stdout + done.stderr
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert list(counts["fold0"]) == names
