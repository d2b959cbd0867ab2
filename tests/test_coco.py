"""Tests for pipeline.data.coco: rasterization against pycocotools, overlap rules, class map, files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import write_params
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data import coco
from pipeline.data.images import (
    ObjectRecord,
    image_path,
    instance_map_path,
    mask_relpath,
    objects_path,
    read_image,
    read_instance_map,
    read_mask,
    read_objects,
    write_instance_map,
    write_mask,
    write_objects,
)
from pipeline.errors import UserError
from pipeline.evaluation.submission import SubmissionWriter
from pipeline.orchestration import cli

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


def overlapping(big_area_field: float | None, small_area_field: float | None) -> list[dict[str, Any]]:
    """Two overlapping squares; an area of None leaves the `area` field out (CVAT, labelme)."""
    big = ann(1, [[0, 0, 12, 0, 12, 10, 0, 10]], category_id=3, area=big_area_field)  # 120 px, class 3
    small = ann(2, [[8, 6, 14, 6, 14, 12, 8, 12]], category_id=1, area=small_area_field)  # 36 px, class 1
    for a in (big, small):
        if a["area"] is None:
            del a["area"]
    return [small, big]


@pytest.mark.parametrize(
    "areas", [(120.0, 36.0), (1.0, 9999.0), (None, None)], ids=["honest_area", "lying_area", "no_area"]
)
def test_area_desc_keeps_small_objects_on_top(
    tmp_path: Path, areas: tuple[float | None, float | None]
) -> None:
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


def three_objects() -> list[dict[str, Any]]:
    """`overlapping`'s two squares (json order: small class 1, big class 3) and a third object of the big
    one's class overlapping it (35 px at x 10..17, y 0..5), so that only the instance map tells them apart."""
    return [*overlapping(120.0, 36.0), ann(3, [[10, 0, 17, 0, 17, 5, 10, 5]], category_id=3)]


@pytest.mark.parametrize("overlap", ["area_desc", "max_class"])
def test_write_masks_writes_instance_maps_that_agree_with_the_masks(tmp_path: Path, overlap: str) -> None:
    json_path = make_json(tmp_path, three_objects())
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a" / "img.jpg")
    data = coco.load_coco(json_path)
    presence = coco.write_masks(data, tmp_path / "masks", overlap)  # type: ignore[arg-type]
    mask = read_mask(tmp_path / "masks" / "a" / "img.png")
    instances = read_instance_map(tmp_path / "masks" / "instances" / "a" / "img.png")
    assert (
        instance_map_path(tmp_path / "masks", "a/img.jpg")
        == tmp_path / "masks" / "instances" / "a" / "img.png"
    )
    assert instances.dtype == np.uint16 and instances.shape == (H, W)
    np.testing.assert_array_equal(mask, coco.rasterize(data, data.images[0], overlap))  # type: ignore[arg-type]
    assert presence[0].tolist() == [True, True, False, True]
    # Ownership agrees: an object exactly where a class is, and instance k (the k-th annotation in json
    # order) carries its annotation's class.
    np.testing.assert_array_equal(instances > 0, mask > 0)
    for k, annotation in enumerate(data.annotations[1], start=1):
        assert (mask[instances == k] == data.label(annotation)).all()
    # The overlap rule decides the owner as it decides the class: area_desc keeps the small square
    # (instance 1) on top, max_class gives the pixel to the big square's class 3 (instance 2).
    small_on_top = overlap == "area_desc"
    assert instances[7, 9] == (1 if small_on_top else 2)
    counts = np.bincount(instances.ravel(), minlength=4)
    assert counts[1] == (36 if small_on_top else 36 - 16)
    # The third object (painted after the big one under both rules) owns their overlap: same class, so
    # the mask shows one region there and only the instance map keeps the two objects apart.
    assert instances[2, 11] == 3 and instances[2, 9] == 2 and mask[2, 11] == mask[2, 9] == 3
    assert counts[3] == 35 and counts[2] == 120 - 10 - (16 if small_on_top else 0)


