"""Tests for pipeline.coco: rasterization against pycocotools, overlap rules, class map, files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import coco
from pipeline.errors import UserError

# pycocotools 2.0.x's decoder trips numpy 2's copy-keyword deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

H, W = 13, 17


def make_json(
    tmp_path: Path, annotations: list[dict[str, Any]], categories: list[dict[str, Any]] | None = None
) -> Path:
    categories = categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cow"}]
    data = {
        "images": [{"id": 1, "file_name": "a/img.jpg", "height": H, "width": W}],
        "annotations": annotations,
        "categories": categories,
    }
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    return path


def reference_mask(json_path: Path, ann_id: int) -> np.ndarray:
    """pycocotools' own decoding of one annotation, the reference."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        ref = COCO(str(json_path))
    return ref.annToMask(ref.anns[ann_id]).astype(bool)


def ann(ann_id: int, segmentation: Any, category_id: int = 1, **fields) -> dict[str, Any]:
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": 0, "area": 1.0, **fields}  # fmt: skip


def hand_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[2:9, 3:11] = 1
    m[5:12, 9:15] = 1
    m[0, 0] = 1  # a run that starts the column-major order
    return m


def uncompressed_counts(m: np.ndarray) -> list[int]:
    flat = m.ravel(order="F").tolist()
    counts, value, run = [], 0, 0
    for bit in flat:
        if bit != value:
            counts.append(run)
            value, run = bit, 0
        run += 1
    return [*counts, run]


SEGMENTATIONS = {
    "triangle": [[1.5, 1.0, 15.2, 3.7, 6.1, 11.9]],
    "two_part_polygon": [[0, 0, 6, 0, 6, 5, 0, 5], [9.5, 6.5, 16, 7, 12, 12.5]],
    "concave_polygon": [[1, 1, 15, 1, 15, 12, 8, 4, 1, 12]],
    "uncompressed_rle": {"size": [H, W], "counts": uncompressed_counts(hand_mask())},
    "compressed_rle": {
        "size": [H, W],
        "counts": mask_utils.encode(np.asfortranarray(hand_mask()))["counts"].decode("ascii"),
    },
}


@pytest.mark.parametrize("name", list(SEGMENTATIONS))
@pytest.mark.parametrize("iscrowd", [0, 1])
def test_single_object_matches_pycocotools(tmp_path: Path, name: str, iscrowd: int) -> None:
    path = make_json(tmp_path, [ann(7, SEGMENTATIONS[name], category_id=2, iscrowd=iscrowd)])
    data = coco.load_coco(path)
    mask = coco.rasterize(data, data.images[0])
    expected = reference_mask(path, 7)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(mask, np.where(expected, 2, 0))


def test_rle_decodes_to_the_hand_made_mask(tmp_path: Path) -> None:
    for name in ("uncompressed_rle", "compressed_rle"):
        decoded = coco.decode_segmentation(SEGMENTATIONS[name], H, W)
        np.testing.assert_array_equal(decoded, hand_mask().astype(bool))


def overlapping(big_area_field: float, small_area_field: float) -> list[dict[str, Any]]:
    big = ann(1, [[0, 0, 12, 0, 12, 10, 0, 10]], category_id=3, area=big_area_field)  # 120 px, class 3
    small = ann(2, [[8, 6, 14, 6, 14, 12, 8, 12]], category_id=1, area=small_area_field)  # 36 px, class 1
    return [small, big]


@pytest.mark.parametrize("areas", [(120.0, 36.0), (1.0, 9999.0)], ids=["honest_area", "lying_area"])
def test_area_desc_keeps_small_objects_on_top(tmp_path: Path, areas: tuple[float, float]) -> None:
    data = coco.load_coco(make_json(tmp_path, overlapping(*areas)))
    mask = coco.rasterize(data, data.images[0], overlap="area_desc")
    assert mask[7, 9] == 1  # overlap: the small object wins whatever the json's `area` says
    assert mask[2, 2] == 3 and mask[11, 13] == 1 and mask[12, 0] == 0
    assert np.count_nonzero(mask == 1) == 36 and np.count_nonzero(mask == 3) == 120 - 16


def test_max_class_gives_overlap_to_the_higher_class(tmp_path: Path) -> None:
    data = coco.load_coco(make_json(tmp_path, overlapping(120.0, 36.0)))
    mask = coco.rasterize(data, data.images[0], overlap="max_class")
    assert mask[7, 9] == 3
    assert np.count_nonzero(mask == 3) == 120 and np.count_nonzero(mask == 1) == 36 - 16


@pytest.mark.parametrize("overlap", ["area_desc", "max_class"])
def test_ties_are_broken_by_annotation_id_not_json_order(tmp_path: Path, overlap: str) -> None:
    square_a = ann(5, [[0, 0, 8, 0, 8, 8, 0, 8]], category_id=2)
    square_b = ann(9, [[4, 4, 12, 4, 12, 12, 4, 12]], category_id=2 if overlap == "max_class" else 1)
    results = []
    for order in ([square_a, square_b], [square_b, square_a]):
        data = coco.load_coco(make_json(tmp_path, order))
        results.append(coco.rasterize(data, data.images[0], overlap=overlap))
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0][6, 6] == square_b["category_id"]  # the higher id is painted last


