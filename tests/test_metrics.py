"""Confusion matrix and IoU: hand-computed cases, sklearn cross-checks, the torch path against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics
import torch

from pipeline import metrics


def test_confusion_matrix_by_hand() -> None:
    truth = np.array([[0, 0, 1], [2, 2, 1]])
    pred = np.array([[0, 1, 1], [2, 0, 1]])
    expected = np.array(
        [
            [1, 1, 0],  # truth 0: one right, one called 1
            [0, 2, 0],  # truth 1: both right
            [1, 0, 1],  # truth 2: one called 0, one right
        ]
    )
    cm = metrics.confusion_matrix(truth, pred, 3)
    assert cm.dtype == np.int64
    assert np.array_equal(cm, expected)


@pytest.mark.parametrize("seed", range(3))
def test_confusion_matrix_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 7
    truth = rng.integers(0, n, size=(3, 17, 13))
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, n, size=truth.shape))
    expected = sklearn.metrics.confusion_matrix(truth.ravel(), pred.ravel(), labels=np.arange(n))
    assert np.array_equal(metrics.confusion_matrix(truth, pred, n), expected)


def test_uint8_labels_do_not_overflow() -> None:
    # 20 classes: the flat index n*truth+pred reaches 399, beyond uint8.
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 20, size=(64, 64)).astype(np.uint8)
    pred = rng.integers(0, 20, size=(64, 64)).astype(np.uint8)
    expected = sklearn.metrics.confusion_matrix(truth.ravel(), pred.ravel(), labels=np.arange(20))
    assert np.array_equal(metrics.confusion_matrix(truth, pred, 20), expected)


def test_ignore_index_drops_those_truth_pixels() -> None:
    truth = np.array([0, 1, 255, 1, 255], dtype=np.uint8)
    pred = np.array([0, 0, 1, 1, 0], dtype=np.uint8)
    cm = metrics.confusion_matrix(truth, pred, 2, ignore_index=255)
    assert np.array_equal(cm, [[1, 0], [1, 1]])
    assert cm.sum() == 3


def test_ignore_index_inside_the_class_range() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, size=200)
    pred = rng.integers(0, 4, size=200)
    cm = metrics.confusion_matrix(truth, pred, 4, ignore_index=0)
    keep = truth != 0
    expected = sklearn.metrics.confusion_matrix(truth[keep], pred[keep], labels=np.arange(4))
    assert np.array_equal(cm, expected)
    assert cm[0].sum() == 0


@pytest.mark.parametrize(
    ("truth", "pred", "message"),
    [
        ([0, 3], [0, 1], "truth holds class 3, outside \\[0, 3\\)"),
        ([0, 1], [0, -1], "prediction holds class -1"),
        ([0, 1], [0, 1, 1], "shape"),
        ([0.0, 1.0], [0, 1], "integer class indexes"),
    ],
)
def test_confusion_matrix_rejects(truth: list, pred: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.confusion_matrix(np.array(truth), np.array(pred), 3)


def test_iou_by_hand() -> None:
    cm = np.array([[3, 1], [0, 2]])  # class 0: TP 3, FN 1, FP 0; class 1: TP 2, FN 0, FP 1
    assert metrics.iou_per_class(cm) == pytest.approx([3 / 4, 2 / 3])
    assert metrics.mean_iou(cm) == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_absent_class_is_nan_and_skipped() -> None:
    cm = np.array([[5, 0, 1], [0, 0, 0], [1, 0, 3]])  # class 1 in neither truth nor prediction
    iou = metrics.iou_per_class(cm)
    assert math.isnan(iou[1])
    assert iou[[0, 2]] == pytest.approx([5 / 7, 3 / 5])
    assert metrics.mean_iou(cm) == pytest.approx((5 / 7 + 3 / 5) / 2)


def test_class_only_predicted_scores_zero_not_nan() -> None:
    cm = np.array([[4, 2], [0, 0]])  # class 1 never true, predicted twice: a false positive, IoU 0
    assert metrics.iou_per_class(cm).tolist() == [4 / 6, 0.0]


def test_empty_matrix_has_nan_mean() -> None:
    assert math.isnan(metrics.mean_iou(np.zeros((3, 3), dtype=np.int64)))


def test_iou_matches_sklearn_jaccard() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 5, size=500)
    pred = np.where(rng.random(500) < 0.5, truth, rng.integers(0, 5, size=500))
    expected = sklearn.metrics.jaccard_score(truth, pred, labels=np.arange(5), average=None)
    assert metrics.iou_per_class(metrics.confusion_matrix(truth, pred, 5)) == pytest.approx(expected)


def test_dataset_iou_sums_matrices_not_per_image_scores() -> None:
    # Image A: a big object found perfectly. Image B: a 1-pixel object missed entirely.
    truth_a, pred_a = np.array([1] * 99 + [0]), np.array([1] * 99 + [0])
    truth_b, pred_b = np.array([1] + [0] * 99), np.array([0] * 100)
    cm = metrics.confusion_matrix(truth_a, pred_a, 2) + metrics.confusion_matrix(truth_b, pred_b, 2)
    # Class 1 over the dataset: TP 99, FN 1 -> 0.99 (a per-image mean would say (1.0 + 0.0) / 2).
    assert metrics.iou_per_class(cm)[1] == pytest.approx(99 / 100)


def test_iou_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        metrics.iou_per_class(np.zeros((2, 3)))


@pytest.mark.parametrize("ignore_index", [None, 255, 2])
def test_torch_path_equals_numpy_path(ignore_index: int | None) -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 6, size=(2, 16, 16)).astype(np.uint8)
    truth[0, :3] = 255 if ignore_index == 255 else truth[0, :3]
    pred = rng.integers(0, 6, size=(2, 16, 16)).astype(np.uint8)
    expected = metrics.confusion_matrix(truth, pred, 6, ignore_index=ignore_index)
    got = metrics.confusion_matrix_torch(torch.from_numpy(truth), torch.from_numpy(pred), 6, ignore_index)
    assert got.dtype == torch.int64
    assert np.array_equal(got.numpy(), expected)


def test_torch_path_accepts_int64_argmax() -> None:
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = logits.argmax(1)
    truth = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    expected = metrics.confusion_matrix(truth.numpy(), pred.numpy(), 4)
    assert np.array_equal(metrics.confusion_matrix_torch(truth, pred, 4).numpy(), expected)


def test_torch_path_rejects() -> None:
    with pytest.raises(ValueError, match="prediction holds class 4"):
        metrics.confusion_matrix_torch(torch.tensor([0, 1]), torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="integer class indexes"):
        metrics.confusion_matrix_torch(torch.tensor([0.0]), torch.tensor([0]), 4)


# --- the two averages -------------------------------------------------------------------------------------

# Three 2x2 images of classes 0..2, by hand:
#   1: perfect, classes 0 and 1                                           -> mIoU 1
#   2: half wrong: class 0 TP 1, FP 1, FN 1 -> 1/3; class 1 the same      -> mIoU 1/3
#   3: truth all 0, one pixel predicted 2 (a false-positive class):
#      class 0 TP 3, FN 1 -> 3/4; class 2 TP 0, FP 1 -> 0                  -> mIoU 3/8
# image average: (1 + 1/3 + 3/8) / 3 = 41/72.
# dataset (summed): class 0 TP 6, FP 1, FN 2 -> 6/9; class 1 TP 3, FP 1, FN 1 -> 3/5; class 2 -> 0:
#   (2/3 + 3/5 + 0) / 3 = 19/45.
HAND_TRUTH = np.array([[[0, 0], [1, 1]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]])
HAND_PRED = np.array([[[0, 0], [1, 1]], [[0, 1], [1, 0]], [[0, 0], [0, 2]]])


def _hand_cms() -> np.ndarray:
    return np.stack([metrics.confusion_matrix(t, p, 3) for t, p in zip(HAND_TRUTH, HAND_PRED, strict=True)])


def test_image_average_by_hand_differs_from_the_dataset_average() -> None:
    cms = _hand_cms()
    assert metrics.image_mious(cms) == pytest.approx([1, 1 / 3, 3 / 8])
    assert metrics.score(cms, "image") == pytest.approx(41 / 72)
    assert metrics.score(cms, "dataset") == pytest.approx(19 / 45)
    assert metrics.score(cms, "dataset") == pytest.approx(metrics.mean_iou(cms.sum(axis=0)))
    # Per class, by image: class 0 in all three (1, 1/3, 3/4), class 1 in images 1 and 2, class 2 in 3.
    assert metrics.class_ious(cms, "image") == pytest.approx([25 / 36, 2 / 3, 0.0])
    assert metrics.class_ious(cms, "dataset") == pytest.approx([2 / 3, 3 / 5, 0.0])
    iou = metrics.image_ious(cms)
    assert np.isnan(iou[0, 2]) and np.isnan(iou[1, 2]) and np.isnan(iou[2, 1])  # neither truth nor pred
    assert iou[2, [0, 2]] == pytest.approx([3 / 4, 0.0])


def _random_images(seed: int, n_images: int = 6, n_classes: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """(truth, pred) pairs of varied sizes, each image drawing from its own few classes (so many absent)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_images):
        shape = tuple(rng.integers(3, 12, size=2))
        classes = rng.choice(n_classes, size=rng.integers(1, 4), replace=False)
        truth = rng.choice(classes, size=shape)
        wrong = rng.choice(n_classes, size=shape)
        pairs.append((truth, np.where(rng.random(shape) < 0.7, truth, wrong)))
    return pairs


