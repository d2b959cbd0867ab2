"""Tests for pipeline.evaluation.evaluate and the evaluate / leaderboard stages, checked against sklearn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import run_stage, write_params
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from pipeline import metrics
from pipeline.data import coco
from pipeline.data.images import mask_relpath, write_mask
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import (
    PALETTE,
    ImageScore,
    confusion_rows,
    cv_summary,
    evaluate_oof,
    oof_path,
    quantise_rows,
    worst_images,
    write_confusion_csv,
    write_worst_overlays,
)
from pipeline.evaluation.submission import SubmissionWriter

# pycocotools 2.0.x's decoder trips numpy 2's copy-keyword deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "can", "bottle"]
FOLDS = {"a/0.jpg": 0, "a/1.jpg": 0, "b/2.jpg": 1, "b/3.jpg": 1, "b/4.jpg": 2}  # fold 2 is not trained
NATIVE, SIZE = 8, 4


def _truth_and_oof(
    tmp_path: Path, seed: int = 0, pred_size: int = SIZE
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 8x8 truth masks and `pred_size` square OOF predictions on disk; -> {image_id: (truth, pred)}."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for image_id, fold in FOLDS.items():
        truth = rng.integers(0, 3, (NATIVE, NATIVE), dtype=np.uint8)
        pred = rng.integers(0, 3, (pred_size, pred_size), dtype=np.uint8)
        write_mask(tmp_path / "masks" / mask_relpath(image_id), truth)
        write_mask(oof_path(tmp_path / "oof", image_id, fold), pred)
        pairs[image_id] = (truth, pred)
    return pairs


def _sk_miou(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean IoU over classes present in truth or prediction, by sklearn."""
    present = sorted(set(truth.ravel()) | set(pred.ravel()))
    return float(np.mean(jaccard_score(truth.ravel(), pred.ravel(), labels=present, average=None)))


def test_oof_metrics_match_sklearn(tmp_path: Path) -> None:
    pairs = _truth_and_oof(tmp_path)
    result = evaluate_oof(tmp_path / "oof", tmp_path / "masks", FOLDS, 3, trained_folds=[0, 1], size=SIZE)
    summary = cv_summary(result, CLASSES, "dataset")
    assert summary["average"] == "dataset"

    # cv2's nearest downscale by 2 samples every other pixel starting at 0
    small = {k: (truth[::2, ::2], pred) for k, (truth, pred) in pairs.items() if FOLDS[k] != 2}
    all_truth = np.concatenate([t.ravel() for t, _ in small.values()])
    all_pred = np.concatenate([p.ravel() for _, p in small.values()])
    np.testing.assert_array_equal(result.confusion, sk_confusion(all_truth, all_pred, labels=[0, 1, 2]))
    sk_iou = jaccard_score(all_truth, all_pred, labels=[0, 1, 2], average=None)
    assert summary["iou"] == pytest.approx(dict(zip(CLASSES, sk_iou, strict=True)))
    assert summary["oof_miou"] == pytest.approx(np.mean(sk_iou))

    fold_miou = []
    for fold in (0, 1):
        ids = [k for k in small if FOLDS[k] == fold]
        t = np.concatenate([small[k][0].ravel() for k in ids])
        p = np.concatenate([small[k][1].ravel() for k in ids])
        fold_miou.append(_sk_miou(t, p))
    assert summary["folds"] == pytest.approx({"0": fold_miou[0], "1": fold_miou[1]})
    assert summary["fold_miou_mean"] == pytest.approx(np.mean(fold_miou))
    assert summary["fold_miou_std"] == pytest.approx(np.std(fold_miou))
    assert (summary["n_images"], summary["n_skipped"]) == (4, 1)
    assert {s.image_id: s.miou for s in result.scores} == pytest.approx(
        {k: _sk_miou(t, p) for k, (t, p) in small.items()}
    )