@pytest.mark.parametrize("overlap", ["area_desc", "max_class"])
def test_the_object_bank_holds_each_objects_visible_pycocotools_pixels(tmp_path: Path, overlap: str) -> None:
    speck = ann(4, [[14, 8, 17, 8, 17, 11, 14, 11]], category_id=2)  # 9 px: under the bank's minimum
    # 16 px inside the big square (class 3): on top of it under area_desc, hidden under max_class.
    inner = ann(5, [[2, 2, 6, 2, 6, 6, 2, 6]], category_id=1)
    anns = [*three_objects(), speck, inner]
    json_path = make_json(tmp_path, anns)
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a" / "img.jpg")
    data = coco.load_coco(json_path)
    coco.write_masks(data, tmp_path / "masks", overlap)  # type: ignore[arg-type]
    bank = {record.instance: record for record in read_objects(objects_path(tmp_path / "masks"))}
    instances = read_instance_map(instance_map_path(tmp_path / "masks", "a/img.jpg"))

    # The reference: pycocotools' decoded masks, painted in the rule's order (here category id = class).
    refs = [reference_mask(json_path, a["id"]) for a in anns]
    key = {
        "area_desc": lambda i: (-int(refs[i].sum()), anns[i]["id"]),
        "max_class": lambda i: (anns[i]["category_id"], anns[i]["id"]),
    }[overlap]
    order = sorted(range(len(anns)), key=key)
    for position, i in enumerate(order):
        later = np.zeros((H, W), bool)
        for j in order[position + 1 :]:
            later |= refs[j]
        visible = refs[i] & ~later
        np.testing.assert_array_equal(instances == i + 1, visible)
        if visible.sum() < coco.MIN_OBJECT_PIXELS:
            assert i + 1 not in bank
            continue
        ys, xs = np.nonzero(visible)
        bbox = (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        label = anns[i]["category_id"]
        assert bank[i + 1] == ObjectRecord("a/img.jpg", i + 1, label, bbox, int(visible.sum()))
    assert sorted(bank) == ([1, 2, 3, 5] if overlap == "area_desc" else [1, 2, 3])


def test_the_object_bank_round_trips_and_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    records = [ObjectRecord("a/b.jpg", 1, 2, (0, 1, 5, 4), 17), ObjectRecord("c.png", 3, 1, (2, 2, 4, 4), 16)]
    path = objects_path(tmp_path)
    write_objects(path, records, coco.MIN_OBJECT_PIXELS)
    assert read_objects(path) == records and path == tmp_path / "objects.json"
    with pytest.raises(UserError, match=r"objects\.json: object bank not found \(re-run the masks stage\)"):
        read_objects(tmp_path / "sub" / "objects.json")
    entry = {"file_name": "x.jpg", "instance": 1, "class": 1, "bbox": [0, 0, 2, 2], "area": 4}
    bad = {
        "{": r"object bank is not valid JSON",
        '{"min_pixels": 16}': r"object bank has no 'objects' list",
        json.dumps({"objects": [{**entry, "area": 5}]}): r"objects\[0\] is malformed",  # more than its box
        json.dumps({"objects": [{**entry, "file_name": "../x.jpg"}]}): r"objects\[0\] is malformed",
        json.dumps({"objects": [{**entry, "class": 0}]}): r"objects\[0\] is malformed",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(UserError, match=message) as caught:
            read_objects(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_instance_map_round_trip_and_bad_files(tmp_path: Path) -> None:
    instances = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 300 % 65536).astype(np.uint16)
    instances[0, 0] = 65535
    path = tmp_path / "deep" / "i.png"
    write_instance_map(path, instances)
    back = read_instance_map(path)
    assert back.dtype == np.uint16 and back.flags.writeable
    np.testing.assert_array_equal(back, instances)
    with pytest.raises(ValueError, match="uint16"):
        write_instance_map(tmp_path / "x.png", instances.astype(np.int32))
    missing = r"missing\.png: instance map file not found \(re-run the masks stage\)"
    with pytest.raises(UserError, match=missing):
        read_instance_map(tmp_path / "missing.png")
    write_mask(tmp_path / "eight_bit.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(UserError, match=r"eight_bit\.png: instance map must be a 16-bit"):
        read_instance_map(tmp_path / "eight_bit.png")


def test_an_instance_map_may_not_land_on_another_images_mask(tmp_path: Path) -> None:
    data = {
        "images": [
            {"id": 1, "file_name": "x.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "instances/x.jpg", "height": H, "width": W},
        ],
        "annotations": [ann(1, [[0, 0, 5, 0, 5, 5]])],
        "categories": [{"id": 1, "name": "cat"}],
    }
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"set\.json: the instance map of 'x\.jpg' would overwrite"):
        coco.write_masks(coco.load_coco(path), tmp_path / "masks")
    assert not (tmp_path / "masks").exists()  # refused before writing anything


def test_too_many_annotations_for_a_16_bit_instance_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coco, "MAX_INSTANCES", 2)
    data = coco.load_coco(make_json(tmp_path, three_objects()))
    assert coco.rasterize(data, data.images[0]).any()  # the class mask alone has no such limit
    with pytest.raises(UserError, match=r"set.json: image id 1 \(a/img.jpg\) has 3 annotations"):
        coco.rasterize_instances(data, data.images[0])


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
    assert mask_relpath(file_name) == expected


def test_mask_png_round_trip(tmp_path: Path) -> None:
    mask = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 11
    path = tmp_path / "deep" / "m.png"
    write_mask(path, mask)
    back = read_mask(path)
    assert back.dtype == np.uint8 and back.shape == (H, W)
    np.testing.assert_array_equal(back, mask)
    assert [p.name for p in path.parent.iterdir()] == ["m.png"]  # no temp file left behind


def test_write_mask_rejects_a_non_uint8_mask(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_mask(tmp_path / "m.png", np.zeros((3, 3), dtype=np.int64))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_read_image_returns_rgb_uint8(tmp_path: Path, mode: str) -> None:
    rgb = np.zeros((6, 9, 3), dtype=np.uint8)
    rgb[:, :4] = (200, 30, 90)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).convert(mode).save(path)
    image = read_image(path, expected_hw=(6, 9))
    assert image.dtype == np.uint8 and image.shape == (6, 9, 3)
    expected = np.asarray(Image.fromarray(rgb).convert(mode).convert("RGB"))
    np.testing.assert_array_equal(image, expected)


def test_image_path_joins_relative_names() -> None:
    assert image_path("data", "batch_01/0001.jpg") == Path("data/batch_01/0001.jpg")


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


# --- real-world exports: categories by id, unused categories, minimal annotations ---------------------------

SQUARE = [[0, 0, 6, 0, 6, 5, 0, 5]]  # x 0..6, y 0..5
TRIANGLE = [[8, 1, 16, 1, 12, 11]]  # x 8..16, y 1..11
BAR = [[0, 8, 5, 8, 5, 12, 0, 12]]  # x 0..5, y 8..12: the three never overlap


def cats(*pairs: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"id": cid, "name": name} for cid, name in pairs]


def write_coco(
    path: Path, categories: list[dict[str, Any]], annotations: list[dict[str, Any]] | None
) -> Path:
    """A one-image COCO json at `path`; `annotations=None` leaves the key out (a competition test set)."""
    data: dict[str, Any] = {
        "images": [{"id": 1, "file_name": "a/img.jpg", "height": H, "width": W}],
        "categories": categories,
    }
    if annotations is not None:
        data["annotations"] = annotations
    path.write_text(json.dumps(data))
    return path


def expected_mask(path: Path, labels: dict[int, int]) -> np.ndarray:
    """pycocotools' masks of the annotations in `labels` (annotation id -> class index), non-overlapping."""
    out = np.zeros((H, W), dtype=np.uint8)
    for ann_id, label in labels.items():
        out[reference_mask(path, ann_id)] = label
    return out


def mask_of(data: coco.CocoSet) -> np.ndarray:
    return coco.rasterize(data, data.images[0])


def test_duplicate_category_id_is_an_error(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "set.json", cats((1, "cat"), (2, "dog"), (1, "cow")), [])
    with pytest.raises(UserError, match=r"set\.json: category id 1 appears twice"):
        coco.load_coco(path)


def test_used_categories_sharing_a_name_get_their_ids(tmp_path: Path) -> None:
    anns = [ann(1, SQUARE, category_id=7), ann(2, TRIANGLE, category_id=3), ann(3, BAR, category_id=5)]
    path = write_coco(tmp_path / "set.json", cats((3, "Glass"), (7, "Glass"), (5, "Metal")), anns)
    data = coco.load_coco(path)
    assert data.classes == ["background", "Glass (id 3)", "Glass (id 7)", "Metal"]
    assert data.category_ids == [3, 7, 5]
    np.testing.assert_array_equal(mask_of(data), expected_mask(path, {1: 2, 2: 1, 3: 3}))
    assert coco.unused_report(data) is None


def test_a_category_called_background_is_told_apart_from_class_0(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "set.json", cats((4, "background"), (9, "cat")), [ann(1, SQUARE, 9)])
    assert coco.load_coco(path).classes == ["background", "background (id 4)", "cat"]


@pytest.mark.parametrize("first_id", [0, 1, 40])
def test_ids_with_gaps_map_in_json_order(tmp_path: Path, first_id: int) -> None:
    ids = [first_id, first_id + 4, first_id + 9]
    anns = [ann(1, SQUARE, category_id=ids[2]), ann(2, TRIANGLE, category_id=ids[0])]
    path = write_coco(tmp_path / "set.json", cats(*zip(ids, ["a", "b", "c"], strict=True)), anns)
    data = coco.load_coco(path)
    assert data.category_ids == ids and data.classes == ["background", "a", "b", "c"]
    np.testing.assert_array_equal(mask_of(data), expected_mask(path, {1: 3, 2: 1}))


@pytest.mark.parametrize("extra", ["missing", "wrong"])
@pytest.mark.parametrize("name", list(SEGMENTATIONS))
def test_only_the_segmentation_is_read(tmp_path: Path, name: str, extra: str) -> None:
    # CVAT and labelme exports may leave out iscrowd, area and bbox, or fill them wrongly.
    fields = {} if extra == "missing" else {"iscrowd": 0, "area": -3.0, "bbox": [100, 100, 1, 1]}
    minimal = {"id": 7, "image_id": 1, "category_id": 2, "segmentation": SEGMENTATIONS[name], **fields}
    path = make_json(tmp_path, [minimal])
    data = coco.load_coco(path)
    np.testing.assert_array_equal(mask_of(data), expected_mask(path, {7: 2}))


UNUSED_DOG = cats((1, "cat"), (2, "dog"), (3, "cow"))


def test_unused_category_is_kept_by_default_so_indexes_stay(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "set.json", UNUSED_DOG, [ann(1, SQUARE, 1), ann(2, TRIANGLE, 3)])
    for data in (coco.load_coco(path), coco.load_coco(path, unused="keep")):
        assert data.classes == ["background", "cat", "dog", "cow"] and data.category_ids == [1, 2, 3]
        np.testing.assert_array_equal(mask_of(data), expected_mask(path, {1: 1, 2: 3}))
        assert coco.unused_report(data) == (
            f"{path}: category id 2 'dog' is used by no annotation: kept as class 2 "
            "(data.unused_categories: drop removes it)"
        )


def test_unused_category_dropped(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "set.json", UNUSED_DOG, [ann(1, SQUARE, 1), ann(2, TRIANGLE, 3)])
    data = coco.load_coco(path, unused="drop")
    assert data.classes == ["background", "cat", "cow"] and data.category_ids == [1, 3]
    np.testing.assert_array_equal(mask_of(data), expected_mask(path, {1: 1, 2: 2}))
    assert coco.unused_report(data) == (
        f"{path}: category id 2 'dog' is used by no annotation: dropped "
        "(data.unused_categories: keep keeps it as a class)"
    )


def test_several_unused_categories_make_one_report_line(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "set.json", cats((0, "x"), *[(c["id"], c["name"]) for c in UNUSED_DOG]),
                      [ann(1, SQUARE, 1)])  # fmt: skip
    assert coco.unused_report(coco.load_coco(path)) == (
        f"{path}: 3 categories are used by no annotation: id 0 'x' kept as class 1, id 2 'dog' kept as "
        "class 3, id 3 'cow' kept as class 4 (data.unused_categories: drop removes them)"
    )
    dropped = coco.load_coco(path, unused="drop")
    assert dropped.classes == ["background", "cat"]
    assert "id 0 'x' dropped, id 2 'dog' dropped, id 3 'cow' dropped" in coco.unused_report(dropped)


def test_a_category_named_only_by_a_skipped_annotation_is_used(tmp_path: Path) -> None:
    # Mending a broken polygon must not shift class indexes, so naming a category is what counts.
    anns = [ann(1, SQUARE, 1), ann(2, [[1, 2, 3]], 2), ann(3, TRIANGLE, 3)]
    path = write_coco(tmp_path / "set.json", UNUSED_DOG, anns)
    data = coco.load_coco(path, on_bad="skip", unused="drop")
    assert data.skipped == 1 and data.classes == ["background", "cat", "dog", "cow"]
    assert coco.unused_report(data) is None


def test_dropping_every_category_is_an_error(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "test.json", UNUSED_DOG, None)
    assert coco.load_coco(path).n_classes == 4  # a test set alone keeps its categories
    with pytest.raises(UserError, match=r"test\.json: no annotation names any of its 3 categories"):
        coco.load_coco(path, unused="drop")


def roboflow_categories() -> list[dict[str, Any]]:
    # Roboflow's id-0 category is the dataset's supercategory, named like the project (here like a class).
    return [{"id": 0, "name": "cow", "supercategory": "none"},
            {"id": 1, "name": "cat", "supercategory": "cow"},
            {"id": 2, "name": "cow", "supercategory": "cow"}]  # fmt: skip


@pytest.fixture
def drop_train(tmp_path: Path) -> coco.CocoSet:
    path = write_coco(
        tmp_path / "train.json", roboflow_categories(), [ann(1, SQUARE, 1), ann(2, TRIANGLE, 2)]
    )
    train = coco.load_coco(path, unused="drop")
    assert train.classes == ["background", "cat", "cow"] and train.category_ids == [1, 2]
    return train


def test_drop_maps_a_test_json_through_the_training_classes(tmp_path: Path, drop_train: coco.CocoSet) -> None:
    test = coco.load_coco(
        write_coco(tmp_path / "test.json", roboflow_categories(), None), classes_from=drop_train
    )
    assert test.classes == drop_train.classes and test.category_ids == drop_train.category_ids
    assert test.unused == {} and coco.unused_report(test) is None
    coco.check_same_classes(drop_train, test)
    # A test json that leaves out the dropped category maps the same way.
    lean = write_coco(tmp_path / "lean.json", roboflow_categories()[1:], None)
    assert coco.load_coco(lean, classes_from=drop_train).classes == drop_train.classes


def test_drop_ignores_truth_annotations_of_a_dropped_category(
    tmp_path: Path, drop_train: coco.CocoSet
) -> None:
    anns = [ann(1, SQUARE, category_id=0), ann(2, TRIANGLE, category_id=2), ann(3, BAR, category_id=1)]
    path = write_coco(tmp_path / "truth.json", roboflow_categories(), anns)
    truth = coco.load_coco(path, classes_from=drop_train)
    assert truth.ignored == 1 and truth.n_annotations == 2 and "1 ignored" in truth.summary()
    np.testing.assert_array_equal(mask_of(truth), expected_mask(path, {2: 2, 3: 1}))


def test_classes_from_needs_every_training_class(tmp_path: Path, drop_train: coco.CocoSet) -> None:
    path = write_coco(tmp_path / "test.json", cats((0, "cow"), (1, "cat")), None)
    with pytest.raises(UserError, match=r"test\.json: no category id 2 \('cow' in .*train\.json\)"):
        coco.load_coco(path, classes_from=drop_train)


def test_classes_from_matches_by_id_not_by_position(tmp_path: Path) -> None:
    train = coco.load_coco(write_coco(tmp_path / "train.json", cats((1, "cat"), (2, "cow")), []))
    path = write_coco(tmp_path / "truth.json", cats((2, "cow"), (1, "cat")), [ann(1, SQUARE, 2)])
    truth = coco.load_coco(path, classes_from=train)
    np.testing.assert_array_equal(mask_of(truth), expected_mask(path, {1: 2}))
    # ...but the stages refuse the reordered json: loaded alone (a CLI score without --train-json) it
    # would number the classes its own way.
    with pytest.raises(UserError, match=r"truth\.json: lists category id 2 where .*train\.json lists id 1"):
        coco.check_same_classes(train, truth)


def test_same_classes_compares_names_per_id_and_refuses_extra_categories(tmp_path: Path) -> None:
    train = coco.load_coco(write_coco(tmp_path / "train.json", cats((1, "cat"), (2, "cow")), []))
    renamed = coco.load_coco(
        write_coco(tmp_path / "a.json", cats((1, "cat"), (2, "pig")), []), classes_from=train
    )
    with pytest.raises(
        UserError, match=r"a\.json: category 2 is 'pig' \(id 2\) but in .*train\.json it is 'cow'"
    ):
        coco.check_same_classes(train, renamed)
    extra = coco.load_coco(write_coco(tmp_path / "b.json", cats((1, "cat"), (2, "cow"), (9, "pig")), []),
                           classes_from=train)  # fmt: skip
    with pytest.raises(UserError, match=r"b\.json: category id 9 \('pig'\) is not in .*train\.json"):
        coco.check_same_classes(train, extra)


@pytest.mark.parametrize("unused", ["keep", "drop"])
def test_roboflow_export_loads_cleanly(tmp_path: Path, unused: str) -> None:
    rle = SEGMENTATIONS["compressed_rle"]
    data = {
        "info": {"year": "2024", "description": "Exported from roboflow.com"},
        "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
        "categories": roboflow_categories(),
        "images": [{"id": 0, "license": 1, "file_name": "a_jpg.rf.1f2e.jpg", "height": H, "width": W,
                    "date_captured": "2024-01-01T00:00:00+00:00"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 2, "bbox": [0, 0, 6, 5], "area": 30,
             "segmentation": SQUARE, "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [8, 1, 8, 10], "area": 40,
             "segmentation": TRIANGLE, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 2, "bbox": [0, 0, 0, 0], "area": 0, "segmentation": rle,
             "iscrowd": 1},
        ],
    }  # fmt: skip
    path = tmp_path / "_annotations.coco.json"
    path.write_text(json.dumps(data))
    loaded = coco.load_coco(path, unused=unused)  # type: ignore[arg-type]
    if unused == "keep":
        assert loaded.classes == ["background", "cow (id 0)", "cat", "cow (id 2)"]
        assert coco.unused_report(loaded) == (
            f"{path}: category id 0 'cow' is used by no annotation: kept as class 1 "
            "(data.unused_categories: drop removes it)"
        )
    else:
        assert loaded.classes == ["background", "cat", "cow"]
    cow = loaded.label_of_category[2]
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[reference_mask(path, 2) | reference_mask(path, 0)] = cow
    expected[reference_mask(path, 1)] = loaded.label_of_category[1]  # the RLE lies under the triangle
    mask = mask_of(loaded)
    assert (mask == cow).any() and (mask == loaded.label_of_category[1]).any()
    # The triangle (40 px) is smaller than the RLE blob (91 px), so area_desc paints it over the blob.
    np.testing.assert_array_equal(mask, expected)


def test_load_with_training_classes(tmp_path: Path, drop_train: coco.CocoSet) -> None:
    test = write_coco(tmp_path / "test.json", roboflow_categories(), None)
    with pytest.raises(UserError, match=r"test\.json: with data.unused_categories: drop .* \(--train-json\)"):
        coco.load_with_training_classes(test, None, unused="drop")
    assert coco.load_with_training_classes(test, None).classes == coco.load_coco(test).classes
    mapped = coco.load_with_training_classes(test, drop_train.path, unused="drop")
    assert mapped.classes == drop_train.classes and mapped.category_ids == drop_train.category_ids
    other = write_coco(tmp_path / "other.json", cats((1, "cat"), (2, "pig")), None)
    with pytest.raises(UserError, match="category 2 is 'pig'"):
        coco.load_with_training_classes(other, drop_train.path, unused="drop")


def test_cli_validate_uses_the_training_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_coco(tmp_path / "train.json", roboflow_categories(), [ann(1, SQUARE, 1), ann(2, TRIANGLE, 2)])
    test = write_coco(tmp_path / "test.json", roboflow_categories(), None)
    submission = tmp_path / "s.csv"
    with SubmissionWriter(submission, "dense", 4) as out:  # class 3 exists only while id 0 is kept
        out.write("a/img.jpg", np.full((H, W), 3, dtype=np.uint8))
    args = ["validate", str(submission), "--test", str(test), "--size", "native"]
    keep, drop = tmp_path / "keep.yaml", tmp_path / "drop.yaml"
    write_params(keep, {"data": {"unused_categories": "keep"}})
    write_params(drop, {"data": {"unused_categories": "drop"}})
    cli.main([*args, "--params", str(keep)])
    assert capsys.readouterr().out.startswith("valid: 1 rows")
    with pytest.raises(UserError, match="--train-json"):
        cli.main([*args, "--params", str(drop)])
    with pytest.raises(SystemExit) as exit_info:  # drop leaves classes 0..2
        cli.main([*args, "--params", str(drop), "--train-json", str(tmp_path / "train.json")])
    assert exit_info.value.code == 1
    assert "value 3 (pixel 1) is not a class index 0..2" in capsys.readouterr().out