def test_unknown_overlap_rule_lists_the_valid_ones(tmp_path: Path) -> None:
    data = coco.load_coco(make_json(tmp_path, overlapping(1, 1)))
    with pytest.raises(ValueError, match="area_desc, max_class"):
        coco.rasterize(data, data.images[0], overlap="min_class")  # type: ignore[arg-type]


@pytest.mark.parametrize("first_id", [0, 1, 40])
def test_class_index_follows_json_order_whatever_the_ids(tmp_path: Path, first_id: int) -> None:
    categories = [{"id": first_id + k, "name": name} for k, name in enumerate(["cat", "dog", "cow"])]
    anns = [
        ann(1, [[0, 0, 5, 0, 5, 5, 0, 5]], category_id=first_id),
        ann(2, [[6, 0, 11, 0, 11, 5, 6, 5]], category_id=first_id + 2),
    ]
    data = coco.load_coco(make_json(tmp_path, anns, categories))
    assert data.classes == ["background", "cat", "dog", "cow"]
    mask = coco.rasterize(data, data.images[0])
    assert mask[2, 2] == 1 and mask[2, 8] == 3 and mask[8, 8] == 0


def test_categories_listed_out_of_id_order_keep_json_order(tmp_path: Path) -> None:
    categories = [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}]
    data = coco.load_coco(make_json(tmp_path, [ann(1, [[0, 0, 5, 0, 5, 5]], category_id=2)], categories))
    assert data.classes == ["background", "five", "two"]
    assert coco.rasterize(data, data.images[0]).max() == 2


def test_json_without_annotations_is_a_test_set_unless_required(tmp_path: Path) -> None:
    path = make_json(tmp_path, [])
    raw = json.loads(path.read_text())
    del raw["annotations"]
    path.write_text(json.dumps(raw))
    data = coco.load_coco(path)
    assert not data.has_annotations and data.annotations == {1: []}
    assert not coco.rasterize(data, data.images[0]).any()
    with pytest.raises(UserError, match=r"set\.json: no 'annotations'"):
        coco.load_coco(path, require_annotations=True)


def test_root_defaults_to_the_json_folder(tmp_path: Path) -> None:
    data = coco.load_coco(make_json(tmp_path, []))
    assert data.image_file(data.images[0]) == tmp_path / "a" / "img.jpg"
    other = coco.load_coco(make_json(tmp_path, []), root=tmp_path / "elsewhere")
    assert other.image_file(other.images[0]) == tmp_path / "elsewhere" / "a" / "img.jpg"


def test_same_classes_passes_for_equal_lists(tmp_path: Path) -> None:
    a = coco.load_coco(make_json(tmp_path, []))
    coco.check_same_classes(a, a)  # no error


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [("batch_01_vt/0002.jpg", "batch_01_vt/0002.png"), ("x.JPEG", "x.png"), ("noext", "noext.png")],
)
def test_mask_relpath_mirrors_the_file_name(file_name: str, expected: str) -> None:
    assert coco.mask_relpath(file_name) == expected


def test_mask_png_round_trip(tmp_path: Path) -> None:
    mask = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 11
    path = tmp_path / "deep" / "m.png"
    coco.write_mask(path, mask)
    back = coco.read_mask(path)
    assert back.dtype == np.uint8 and back.shape == (H, W)
    np.testing.assert_array_equal(back, mask)
    assert [p.name for p in path.parent.iterdir()] == ["m.png"]  # no temp file left behind


def test_write_mask_rejects_a_non_uint8_mask(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        coco.write_mask(tmp_path / "m.png", np.zeros((3, 3), dtype=np.int64))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_read_image_returns_rgb_uint8(tmp_path: Path, mode: str) -> None:
    rgb = np.zeros((6, 9, 3), dtype=np.uint8)
    rgb[:, :4] = (200, 30, 90)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).convert(mode).save(path)
    image = coco.read_image(path, expected_hw=(6, 9))
    assert image.dtype == np.uint8 and image.shape == (6, 9, 3)
    expected = np.asarray(Image.fromarray(rgb).convert(mode).convert("RGB"))
    np.testing.assert_array_equal(image, expected)


def test_image_path_joins_relative_names() -> None:
    assert coco.image_path("data", "batch_01/0001.jpg") == Path("data/batch_01/0001.jpg")


def test_compressed_rle_of_any_mask_is_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = [(rng.random((H, W)) < p).astype(np.uint8) for p in (0.0, 0.03, 0.5, 0.97, 1.0)]
    anns = [
        ann(i + 1, {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode()})
        for i, m in enumerate(masks)
    ]
    data = coco.load_coco(make_json(tmp_path, anns))
    assert data.n_annotations == len(masks)
    for a, m in zip(data.annotations[1], masks, strict=True):
        np.testing.assert_array_equal(coco.decode_segmentation(a["segmentation"], H, W), m.astype(bool))


@pytest.mark.parametrize("kind", ["uncompressed", "compressed"])
def test_rle_that_does_not_cover_the_image_is_rejected(tmp_path: Path, kind: str) -> None:
    # pycocotools would decode these into uninitialised memory rather than fail.
    counts: Any = [0, (H - 1) * W]
    if kind == "compressed":
        counts = mask_utils.encode(np.ones((H - 1, W), dtype=np.uint8, order="F"))["counts"].decode()
    path = make_json(tmp_path, [ann(4, {"size": [H, W], "counts": counts})])
    with pytest.raises(UserError, match=rf"set\.json: annotation id 4 .*covers? {(H - 1) * W} pixels"):
        coco.load_coco(path)