@pytest.mark.parametrize("seed", range(4))
def test_averages_match_sklearn_jaccard(seed: int) -> None:
    pairs = _random_images(seed)
    cms = np.stack([metrics.confusion_matrix(t, p, 5) for t, p in pairs])
    # dataset: one jaccard over every pixel, classes present anywhere.
    truth = np.concatenate([t.ravel() for t, _ in pairs])
    pred = np.concatenate([p.ravel() for _, p in pairs])
    present = np.union1d(truth, pred)
    dataset = sklearn.metrics.jaccard_score(truth, pred, labels=present, average=None)
    assert metrics.score(cms, "dataset") == pytest.approx(dataset.mean())
    assert metrics.class_ious(cms, "dataset")[present] == pytest.approx(dataset)
    # image: one jaccard per image over the classes in its truth or prediction, then the mean.
    per_image, per_class = [], [[] for _ in range(5)]
    for t, p in pairs:
        labels = np.union1d(t, p)
        iou = sklearn.metrics.jaccard_score(t.ravel(), p.ravel(), labels=labels, average=None)
        per_image.append(iou.mean())
        for label, value in zip(labels, iou, strict=True):
            per_class[label].append(value)
    assert metrics.image_mious(cms) == pytest.approx(per_image)
    assert metrics.score(cms, "image") == pytest.approx(np.mean(per_image))
    expected = [np.mean(values) if values else np.nan for values in per_class]
    assert metrics.class_ious(cms, "image") == pytest.approx(expected, nan_ok=True)


def test_score_rejects_an_unknown_average_and_scores_no_images_nan() -> None:
    with pytest.raises(ValueError, match="unknown average 'pixel'"):
        metrics.score(_hand_cms(), "pixel")  # type: ignore[arg-type]
    empty = np.zeros((0, 3, 3), np.int64)
    assert math.isnan(metrics.score(empty, "image")) and math.isnan(metrics.score(empty, "dataset"))
