"""Tests for pipeline.training.copypaste: what a paste changes, rarity-weighted drawing, fold safety in the
real training loader, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import AugmentParams, params_from_overlay
from pipeline.data import coco
from pipeline.data.images import (
    ObjectRecord,
    instance_map_path,
    mask_relpath,
    objects_path,
    read_image,
    read_objects,
    write_instance_map,
    write_mask,
)
from pipeline.data.manifest import manifest_of, write_manifest
from pipeline.errors import UserError
from pipeline.training.augment import build_train_transform, rarity_weights
from pipeline.training.copypaste import CopyPaste, load_cut
from pipeline.training.dataset import SegmentationDataset, _Streams
from pipeline.training.fold_data import FoldPaths, build_loaders, load_fold_data
from pipeline.training.runtime import Runtime
from pipeline.training.weightmap import BoundaryWeighting, boundary_weights

# pycocotools 2.0.x's decoder trips numpy 2's copy-keyword deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# An L-shaped object (not symmetric, so a mirror shows) in a 6x5 box: 8 + 10 = 18 pixels.
L_SHAPE = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ],
    dtype=bool,
)
SRC_BOX = (3, 2, 5, 6)  # x, y, w, h of the L in the source image


def _source(tmp_path: Path) -> tuple[Path, Path, ObjectRecord, np.ndarray]:
    """A 12x10 PNG (no JPEG loss) with the L as instance 2 of class 3, and a neighbour as instance 1:
    (images root, masks dir, the L's bank record, the source image)."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    root.mkdir(parents=True)
    image = np.random.default_rng(1).integers(1, 256, (12, 10, 3), dtype=np.uint8)  # never 0
    Image.fromarray(image).save(root / "src.png")
    instances = np.zeros((12, 10), np.uint16)
    x, y, w, h = SRC_BOX
    instances[y : y + h, x : x + w][L_SHAPE] = 2
    instances[y : y + h, x + 1 : x + w][~L_SHAPE[:, 1:]] = 1  # in the L's box but not the L: never cut
    write_instance_map(instance_map_path(masks, "src.png"), instances)
    record = ObjectRecord("src.png", 2, 3, SRC_BOX, int(L_SHAPE.sum()))
    return root, masks, record, image


def _params(**changes: object) -> AugmentParams:
    base = {
        "copy_paste": 1.0,
        "copy_paste_max": 1,
        "copy_paste_scale": [1.0, 1.0],
        "copy_paste_hflip": 0.0,
        "copy_paste_placement": "anywhere",
    }
    return AugmentParams(**{**base, **changes})


def _paster(tmp_path: Path, **changes: object) -> tuple[CopyPaste, np.ndarray]:
    root, masks, record, image = _source(tmp_path)
    weights = np.array([0.0, 1.0, 1.0, 1.0])
    return CopyPaste([record], ["src.png"], weights, root, masks, _params(**changes)), image


def _pasted(paster: CopyPaste, seed: int = 0, shape: tuple[int, int] = (30, 40)) -> tuple[np.ndarray, ...]:
    image, mask = np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.uint16)
    instances[0, 0] = 7  # an existing object: the pasted one gets 8
    return paster(image, mask, instances, np.random.default_rng(seed))


