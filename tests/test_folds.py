"""Tests for pipeline.folds and the `split` stage script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import coco
from pipeline.folds import class_presence, fold_class_counts, make_folds

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_presence(n_images: int = 400, seed: int = 0) -> np.ndarray:
    """Multi-label presence with common and rare classes, correlated like real photos (bool N x 7)."""
    rng = np.random.default_rng(seed)
    rates = [0.6, 0.35, 0.2, 0.1, 0.05, 0.025]
    foreground = rng.random((n_images, len(rates))) < rates
    foreground[:, 4] |= foreground[:, 5] & (rng.random(n_images) < 0.5)  # rare classes co-occur
    return np.column_stack([np.ones(n_images, dtype=bool), foreground])


def test_class_presence_lists_the_labels_of_each_mask() -> None:
    masks = [
        np.array([[0, 0], [0, 3]], np.uint8),
        np.array([[1, 1], [1, 1]], np.uint8),
        np.zeros((3, 2), np.uint8),
    ]
    expected = [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    np.testing.assert_array_equal(class_presence(iter(masks), 4), np.array(expected, dtype=bool))
    assert class_presence([], 4).shape == (0, 4)


def test_class_presence_rejects_a_label_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="mask 1 holds label 5"):
        class_presence([np.zeros((2, 2), np.uint8), np.full((2, 2), 5, np.uint8)], 4)


def test_folds_keep_class_proportions_in_every_fold() -> None:
    presence = _synthetic_presence()
    n_splits = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class has enough images: no warning
        folds = make_folds(presence, n_splits, seed=42)
    assert folds.dtype == np.int64 and set(folds.tolist()) == set(range(n_splits))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.05 * len(folds)
    for c in range(1, presence.shape[1]):
        expected = presence[:, c].sum() / n_splits
        counts = np.bincount(folds[presence[:, c]], minlength=n_splits)
        assert np.all(np.abs(counts - expected) <= max(1.0, 0.25 * expected)), (c, counts, expected)
    # Images with no foreground class are stratified too.
    empty = ~presence[:, 1:].any(axis=1)
    counts = np.bincount(folds[empty], minlength=n_splits)
    assert np.all(np.abs(counts - empty.sum() / n_splits) <= max(1.0, 0.25 * empty.sum() / n_splits))


def test_iterative_stratification_beats_a_plain_shuffle_on_rare_classes() -> None:
    # Cross-check against sklearn's KFold: stratifying should cut the rare-class imbalance.
    from sklearn.model_selection import KFold

    presence = _synthetic_presence()
    rare = presence[:, 6]

    def spread(folds: np.ndarray) -> int:
        counts = np.bincount(folds[rare], minlength=5)
        return int(counts.max() - counts.min())

    plain = []
    for seed in range(10):
        folds = np.empty(len(presence), dtype=np.int64)
        for k, (_, held_out) in enumerate(KFold(5, shuffle=True, random_state=seed).split(presence)):
            folds[held_out] = k
        plain.append(spread(folds))
    stratified = [spread(make_folds(presence, 5, seed)) for seed in range(10)]
    assert max(stratified) <= 1
    assert np.mean(stratified) < np.mean(plain)


def test_folds_are_deterministic_by_seed() -> None:
    presence = _synthetic_presence()
    np.testing.assert_array_equal(make_folds(presence, 5, seed=1), make_folds(presence, 5, seed=1))
    assert not np.array_equal(make_folds(presence, 5, seed=1), make_folds(presence, 5, seed=2))


def test_a_class_in_fewer_images_than_folds_is_named_in_a_warning() -> None:
    presence = np.zeros((12, 3), dtype=bool)
    presence[:, 0] = True
    presence[:8, 1] = True
    presence[[3, 9], 2] = True
    with pytest.warns(UserWarning, match="class 'Battery' is in 2 training image"):
        folds = make_folds(presence, 3, seed=0, class_names=["background", "Paper", "Battery"])
    assert len(set(folds[[3, 9]].tolist())) == 2  # its two images still go to different folds


def test_make_folds_needs_an_image_per_fold() -> None:
    with pytest.raises(ValueError, match="2 images cannot fill 3 folds"):
        make_folds(np.ones((2, 3), dtype=bool), 3, seed=0)


def test_fold_class_counts_counts_images_per_fold_and_class() -> None:
    presence = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=bool)
    table = fold_class_counts(presence, np.array([0, 1, 1, 0]), ["background", "Paper", "Can"])
    expected = pd.DataFrame({"Paper": [2, 1], "Can": [0, 2]}, index=["fold0", "fold1"])
    pd.testing.assert_frame_equal(table, expected)


# ---------------------------------------------------------------------------------------------------------
# stages/split.py


def _write_dataset(tmp: Path, labels: list[list[int]]) -> tuple[Path, Path]:
    """A COCO json with 3 categories and one mask per image holding the given labels."""
    images = [
        {"id": i + 1, "file_name": f"batch_{i % 2}/{i:03d}.jpg", "height": 8, "width": 8}
        for i in range(len(labels))
    ]
    categories = [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Can"}, {"id": 3, "name": "Battery"}]
    train_json = tmp / "train.json"
    train_json.write_text(json.dumps({"images": images, "categories": categories, "annotations": []}))
    masks = tmp / "masks"
    for image, present in zip(images, labels, strict=True):
        mask = np.zeros((8, 8), np.uint8)
        for k, label in enumerate(present):
            mask[k, :] = label
        coco.write_mask(masks / coco.mask_relpath(image["file_name"]), mask)
    return train_json, masks


def _run_split(tmp: Path, train_json: Path, masks: Path) -> subprocess.CompletedProcess[str]:
    (tmp / "params.yaml").write_text("split: {n_splits: 3, seed: 7}\ntrain: {folds: [0, 1, 2]}\n")
    args = [
        sys.executable,
        str(ROOT / "stages/split.py"),
        "--masks",
        str(masks),
        "--train-json",
        str(train_json),
    ]
    args += ["--out", str(tmp / "folds.csv"), "--counts", str(tmp / "metrics/folds.json")]
    args += ["--params", str(tmp / "params.yaml")]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_split_stage_writes_folds_and_counts(tmp_path: Path) -> None:
    labels = [[1], [1, 2], [2], [1], [1, 2], [2], [1, 3], [], [1], [2]]
    train_json, masks = _write_dataset(tmp_path, labels)
    result = _run_split(tmp_path, train_json, masks)
    assert result.returncode == 0, result.stderr

    folds = pd.read_csv(tmp_path / "folds.csv")
    assert list(folds.columns) == ["image_id", "fold"]
    assert folds["image_id"].tolist() == [f"batch_{i % 2}/{i:03d}.jpg" for i in range(len(labels))]
    assert set(folds["fold"]) == {0, 1, 2}

    counts = json.loads((tmp_path / "metrics/folds.json").read_text())
    assert list(counts) == ["fold0", "fold1", "fold2"]
    assert all(list(row) == ["Paper", "Can", "Battery"] for row in counts.values())
    for name, label in [("Paper", 1), ("Can", 2), ("Battery", 3)]:
        assert sum(row[name] for row in counts.values()) == sum(label in present for present in labels)
        for fold, row in counts.items():
            in_fold = folds["fold"] == int(fold.removeprefix("fold"))
            assert row[name] == sum(label in labels[i] for i in np.flatnonzero(in_fold))
    assert "WARNING: class 'Battery' is in 1 training image" in result.stderr
    assert "Paper" in result.stdout and "fold2" in result.stdout


def test_split_stage_reports_a_stale_mask_in_one_line(tmp_path: Path) -> None:
    train_json, masks = _write_dataset(tmp_path, [[1], [2], [7], [1]])  # label 7: no such class
    result = _run_split(tmp_path, train_json, masks)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {masks / 'batch_0/002.png'}: holds label 7, but {train_json} has 3 classes"
    )
    assert not (tmp_path / "folds.csv").exists()