def test_oof_metrics_by_the_image_average_match_sklearn_image_by_image(tmp_path: Path) -> None:
    pairs = _truth_and_oof(tmp_path, seed=3)
    result = evaluate_oof(tmp_path / "oof", tmp_path / "masks", FOLDS, 3, trained_folds=[0, 1], size=SIZE)
    summary = cv_summary(result, CLASSES, "image")
    assert result.image_confusion.shape == (4, 3, 3) and result.image_confusion.dtype == np.int64
    small = {k: (truth[::2, ::2], pred) for k, (truth, pred) in pairs.items() if FOLDS[k] != 2}
    for cm, (truth, pred) in zip(result.image_confusion, small.values(), strict=True):
        np.testing.assert_array_equal(cm, sk_confusion(truth.ravel(), pred.ravel(), labels=[0, 1, 2]))
    per_image = {k: _sk_miou(t, p) for k, (t, p) in small.items()}
    assert summary["average"] == "image"
    assert summary["oof_miou"] == pytest.approx(np.mean(list(per_image.values())))
    assert summary["oof_miou"] == pytest.approx(metrics.score(result.image_confusion, "image"))
    folds = {str(f): np.mean([v for k, v in per_image.items() if FOLDS[k] == f]) for f in (0, 1)}
    assert summary["folds"] == pytest.approx(folds)
    # Each class averaged over the images whose truth or prediction holds it.
    for c, name in enumerate(CLASSES):
        held = [(t, p) for t, p in small.values() if c in t or c in p]
        expected = np.mean(
            [jaccard_score(t.ravel(), p.ravel(), labels=[c], average=None)[0] for t, p in held]
        )
        assert summary["iou"][name] == pytest.approx(expected)
    assert summary["oof_miou"] != pytest.approx(cv_summary(result, CLASSES, "dataset")["oof_miou"])


def test_native_size_predictions(tmp_path: Path) -> None:
    truth = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)  # non-square, compared as is
    pred = np.array([[0, 1, 0], [2, 1, 0]], np.uint8)
    write_mask(tmp_path / "masks/x.png", truth)
    write_mask(oof_path(tmp_path / "oof", "x.jpg", 0), pred)
    result = evaluate_oof(tmp_path / "oof", tmp_path / "masks", {"x.jpg": 0}, 3, [0], size=None)
    np.testing.assert_array_equal(
        result.confusion, sk_confusion(truth.ravel(), pred.ravel(), labels=[0, 1, 2])
    )


def test_missing_or_wrong_sized_predictions_are_user_errors(tmp_path: Path) -> None:
    _truth_and_oof(tmp_path)
    with pytest.raises(UserError, match="prediction is 4x4, expected 8x8"):
        evaluate_oof(tmp_path / "oof", tmp_path / "masks", FOLDS, 3, [0, 1], size=None)
    oof_path(tmp_path / "oof", "b/3.jpg", 1).unlink()
    with pytest.raises(UserError, match=r"fold1/b/3\.png: out-of-fold prediction not found"):
        evaluate_oof(tmp_path / "oof", tmp_path / "masks", FOLDS, 3, [0, 1], size=SIZE)


def test_quantised_rows_keep_each_row_s_proportions() -> None:
    cm = np.array([[5, 3, 2], [0, 0, 0], [1, 1, 1], [10**6, 7, 1]])
    counts = quantise_rows(cm, 10)
    np.testing.assert_array_equal(counts[:3], [[5, 3, 2], [0, 0, 0], [4, 3, 3]])
    assert counts[3].sum() == 10
    big = np.random.default_rng(0).integers(0, 10**6, (11, 11)) * (
        np.random.default_rng(1).random((11, 11)) < 0.5
    )
    counts = quantise_rows(big, 1000)
    rows = big.sum(1) > 0
    assert (counts[rows].sum(1) == 1000).all()
    assert np.abs(counts[rows] / 1000 - big[rows] / big[rows].sum(1, keepdims=True)).max() <= 1e-3


def test_confusion_csv_is_compact_and_reproduces_the_normalised_matrix(tmp_path: Path) -> None:
    classes = [f"class_{k}" for k in range(11)]
    cm = np.random.default_rng(0).integers(0, 5 * 10**6, (11, 11))  # ~10^8 pixels: never one row each
    cm[4] = 0  # a class absent from the truth gets no rows
    path = tmp_path / "plots/confusion.csv"
    write_confusion_csv(path, cm, classes)
    assert path.stat().st_size < 1_000_000
    table = pd.read_csv(path)
    assert list(table.columns) == ["actual", "predicted"]
    drawn = pd.crosstab(table["actual"], table["predicted"]).reindex(
        index=classes, columns=classes, fill_value=0
    )
    normalised = drawn.to_numpy() / np.maximum(drawn.to_numpy().sum(1, keepdims=True), 1)
    expected = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    assert np.abs(normalised - expected).max() <= 1e-3
    assert "class_4" not in set(table["actual"])
    assert len(confusion_rows(cm, classes, 10)) == 10 * 10