def _box(where: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(where)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def _source_cut(image: np.ndarray) -> np.ndarray:
    x, y, w, h = SRC_BOX
    return image[y : y + h, x : x + w]


@pytest.mark.parametrize("flip", [False, True])
def test_a_paste_copies_the_polygon_pixels_and_class_and_nothing_else(tmp_path: Path, flip: bool) -> None:
    paster, source = _paster(tmp_path, copy_paste_hflip=1.0 if flip else 0.0)
    for seed in range(5):
        image, mask, instances = _pasted(paster, seed)
        box = _box(mask > 0)
        shape = L_SHAPE[:, ::-1] if flip else L_SHAPE
        cut = _source_cut(source)[:, ::-1] if flip else _source_cut(source)
        np.testing.assert_array_equal(mask[box] > 0, shape)  # the polygon's pixels, not its box
        assert (mask[mask > 0] == 3).all()
        np.testing.assert_array_equal(image[box][shape], cut[shape])
        # Nothing else changed: the image is 0 outside the object, the instance map's old object kept.
        assert not image[mask == 0].any()
        assert (instances[mask > 0] == 8).all() and instances[0, 0] == 7
        assert np.count_nonzero(instances) == L_SHAPE.sum() + 1


def test_scale_2_doubles_each_side(tmp_path: Path) -> None:
    paster, _ = _paster(tmp_path, copy_paste_scale=[2.0, 2.0])
    _, mask, _ = _pasted(paster)
    box = _box(mask > 0)
    assert mask[box].shape == (12, 10)  # the 6x5 box, twice as high and wide
    assert np.count_nonzero(mask) == 4 * L_SHAPE.sum()  # so four times the area (nearest neighbour)
    np.testing.assert_array_equal(mask[box] > 0, L_SHAPE.repeat(2, axis=0).repeat(2, axis=1))


def test_probability_0_and_an_empty_bank_leave_the_item_alone(tmp_path: Path) -> None:
    paster, _ = _paster(tmp_path, copy_paste=0.0)
    image, mask, instances = np.ones((9, 9, 3), np.uint8), np.zeros((9, 9), np.uint8), None
    out = paster(image, mask, instances, np.random.default_rng(0))
    assert out[0] is image and out[1] is mask and out[2] is None
    root, masks, record, _ = _source(tmp_path / "other")
    nothing_allowed = CopyPaste([record], ["x.png"], np.ones(4), root, masks, _params())
    assert nothing_allowed(image, mask, None, np.random.default_rng(0))[1] is mask


def test_an_object_larger_than_the_target_is_clipped_or_skipped(tmp_path: Path) -> None:
    paster, _ = _paster(tmp_path, copy_paste_scale=[3.0, 3.0])  # an 18x15 box
    for seed in range(10):
        _, mask, _ = _pasted(paster, seed, shape=(8, 40))
        n = np.count_nonzero(mask)
        assert n == 0 or n >= coco.MIN_OBJECT_PIXELS
    _, mask, _ = _pasted(paster, 0, shape=(3, 3))  # 9 pixels at most: never enough to show
    assert not mask.any()


def test_background_placement_avoids_foreground(tmp_path: Path) -> None:
    def covered(placement: str) -> float:
        paster, _ = _paster(tmp_path / placement, copy_paste_placement=placement)
        total = 0
        for seed in range(40):
            mask = np.zeros((30, 40), np.uint8)
            mask[:, :30] = 1  # three quarters foreground
            _, out, _ = paster(
                np.zeros((30, 40, 3), np.uint8), mask.copy(), None, np.random.default_rng(seed)
            )
            total += np.count_nonzero((out == 3) & (mask == 1))
        return total / 40

    assert covered("background") < 0.5 * covered("anywhere")


def _grid_bank(tmp_path: Path, labels: list[int]) -> tuple[Path, Path, list[ObjectRecord]]:
    """One 40x40 source image whose instance map holds len(labels) 4x4 objects, one per 5x5 cell."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    root.mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / "grid.png")
    instances = np.zeros((40, 40), np.uint16)
    records = []
    for k, label in enumerate(labels):
        y, x = 5 * (k // 8), 5 * (k % 8)
        instances[y : y + 4, x : x + 4] = k + 1
        records.append(ObjectRecord("grid.png", k + 1, label, (x, y, 4, 4), 16))
    write_instance_map(instance_map_path(masks, "grid.png"), instances)
    return root, masks, records


def test_classes_are_drawn_by_rarity_not_by_object_count(tmp_path: Path) -> None:
    # 50 objects of a common class (in 50 images), 2 of a rare one (in 2): uniform over objects would
    # paste the rare class 4 % of the time; weights (50 / 2) ** 0.5 = 5 against 1 give it 5 / 6.
    root, masks, records = _grid_bank(tmp_path, [1] * 50 + [2] * 2)
    presence = np.zeros((52, 3), bool)
    presence[:50, 1] = presence[50:, 2] = True
    weights = rarity_weights(presence, gamma=0.5)
    paster = CopyPaste(records, ["grid.png"], weights, root, masks, _params())
    rng = np.random.default_rng(0)
    counts = np.zeros(3, int)
    for _ in range(600):
        _, mask, _ = paster(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.uint8), None, rng)
        counts += np.bincount(mask.ravel(), minlength=3) > 0
    assert counts[1] + counts[2] == 600
    assert 0.75 < counts[2] / 600 < 0.92, counts  # 5 / 6 expected


def test_only_allowed_sources_are_pasted_whatever_their_weight(tmp_path: Path) -> None:
    root, masks, records = _grid_bank(tmp_path, [1, 2])
    held_out = [ObjectRecord("held_out.png", r.instance, r.label, r.bbox, r.area) for r in records]
    # Class 2 exists only in the held-out image: it must never be drawn, even weighing the most.
    paster = CopyPaste(
        [records[0], held_out[1]], ["grid.png"], np.array([0, 1.0, 100.0]), root, masks, _params()
    )
    assert paster.classes == [1]
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, mask, _ = paster(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.uint8), None, rng)
        assert set(np.unique(mask)) == {0, 1}


def test_a_stale_bank_is_a_one_line_user_error(tmp_path: Path) -> None:
    root, masks, record, _ = _source(tmp_path)
    stale = ObjectRecord(record.file_name, record.instance, record.label, record.bbox, record.area + 1)
    with pytest.raises(UserError, match=r"src\.png: object 2 is not the one the object bank lists"):
        load_cut(root, masks, stale)
    with pytest.raises(UserError, match=r"objects\.json: object bank not found \(re-run the masks stage\)"):
        CopyPaste.from_bank(tmp_path / "objects.json", [], np.ones(2), root, masks, _params())


# ---------------------------------------------------------------------------------------------------------
# In the dataset: its own random stream.


def test_streams_0_and_1_are_what_they_were_before_copy_paste() -> None:
    streams = _Streams.from_seed(123)
    old_transform, old_elastic = np.random.SeedSequence(123).spawn(2)  # the streams before copy-paste
    assert streams.transform.random() == np.random.default_rng(old_transform).random()
    assert streams.elastic.random() == np.random.default_rng(old_elastic).random()


def _dataset_files(tmp_path: Path) -> tuple[Path, Path, list[str], CopyPaste]:
    root, masks, record, _ = _source(tmp_path)
    names = []
    for i in range(3):
        name = f"t{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            root / name
        )
        write_mask(masks / mask_relpath(name), np.zeros((24, 24), np.uint8))
        names.append(name)
    return (
        root,
        masks,
        names,
        CopyPaste([record], ["src.png"], np.ones(4), root, masks, _params(copy_paste=0.5)),
    )


def test_copy_paste_at_probability_0_gives_bit_identical_items(tmp_path: Path) -> None:
    root, masks, names, paster = _dataset_files(tmp_path)
    paster.params = _params(copy_paste=0.0)
    params = AugmentParams(size=32, hflip=0.5, vflip=0.5, shift_scale_rotate=0.5, color=0.5)
    plain = SegmentationDataset(root, names, masks, build_train_transform(params))
    with_off = SegmentationDataset(root, names, masks, build_train_transform(params), copy_paste=paster)
    for key in [(0, 1), (1, 2), (2, 3), 0, 1, 2]:
        a, b = plain[key], with_off[key]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_same_item_seed_pastes_the_same_item(tmp_path: Path) -> None:
    root, masks, names, paster = _dataset_files(tmp_path)
    params = AugmentParams(size=32, shift_scale_rotate=0.0, color=0.0, hflip=0.0, vflip=0.0)
    dataset = SegmentationDataset(root, names, masks, build_train_transform(params), copy_paste=paster)
    pasted = 0
    for seed in range(20):
        first, again = dataset[(seed % 3, seed)], dataset[(seed % 3, seed)]
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
        pasted += bool((first[1] == 3).any())
    assert 3 < pasted < 17  # probability 0.5: some items pasted, some not


def test_a_pasted_object_is_an_instance_of_its_own_in_the_boundary_weights(tmp_path: Path) -> None:
    root, masks, names, paster = _dataset_files(tmp_path)
    paster.params = _params(copy_paste=1.0)
    empty = np.zeros((24, 24), np.uint16)
    for name in names:
        write_instance_map(instance_map_path(masks, name), empty)
    boundary = BoundaryWeighting(w0=10.0, sigma=3.0, class_balance=False, n_classes=4)
    dataset = SegmentationDataset(root, names, masks, A.Compose([]), boundary=boundary, copy_paste=paster)
    for seed in range(3):
        _, mask, weight = dataset[(0, seed)]
        raw = read_image(root / names[0]), np.zeros((24, 24), np.uint8), empty
        _, expected_mask, expected_instances = paster(*raw, _Streams.from_seed(seed).copy_paste)
        np.testing.assert_array_equal(mask.numpy(), expected_mask)
        assert np.unique(expected_instances).tolist() == [0, 1]
        expected = boundary_weights(expected_instances, expected_mask, 4, 10.0, 3.0, class_balance=False)
        np.testing.assert_array_equal(weight.numpy(), expected)


# ---------------------------------------------------------------------------------------------------------
# Fold safety through the fold's real training loader.

SIZE = 32
# Classes: 1 common (every image), 2 only in fold 0's images (held out below), 3 in one training image.
CATEGORIES = [{"id": 1, "name": "common"}, {"id": 2, "name": "held_out_only"}, {"id": 3, "name": "single"}]


def _square(ann_id: int, image_id: int, category: int, x: int, y: int, side: int) -> dict:
    poly = [x, y, x + side, y, x + side, y + side, x, y + side]
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": [poly]}


@pytest.fixture(scope="module")
def fold_data(tmp_path_factory: pytest.TempPathFactory) -> FoldPaths:
    """9 images in 3 folds (fold = i % 3) as the masks and split stages leave them."""
    data = tmp_path_factory.mktemp("fold_data")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(9):
        name = f"img/{i}.png"
        (data / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / name)
        images.append({"id": i + 1, "file_name": name, "height": SIZE, "width": SIZE})
        annotations.append(_square(len(annotations) + 1, i + 1, 1, 2, 2, 8))
        if i % 3 == 0:
            annotations.append(_square(len(annotations) + 1, i + 1, 2, 18, 18, 8))
        if i == 4:
            annotations.append(_square(len(annotations) + 1, i + 1, 3, 18, 2, 6))
    (data / "train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    (data / "test.json").write_text(json.dumps({"images": images[:1], "categories": CATEGORIES}))
    train = coco.load_coco(data / "train.json", require_annotations=True)
    test = coco.load_coco(data / "test.json", classes_from=train)
    presence = coco.write_masks(train, data / "masks")
    write_manifest(data / "manifest.json", manifest_of(train, test, presence))
    folds = pd.DataFrame({"image_id": [im["file_name"] for im in images], "fold": [i % 3 for i in range(9)]})
    folds.to_csv(data / "folds.csv", index=False)
    out = data / "run"
    return FoldPaths(
        root=data,
        manifest=data / "manifest.json",
        masks=data / "masks",
        folds=data / "folds.csv",
        model_dir=out / "model",
        metrics=out / "metrics.json",
        live=out / "live",
    )


def test_the_training_loader_never_pastes_a_held_out_object(fold_data: FoldPaths) -> None:
    bank = read_objects(objects_path(fold_data.masks))
    assert {o.label for o in bank} == {1, 2, 3}  # the held-out class is in the bank: only the fold hides it
    raw = {
        "augment": {
            "size": SIZE, "oversample": False, "copy_paste": 1.0, "copy_paste_max": 6,
            "copy_paste_scale": [0.75, 1.25], "copy_paste_placement": "background",
        },
        "train": {"batch_size": 2},
        "models": {"m": {}},
    }  # fmt: skip
    recipe = params_from_overlay(raw).recipe("m")
    data = load_fold_data(0, fold_data)
    train_loader, _ = build_loaders(
        recipe.augment, recipe.train, 0, data, fold_data, Runtime(torch.device("cpu"))
    )
    paster = train_loader.dataset.copy_paste
    sources = {o.file_name for pool in paster.objects for o in pool}
    assert sources <= set(data.train_names) and not sources & {im.file_name for im in data.val_images}
    batches = single = 0
    for epoch in range(4):
        train_loader.sampler.set_epoch(epoch)
        for _, masks in train_loader:
            assert not (masks == 2).any(), f"a held-out object was pasted in epoch {epoch}"
            batches += 1
            single += bool((masks == 3).any())
    # Positive control: class 3 is in one training image, so in at most one batch per epoch unpasted.
    assert batches == 12 and single >= 10, (batches, single)
