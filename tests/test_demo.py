"""Tests for pipeline.data.demo: determinism, COCO validity, exact annotations, class frequencies, stage."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_params

from pipeline.config import DemoParams, params_from_overlay
from pipeline.data import coco, demo
from pipeline.data.images import read_image
from pipeline.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REPO = Path(__file__).resolve().parents[1]
SMALL = DemoParams(seed=3, n_train=8, n_test=4, image_size=64, max_objects=4)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def frequent(tmp_path_factory: pytest.TempPathFactory) -> coco.CocoSet:
    """A demo the size of params.yaml's (240 training images), small pixels to stay fast."""
    out = tmp_path_factory.mktemp("demo240")
    demo.generate_demo(out, DemoParams(seed=0, n_train=240, n_test=60, image_size=64, max_objects=4))
    return coco.load_coco(out / "train.json")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    demo.generate_demo(tmp_path / "a", SMALL)
    demo.generate_demo(tmp_path / "b", SMALL)
    demo.generate_demo(tmp_path / "c", SMALL.model_copy(update=dict(seed=4)))
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["images/train_0000.jpg"] != c["images/train_0000.jpg"]
    assert a["train.json"] != c["train.json"]


def test_layout_and_competition_categories(tmp_path: Path) -> None:
    demo.generate_demo(tmp_path, SMALL)
    train = coco.load_coco(tmp_path / "train.json", require_annotations=True)
    test = coco.load_coco(tmp_path / "test.json")
    truth = coco.load_coco(tmp_path / "test_truth.json", require_annotations=True)
    assert train.classes == [
        "background", "General trash", "Paper", "Paper pack", "Metal", "Glass", "Plastic", "Styrofoam",
        "Plastic bag", "Battery", "Clothing",
    ]  # fmt: skip
    assert train.category_ids == list(range(1, 11))
    coco.check_same_classes(train, test)
    coco.check_same_classes(train, truth)
    assert "annotations" not in json.loads((tmp_path / "test.json").read_text())
    assert test.images == truth.images and truth.n_annotations > 0
    assert len(train.images) == SMALL.n_train and len(test.images) == SMALL.n_test
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        Path(i.file_name).name for i in train.images + test.images
    )
    for data in (train, truth):
        for image in data.images:
            assert image.height == image.width == SMALL.image_size
            pixels = read_image(data.image_file(image), (image.height, image.width))
            assert pixels.std() > 5  # textured, not flat
            assert 1 <= len(data.annotations[image.id]) <= SMALL.max_objects


def test_class_map_equals_the_rasterized_annotations() -> None:
    """The image is painted through exactly the masks its annotations decode to, in area_desc order."""
    names = ["Clothing", "Battery", "Paper", "Plastic bag", "Metal", "Glass"]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        pixels, objects, class_map = demo.render_image(rng, 96, names)
        assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
        data = coco.CocoSet(
            path=Path("memory.json"), root=Path("."), classes=["background", *demo.CATEGORIES],
            category_ids=list(range(1, 11)), images=[coco.ImageRecord(0, "x.jpg", 96, 96)],
            annotations={0: [{"id": i, **obj} for i, obj in enumerate(objects)]}, has_annotations=True,
        )  # fmt: skip
        np.testing.assert_array_equal(coco.rasterize(data, data.images[0], "area_desc"), class_map)
        assert len(np.unique(class_map)) >= 4  # objects overlap but stay visible


def test_every_annotation_format_appears_and_decodes(frequent: coco.CocoSet) -> None:
    kinds = Counter()
    for anns in frequent.annotations.values():
        for a in anns:
            seg = a["segmentation"]
            kind = "polygon" if isinstance(seg, list) else type(seg["counts"]).__name__
            kinds[kind, a["iscrowd"]] += 1
    assert set(kinds) == {("polygon", 0), ("list", 0), ("str", 0), ("list", 1)}
    assert kinds["polygon", 0] > 0.6 * sum(kinds.values())
    assert frequent.skipped == 0 and frequent.clipped == 0


def test_class_frequencies_are_imbalanced_like_the_competition(frequent: coco.CocoSet) -> None:
    n = len(frequent.images)
    share = {
        name: sum(any(frequent.label(a) == k for a in anns) for anns in frequent.annotations.values()) / n
        for k, name in enumerate(frequent.classes[1:], 1)
    }
    for rare in ("Battery", "Clothing"):
        # Present in every fold of a 3-fold split (>= 4% of 240 images), yet rare.
        assert 0.04 <= share[rare] <= 0.1, share
    for common in ("Paper", "Plastic bag", "General trash", "Plastic"):
        assert share[common] > 2.5 * max(share["Battery"], share["Clothing"]), share
    assert all(share[name] > 0.08 for name in ("Paper pack", "Metal", "Glass", "Styrofoam")), share


def test_rare_objects_are_large_enough_to_learn(frequent: coco.CocoSet) -> None:
    side = frequent.images[0].width
    for anns in frequent.annotations.values():
        for a in anns:
            if frequent.classes[frequent.label(a)] == "Battery":
                mask = coco.decode_segmentation(a["segmentation"], side, side)
                ys, xs = np.nonzero(mask)
                assert max(np.ptp(xs), np.ptp(ys)) + 1 >= 0.2 * side


def test_demo_stage_writes_the_dataset(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"demo": {"seed": 3, "n_train": 8, "n_test": 4, "image_size": 64, "max_objects": 4}})
    out = tmp_path / "data" / "demo"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier run")
    command = [sys.executable, str(REPO / "stages" / "demo.py"), "--out", str(out), "--params", str(params)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    demo.generate_demo(tmp_path / "direct", SMALL)
    assert tree(out) == tree(tmp_path / "direct")  # the old folder was replaced whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no temporary folders left


def test_demo_stage_reports_bad_params(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    write_params(params, {"demo": {"n_trian": 8}})
    out = tmp_path / "demo"
    command = [sys.executable, str(REPO / "stages" / "demo.py"), "--out", str(out), "--params", str(params)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "n_trian" in result.stderr
    assert not out.exists()


def test_nonsense_params_are_refused() -> None:
    with pytest.raises(UserError, match=r"'demo\.max_objects' must be at least 1, got 0"):
        params_from_overlay({"demo": {"max_objects": 0}})
    with pytest.raises(UserError, match=r"'demo\.jpeg_quality' must be between 1 and 100, got 101"):
        params_from_overlay({"demo": {"jpeg_quality": 101}})
