"""Tests for pipeline.data.folds (stratified folds, folds.csv) and the `split` stage script."""

from __future__ import annotations

import json
import re
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_params

from pipeline.data.folds import fold_class_counts, held_out_mask, make_folds, read_folds
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_presence(n_images: int = 400, seed: int = 0) -> np.ndarray:
    """Multi-label presence with common and rare classes, correlated like real photos (bool N x 7)."""
    rng = np.random.default_rng(seed)
    rates = [0.6, 0.35, 0.2, 0.1, 0.05, 0.025]
    foreground = rng.random((n_images, len(rates))) < rates
    foreground[:, 4] |= foreground[:, 5] & (rng.random(n_images) < 0.5)  # rare classes co-occur
    return np.column_stack([np.ones(n_images, dtype=bool), foreground])


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


def _write_folds(path: Path, folds: dict[str, int]) -> None:
    pd.DataFrame({"image_id": list(folds), "fold": list(folds.values())}).to_csv(path, index=False)


FOLDS = {"a/0.jpg": 0, "a/1.jpg": 0, "b/2.jpg": 1, "b/3.jpg": 1, "b/4.jpg": 2}


def test_read_folds_must_list_exactly_the_manifest_s_images(tmp_path: Path) -> None:
    _write_folds(tmp_path / "f.csv", FOLDS)
    assert read_folds(tmp_path / "f.csv", list(FOLDS), "data/manifest.json") == FOLDS
    _write_folds(tmp_path / "f.csv", {"a/0.jpg": 0, "z.jpg": 1})
    with pytest.raises(UserError, match=r"f\.csv: does not match data/manifest\.json \(e\.g\. 'z\.jpg'\)"):
        read_folds(tmp_path / "f.csv", list(FOLDS), "data/manifest.json")
    _write_folds(tmp_path / "f.csv", {name: 0 for name in list(FOLDS)[:-1]})  # one image missing
    with pytest.raises(UserError, match=r"does not match m\.json \(e\.g\. 'b/4\.jpg'\)"):
        read_folds(tmp_path / "f.csv", list(FOLDS), "m.json")


def test_read_folds_keeps_image_ids_pandas_would_read_as_missing(tmp_path: Path) -> None:
    folds = {"NA": 0, "null": 1, "nan": 0}
    _write_folds(tmp_path / "f.csv", folds)
    assert read_folds(tmp_path / "f.csv", list(folds), "m.json") == folds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a readable CSV"),
        ("image,fold\na/0.jpg,0\n", "expected columns image_id,fold"),
        ("image_id,fold\na/0.jpg,zero\n", "column 'fold' must hold integers"),
        ("image_id,fold\na/0.jpg,0\na/0.jpg,1\n", "image_id 'a/0.jpg' is listed twice"),
    ],
)
def test_read_folds_refuses_a_malformed_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "f.csv").write_text(text)
    with pytest.raises(UserError, match=rf"f\.csv: {message}"):
        read_folds(tmp_path / "f.csv", ["a/0.jpg"], "m.json")
    with pytest.raises(UserError, match=r"folds file not found \(run the split stage\)"):
        read_folds(tmp_path / "missing.csv", ["a/0.jpg"], "m.json")


# ---------------------------------------------------------------------------------------------------------
# stages/split.py

CLASSES = ["background", "Paper", "Can", "Battery"]


def _write_manifest(tmp: Path, labels: list[list[int]]) -> Path:
    """The masks stage's manifest of one 8x8 image per entry of `labels`: background and those classes."""
    images = [ImageRecord(i + 1, f"batch_{i % 2}/{i:03d}.jpg", 8, 8) for i in range(len(labels))]
    presence = np.zeros((len(labels), len(CLASSES)), dtype=bool)
    presence[:, 0] = True
    for row, present in enumerate(labels):
        presence[row, present] = True
    path = tmp / "data/manifest.json"
    write_manifest(path, Manifest(CLASSES, [1, 2, 3], images, presence, [], {"used": 0}))
    return path


def _run_split(
    tmp: Path, manifest: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run stages/split.py as its command line would, in this process: (exit code, stdout, stderr)."""
    write_params(tmp / "params.yaml", {"split": {"n_splits": 3, "seed": 7}, "ensemble": {"folds": [0, 1, 2]}})
    args = ["--manifest", str(manifest), "--out", str(tmp / "folds.csv")]
    args += ["--counts", str(tmp / "reports/folds.json"), "--params", str(tmp / "params.yaml")]
    monkeypatch.setattr(sys, "argv", ["split.py", *args])
    try:
        runpy.run_path(str(ROOT / "stages/split.py"), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_split_stage_writes_folds_and_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = [[1], [1, 2], [2], [1], [1, 2], [2], [1, 3], [], [1], [2]]
    code, out, err = _run_split(tmp_path, _write_manifest(tmp_path, labels), monkeypatch, capsys)
    assert code == 0, err

    folds = pd.read_csv(tmp_path / "folds.csv")
    assert list(folds.columns) == ["image_id", "fold"]
    assert folds["image_id"].tolist() == [f"batch_{i % 2}/{i:03d}.jpg" for i in range(len(labels))]
    assert set(folds["fold"]) == {0, 1, 2}

    counts = json.loads((tmp_path / "reports/folds.json").read_text())
    assert list(counts) == ["fold0", "fold1", "fold2"]
    assert all(list(row) == ["Paper", "Can", "Battery"] for row in counts.values())
    for name, label in [("Paper", 1), ("Can", 2), ("Battery", 3)]:
        assert sum(row[name] for row in counts.values()) == sum(label in present for present in labels)
        for fold, row in counts.items():
            in_fold = folds["fold"] == int(fold.removeprefix("fold"))
            assert row[name] == sum(label in labels[i] for i in np.flatnonzero(in_fold))
    assert "WARNING: class 'Battery' is in 1 training image" in err
    assert "Paper" in out and "fold2" in out


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("not json", "not a trashseg manifest .*re-run the masks stage"),
        (None, "manifest not found \\(run the masks stage\\)"),
        ([[1], [2]], "2 training images, fewer than split.n_splits=3"),
    ],
    ids=["malformed", "missing", "too-few-images"],
)
def test_split_stage_reports_a_bad_manifest_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    manifest: object,
    message: str,
) -> None:
    path = tmp_path / "data/manifest.json"
    if isinstance(manifest, str):
        path.parent.mkdir(parents=True)
        path.write_text(manifest)
    elif manifest is not None:
        _write_manifest(tmp_path, manifest)
    code, _, err = _run_split(tmp_path, path, monkeypatch, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: {re.escape(str(path))}: {message}", last), last
    assert not (tmp_path / "folds.csv").exists()


def test_held_out_mask_marks_the_fold_s_images_in_order() -> None:
    fold_of = {"a.jpg": 0, "b.jpg": 1, "c.jpg": 0}
    assert held_out_mask(["a.jpg", "b.jpg", "c.jpg"], fold_of, 0).tolist() == [True, False, True]
    assert held_out_mask(["c.jpg", "b.jpg"], fold_of, 1).tolist() == [False, True]
    assert held_out_mask([], fold_of, 0).shape == (0,)