def test_worst_images_are_ordered_worst_first_with_unscored_last() -> None:
    scores = [
        ImageScore("b", 0, 0.5),
        ImageScore("a", 1, 0.5),
        ImageScore("c", 0, math.nan),
        ImageScore("d", 0, 0.1),
    ]
    assert [s.image_id for s in worst_images(scores, 3)] == ["d", "a", "b"]
    assert [s.image_id for s in worst_images(scores, 10)][-1] == "c"


def test_worst_overlays_are_drawn(tmp_path: Path) -> None:
    pairs = _truth_and_oof(tmp_path)
    for image_id in FOLDS:
        (tmp_path / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (NATIVE, NATIVE), (128, 128, 128)).save(
            tmp_path / "images" / image_id, format="JPEG"
        )
    out = tmp_path / "plots/worst"
    out.mkdir(parents=True)
    (out / "99_stale.png").write_bytes(b"from an earlier run")
    result = evaluate_oof(tmp_path / "oof", tmp_path / "masks", FOLDS, 3, [0, 1], size=SIZE)
    worst = worst_images(result.scores, 2)
    paths = write_worst_overlays(
        out, worst, tmp_path / "images", tmp_path / "oof", tmp_path / "masks", CLASSES, SIZE
    )

    assert [p.name for p in paths] == [f"0{k}_{Path(s.image_id).stem}.png" for k, s in enumerate(worst, 1)]
    assert sorted(out.iterdir()) == sorted(paths)  # the stale overlay is gone
    with Image.open(paths[0]) as img:
        overlay = np.asarray(img.convert("RGB")).astype(int)
    panel, gap, top = 256, 4, 32  # 4x4 masks enlarged to 256 px panels; two 16 px text lines above
    assert overlay.shape[1] == 3 * panel + 2 * gap
    truth = pairs[worst[0].image_id][0][::2, ::2]
    y, x = (64 * v + 32 for v in np.argwhere(truth == 1)[0])  # the middle of a class-1 pixel's block
    tinted = np.round(128 * 0.4 + PALETTE[1] * 0.6)
    assert np.abs(overlay[top + y, panel + gap + x] - tinted).max() <= 3  # truth panel, class 1 colour
    assert np.abs(overlay[top + y, x] - 128).max() <= 3  # the photo panel is untouched


def _write_coco(path: Path, images: list[tuple[str, int, int]], squares: dict[str, list]) -> None:
    """A COCO json with square polygons: squares[file_name] = [(category_id, x0, y0, side), ...]."""
    anns = []
    for image_id, (name, _, _) in enumerate(images):
        for cat, x0, y0, side in squares.get(name, []):
            x1, y1 = x0 + side, y0 + side
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": [poly]}
            )
    data = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, (n, h, w) in enumerate(images)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "can"}, {"id": 2, "name": "bottle"}],
    }
    path.write_text(json.dumps(data))


def _write_folds(path: Path, folds: dict[str, int]) -> None:
    pd.DataFrame({"image_id": list(folds), "fold": list(folds.values())}).to_csv(path, index=False)


def _evaluate_project(tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """The ensemble stage's outputs as evaluate reads them: native-size labels of folds 0 and 1 under
    ensemble/oof, its report (CV mIoU by sklearn), the manifest, masks, folds.csv and images.
    Returns (report, evaluate's arguments)."""
    pairs = _truth_and_oof(tmp_path, pred_size=NATIVE)
    for image_id, fold in FOLDS.items():
        write_mask(oof_path(tmp_path / "ensemble/oof", image_id, fold), pairs[image_id][1])
        (tmp_path / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (NATIVE, NATIVE)).save(tmp_path / "images" / image_id, format="JPEG")
    records = [coco.ImageRecord(i, name, NATIVE, NATIVE) for i, name in enumerate(FOLDS)]
    presence = np.ones((len(records), 3), dtype=bool)
    write_manifest(tmp_path / "manifest.json", Manifest(CLASSES, [1, 2], records, presence, [], {"used": 0}))
    _write_folds(tmp_path / "folds.csv", FOLDS)
    write_params(tmp_path / "params.yaml", {"metric": {"average": "dataset"}})
    scored = [k for k in FOLDS if FOLDS[k] != 2]  # fold 2 is not in the ensemble's folds
    truth = np.concatenate([pairs[k][0].ravel() for k in scored])
    pred = np.concatenate([pairs[k][1].ravel() for k in scored])
    miou = float(np.mean(jaccard_score(truth, pred, labels=[0, 1, 2], average=None)))
    report = {
        "ensemble": {"oof_miou": miou, "folds": {"0": 0.5, "1": 0.5}},
        "models": {"unet": {"oof_miou": 0.25}, "fpn": {"oof_miou": 0.3}},
        "weights": {"unet": 0.4, "fpn": 0.6},
        "steps": {"members": {"oof_miou": 0.3}, "weights": {"oof_miou": miou, "in_sample_miou": miou + 0.1}},
        "decision": {"class_scales": None, "postprocess": {}},
    }
    (tmp_path / "ensemble/report.json").write_text(json.dumps(report))
    flags = {
        "--labels": "ensemble/oof", "--report": "ensemble/report.json", "--manifest": "manifest.json",
        "--masks": "masks", "--folds": "folds.csv", "--root": "images", "--metrics": "metrics/cv.json",
        "--details": "reports/cv.json", "--confusion": "plots/confusion.csv", "--worst": "plots/worst",
        "--n-worst": "3",
    }  # fmt: skip
    return report, [part for flag in flags.items() for part in flag]


def test_evaluate_stage_writes_metrics_plot_and_overlays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report, args = _evaluate_project(tmp_path)
    run_stage("evaluate.py", args, tmp_path, monkeypatch)
    details = json.loads((tmp_path / "reports/cv.json").read_text())
    assert (details["n_images"], details["n_skipped"], set(details["folds"])) == (4, 1, {"0", "1"})
    assert set(details["iou"]) == set(CLASSES)
    assert details["oof_miou"] == pytest.approx(report["ensemble"]["oof_miou"])
    assert (details["models"], details["weights"]) == (report["models"], report["weights"])
    # The headline: the ensemble's OOF mIoU, each decision step's and each model's.
    cv = json.loads((tmp_path / "metrics/cv.json").read_text())
    assert cv == {
        "oof_miou": pytest.approx(report["ensemble"]["oof_miou"]),
        "steps": {"weights": pytest.approx(report["ensemble"]["oof_miou"])},
        "models": {"unet": {"oof_miou": 0.25}, "fpn": {"oof_miou": 0.3}},
    }
    assert len(pd.read_csv(tmp_path / "plots/confusion.csv")) == 3 * 1000
    assert len(list((tmp_path / "plots/worst").glob("*.png"))) == 3

    oof_path(tmp_path / "ensemble/oof", "a/1.jpg", 0).unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_stage("evaluate.py", args, tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ensemble/oof/fold0/a/1.png: ")


def test_evaluate_stage_refuses_labels_that_disagree_with_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    report, args = _evaluate_project(tmp_path)
    report["ensemble"]["oof_miou"] += 0.01  # labels from another run than the report
    (tmp_path / "ensemble/report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_info:
        run_stage("evaluate.py", args, tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ensemble/oof: scores ") and "ensemble/report.json" in last
    assert not (tmp_path / "metrics/cv.json").exists()


def test_evaluate_stage_keeps_per_class_weights_out_of_the_headline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, args = _evaluate_project(tmp_path)
    per_class = {
        "unet": dict(zip(CLASSES, [1.0, 0.0, 0.5], strict=True)),
        "fpn": dict(zip(CLASSES, [0.0, 1.0, 0.5], strict=True)),
    }
    report["weights"] = per_class
    (tmp_path / "ensemble/report.json").write_text(json.dumps(report))
    run_stage("evaluate.py", args, tmp_path, monkeypatch)
    assert "weights" not in json.loads((tmp_path / "metrics/cv.json").read_text())
    assert json.loads((tmp_path / "reports/cv.json").read_text())["weights"] == per_class


def test_leaderboard_stage_scores_a_perfect_submission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squares = {"t/0.jpg": [(1, 2, 2, 6), (2, 10, 4, 5)], "t/1.jpg": [(2, 0, 0, 8)]}
    _write_coco(tmp_path / "truth.json", [("t/0.jpg", 16, 16), ("t/1.jpg", 16, 16)], squares)
    truth = coco.load_coco(tmp_path / "truth.json")
    with SubmissionWriter(tmp_path / "sub.csv", "rle", 3, "column") as writer:
        for image in truth.images:
            writer.write(image.file_name, coco.rasterize(truth, image))
    write_params(tmp_path / "params.yaml", {"submission": {"size": None, "format": "rle"}})
    args = ["--submission", "sub.csv", "--truth", "truth.json", "--out", "lb.json", "--report", "r.json"]
    run_stage("leaderboard.py", args, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "lb.json").read_text()) == {"miou": 1.0}  # the headline only
    board = json.loads((tmp_path / "r.json").read_text())
    assert board == {"miou": 1.0, "iou": {"background": 1.0, "can": 1.0, "bottle": 1.0}, "average": "dataset"}


def test_leaderboard_stage_scores_by_the_params_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # t/0.jpg: a can found, a bottle missed (called background); t/1.jpg: background only, predicted so.
    squares = {"t/0.jpg": [(1, 0, 0, 8), (2, 8, 8, 8)]}
    _write_coco(tmp_path / "truth.json", [("t/0.jpg", 16, 16), ("t/1.jpg", 16, 16)], squares)
    truth = coco.load_coco(tmp_path / "truth.json")
    with SubmissionWriter(tmp_path / "sub.csv", "rle", 3, "column") as writer:
        for image in truth.images:
            mask = coco.rasterize(truth, image)
            writer.write(image.file_name, np.where(mask == 2, 0, mask).astype(np.uint8))
    params = {"submission": {"size": None}, "metric": {"average": "image"}}
    write_params(tmp_path / "params.yaml", params)
    args = ["--submission", "sub.csv", "--truth", "truth.json", "--out", "lb.json", "--report", "r.json"]
    run_stage("leaderboard.py", args, tmp_path, monkeypatch)
    # t/0.jpg (64 can, 64 bottle, 128 background pixels): background 128 / 192, can 1, bottle 0
    # -> (2/3 + 1 + 0) / 3; t/1.jpg: background only, 1. (The dataset average: (384/448 + 1 + 0) / 3.)
    expected = ((2 / 3 + 1 + 0) / 3 + 1) / 2
    assert json.loads((tmp_path / "lb.json").read_text()) == {"miou": pytest.approx(expected)}
    board = json.loads((tmp_path / "r.json").read_text())
    assert board["average"] == "image" and board["miou"] == pytest.approx(expected)
    assert "(image average)" in capsys.readouterr().out
    assert board["miou"] != pytest.approx((384 / 448 + 1 + 0) / 3)


@pytest.mark.parametrize("annotations", ["absent", "empty"])
def test_leaderboard_stage_without_test_truth_records_not_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], annotations: str
) -> None:
    # The real competition's test.json has no annotations (no key, or COCO exports' empty list): nothing
    # to score, and the record says so.
    _write_coco(tmp_path / "test.json", [("t/0.jpg", 16, 16)], {})
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["annotations"] == []
    if annotations == "absent":
        del test["annotations"]
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "sub.csv").write_text("image_id,class_id,EncodedPixels\n")
    write_params(tmp_path / "params.yaml", {"submission": {"size": None}})
    args = ["--submission", "sub.csv", "--truth", "test.json", "--out", "lb.json", "--report", "r.json"]
    run_stage("leaderboard.py", args, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "lb.json").read_text()) == {"miou": None}
    board = json.loads((tmp_path / "r.json").read_text())
    assert board["miou"] is None and board["scored"] is False and "test.json" in board["reason"]
    assert "not scored" in capsys.readouterr().out
