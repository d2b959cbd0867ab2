"""Tests for pipeline.ensemble, ensemble.merge and the ensemble stage, on hand-sized arrays.

Most cases are 1 x 4 images of two classes whose probabilities are chosen so that every candidate's
prediction, and so every fold's confusion matrix, can be counted by hand; sklearn cross-checks them.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_stage, write_params
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from pipeline import metrics
from pipeline.data import coco
from pipeline.data.images import mask_relpath, read_mask, write_mask
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.ensemble.fit import (
    FoldConfusions,
    ImageIous,
    best_candidate,
    candidate_tally,
    fit_ensemble,
    named_weights,
    scores,
    simplex_grid,
    write_ensemble_labels,
)
from pipeline.ensemble.merge import merge_probabilities
from pipeline.errors import UserError
from pipeline.metrics import mean_iou

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stored:
    """Stands in for `probstore.StoredProbabilities`: what the ensemble functions read of a (model, fold)."""

    path: Path
    file_names: list[str]
    arrays: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.file_names)

    def probabilities(self, index: int) -> torch.Tensor:
        return self.arrays[index]


def _two_class(p1: list[float]) -> torch.Tensor:
    """float32 (2, 1, W): P(class 1) = p1 along a 1-pixel-high row, P(class 0) = 1 - p1."""
    p = torch.tensor(p1, dtype=torch.float32)[None]
    return torch.stack([1 - p, p])


def _members(p1: dict[str, list[list[float]]]) -> list[list[Stored]]:
    """members[m][k] from p1[name][k]: one 1 x W image per fold, called f<k>.png."""
    return [
        [Stored(Path(f"{name}/fold{k}.npz"), [f"f{k}.png"], [_two_class(row)]) for k, row in enumerate(rows)]
        for name, rows in p1.items()
    ]


# ---------------------------------------------------------------------------------------------------------
# The scenario most tests share: truth [0, 0, 1, 1] in each of 3 folds. A is right on folds 0 and 2, B on
# fold 1; their 50/50 mix is right on folds 0 and 1 but not on fold 2, where A is right only weakly.

TRUTH = np.array([[0, 0, 1, 1]], np.uint8)
P1 = {
    "a": [[0.1, 0.1, 0.9, 0.9], [0.6, 0.6, 0.4, 0.4], [0.1, 0.1, 0.55, 0.55]],
    "b": [[0.6, 0.6, 0.4, 0.4], [0.1, 0.1, 0.9, 0.9], [0.1, 0.1, 0.2, 0.2]],
}
# Predictions by hand: fold -> candidate (weight of a: 1, 0.5, 0) -> labels.
BY_HAND = {
    0: {1.0: [0, 0, 1, 1], 0.5: [0, 0, 1, 1], 0.0: [1, 1, 0, 0]},
    1: {1.0: [1, 1, 0, 0], 0.5: [0, 0, 1, 1], 0.0: [0, 0, 1, 1]},
    2: {1.0: [0, 0, 1, 1], 0.5: [0, 0, 0, 0], 0.0: [0, 0, 0, 0]},
}


def _truth(_: str) -> np.ndarray:
    return TRUTH


def _sk_cm(pred: list[int]) -> np.ndarray:
    return sk_confusion(TRUTH.ravel(), pred, labels=[0, 1])


def _fold_cms(
    members: list[list[Stored]], truth: object, candidates: np.ndarray, n_classes: int
) -> np.ndarray:
    """(G, K, C, C) confusion matrices of every candidate on every fold (the dataset tally)."""
    tally = candidate_tally(members, truth, candidates, n_classes, "dataset")  # type: ignore[arg-type]
    assert isinstance(tally, FoldConfusions)
    return tally.confusion


def test_simplex_grid_rows_are_every_step_multiple_summing_to_one() -> None:
    np.testing.assert_array_equal(simplex_grid(2, 0.5), [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    for n, step in [(2, 0.1), (3, 0.1), (4, 0.25), (3, 1 / 3), (1, 0.5)]:
        grid = simplex_grid(n, step)
        n_steps = round(1 / step)
        assert grid.shape == (math.comb(n_steps + n - 1, n - 1), n)
        np.testing.assert_allclose(grid.sum(axis=1), 1.0)
        assert (grid >= 0).all()
        np.testing.assert_allclose(grid * n_steps, np.round(grid * n_steps), atol=1e-9)
        assert len({tuple(row) for row in grid}) == len(grid)
        np.testing.assert_array_equal(grid[0], np.eye(n)[0])  # member 0 alone comes first


def test_merge_probabilities_applies_one_weight_per_member_and_class() -> None:
    a = torch.tensor([[[0.2, 0.6]], [[0.8, 0.4]]])  # (2, 1, 2)
    b = torch.tensor([[[0.9, 0.3]], [[0.1, 0.7]]])
    weights = torch.tensor([[0.25, 1.0], [0.75, 0.0]])  # class 0: a 1/4, b 3/4; class 1: a alone
    merged = merge_probabilities([a, b], weights)
    expected = torch.tensor([[[0.25 * 0.2 + 0.75 * 0.9, 0.25 * 0.6 + 0.75 * 0.3]], [[0.8, 0.4]]])
    torch.testing.assert_close(merged, expected)
    assert merged.dtype == torch.float32


def test_merge_probabilities_resizes_smaller_members_to_the_largest() -> None:
    rng = torch.Generator().manual_seed(0)
    big = torch.rand((3, 4, 6), generator=rng)  # 24 pixels
    small = torch.rand((3, 6, 3), generator=rng)  # 18 pixels, another aspect ratio
    weights = torch.tensor([[0.5, 0.2, 1.0], [0.5, 0.8, 0.0]])
    resized = F.interpolate(small[None], size=(4, 6), mode="bilinear", align_corners=False)[0]
    expected = weights[0][:, None, None] * big + weights[1][:, None, None] * resized
    for probs, w in (([big, small], weights), ([small, big], weights.flip(0))):  # whichever comes first
        merged = merge_probabilities(probs, w)
        assert merged.shape == (3, 4, 6)
        torch.testing.assert_close(merged, expected)


def test_best_candidate_breaks_ties_by_order_and_never_picks_nan() -> None:
    perfect = np.array([[2, 0], [0, 2]])
    half = np.array([[2, 0], [2, 0]])  # class 0 IoU 1/2, class 1 IoU 0
    empty = np.zeros((2, 2), np.int64)  # no pixels: mIoU NaN
    # (G=4, K=2, C, C)
    cms = FoldConfusions(np.stack([[half, half], [perfect, empty], [perfect, half], [empty, perfect]]))
    # 1 and 3 pool to perfect matrices: the earlier
    assert best_candidate(cms.score(np.array([True, True]))) == 1
    assert best_candidate(cms.score(np.array([True, False]))) == 1  # 1 and 2 tie: the earlier wins
    assert best_candidate(cms.score(np.array([False, True]))) == 3  # 1 is NaN there; 3 is perfect
    nan_first = FoldConfusions(np.stack([[empty], [half]]))
    assert best_candidate(nan_first.score(np.array([True]))) == 1  # a scored 0.25 beats a NaN
    assert best_candidate(FoldConfusions(np.stack([[empty], [empty]])).score(np.array([True]))) == 0
    assert best_candidate(cms.score(np.array([False, False]))) == 0  # no folds at all: the first


def test_candidate_confusions_match_sklearn_on_every_fold() -> None:
    members = _members(P1)
    grid = simplex_grid(2, 0.5)
    candidates = np.repeat(grid[:, :, None], 2, axis=2)
    cms = _fold_cms(members, _truth, candidates, n_classes=2)
    assert cms.shape == (3, 3, 2, 2) and cms.dtype == np.int64
    for g, k in itertools.product(range(3), range(3)):
        np.testing.assert_array_equal(cms[g, k], _sk_cm(BY_HAND[k][grid[g, 0]]), err_msg=f"{g=} {k=}")


def _sk_image_iou(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU with NaN for absent classes) of one image, by sklearn over present classes."""
    present = sorted(set(truth.ravel().tolist()) | set(np.ravel(pred).tolist()))
    iou = np.full(n_classes, np.nan)
    iou[present] = jaccard_score(truth.ravel(), np.ravel(pred), labels=present, average=None)
    return float(np.nanmean(iou)), iou


def test_image_tally_matches_sklearn_image_by_image() -> None:
    grid = simplex_grid(2, 0.5)
    tally = candidate_tally(_members(P1), _truth, np.repeat(grid[:, :, None], 2, axis=2), 2, "image")
    assert isinstance(tally, ImageIous)
    np.testing.assert_array_equal(tally.fold, [0, 1, 2])  # one image per fold, in fold order
    assert tally.miou.shape == (3, 3) and tally.iou.shape == (3, 3, 2) and tally.iou.dtype == np.float32
    for g, k in itertools.product(range(3), range(3)):
        miou, iou = _sk_image_iou(TRUTH, BY_HAND[k][grid[g, 0]], 2)
        assert tally.miou[g, k] == pytest.approx(miou), f"{g=} {k=}"
        np.testing.assert_allclose(tally.iou[g, k], iou, rtol=1e-6, err_msg=f"{g=} {k=}")
    # Scores over chosen folds: the mean of the image mIoUs; a fold selection without images is NaN.
    assert tally.score(np.array([True, False, True])) == pytest.approx(
        [(1 + 1) / 2, (1 + 1 / 4) / 2, (0 + 1 / 4) / 2]
    )
    assert np.isnan(
        ImageIous(tally.fold[:1], tally.miou[:, :1], tally.iou[:, :1]).score(np.array([0, 1, 1]) > 0)
    ).all()


def test_the_fit_maximises_the_chosen_average() -> None:
    # Two images per fold (two identical folds): a big one, x (1 x 10), and a small one, y (1 x 2).
    # a is perfect on x and misses y's object; b misses two of x's object pixels and is perfect on y.
    truth = {"x": [0, 0] + [1] * 8, "y": [0, 1]}
    p1 = {
        "a": {"x": [0.1, 0.1] + [0.9] * 8, "y": [0.1, 0.1]},
        "b": {"x": [0.1] * 4 + [0.9] * 6, "y": [0.1, 0.9]},
    }
    members = [
        [
            Stored(Path(f"{m}/fold{k}.npz"), [f"{k}/x", f"{k}/y"], [_two_class(p[n]) for n in "xy"])
            for k in range(2)
        ]
        for m, p in p1.items()
    ]

    def truth_of(name: str) -> np.ndarray:
        return np.array([truth[name[-1]]], np.uint8)

    # dataset, summed over x and y: a [[3, 0], [1, 8]] -> (3/4 + 8/9) / 2 = 0.819; b [[3, 0], [2, 7]] ->
    #   (3/5 + 7/9) / 2 = 0.689: a.
    # image: a: x 1, y (1/2 + 0) / 2 = 1/4 -> 0.625; b: x [[2, 0], [2, 6]] -> (2/4 + 6/8) / 2 = 0.625,
    #   y 1 -> 0.8125: b.
    fits = {
        average: fit_ensemble(members, truth_of, 2, grid_step=1.0, per_class=False, average=average)
        for average in metrics.AVERAGES
    }
    a_alone, b_alone = [[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]
    np.testing.assert_array_equal(fits["dataset"].weights, a_alone)
    np.testing.assert_array_equal(fits["dataset"].fold_weights, [a_alone, a_alone])
    np.testing.assert_array_equal(fits["image"].weights, b_alone)
    np.testing.assert_array_equal(fits["image"].fold_weights, [b_alone, b_alone])

    report = scores(fits["image"].cross_validated, [0, 1], ["bg", "obj"])
    preds = {"x": [0] * 4 + [1] * 6, "y": [0, 1]}  # b's labels
    cms = np.stack([sk_confusion(truth[n], preds[n], labels=[0, 1]) for _ in range(2) for n in "xy"])
    assert report["oof_miou"] == pytest.approx(metrics.score(cms, "image")) == pytest.approx(0.8125)
    assert report["folds"] == pytest.approx({"0": 0.8125, "1": 0.8125})
    assert report["iou"] == pytest.approx(
        dict(zip(["bg", "obj"], metrics.class_ious(cms, "image"), strict=True))
    )
    assert scores(fits["image"].members.take([0]), [0, 1], ["bg", "obj"])["oof_miou"] == pytest.approx(0.625)
    dataset = scores(fits["dataset"].cross_validated, [0, 1], ["bg", "obj"])
    assert dataset["oof_miou"] == pytest.approx((3 / 4 + 8 / 9) / 2)


def test_candidate_confusions_refuse_members_that_hold_other_images() -> None:
    members = _members(P1)
    members[1][2] = Stored(Path("b/fold2.npz"), ["other.png"], [_two_class([0.5] * 4)])
    with pytest.raises(UserError, match=r"b/fold2\.npz: holds other images than a/fold2\.npz"):
        _fold_cms(members, _truth, np.ones((1, 2, 2)) / 2, n_classes=2)


def test_fit_ensemble_cross_validates_weights_by_leaving_each_fold_out() -> None:
    fit = fit_ensemble(_members(P1), _truth, n_classes=2, grid_step=0.5, per_class=False)
    # mIoU by hand (folds pooled) of a alone / the mix / b alone:
    #   without fold 0: 1/3, 7/12, 7/12 -> the mix (it ties b, and comes first)
    #   without fold 1: 1, 7/12, 1/3    -> a
    #   without fold 2: 1/3, 1, 1/3     -> the mix
    #   all folds:      1/2, 17/24, 13/40 -> the mix
    mix, a_alone = [[0.5, 0.5], [0.5, 0.5]], [[1.0, 1.0], [0.0, 0.0]]
    np.testing.assert_array_equal(fit.fold_weights, [mix, a_alone, mix])
    np.testing.assert_array_equal(fit.weights, mix)
    # Fold k scored with the weights fitted without it.
    chosen = {0: 0.5, 1: 1.0, 2: 0.5}
    assert isinstance(fit.cross_validated, FoldConfusions) and isinstance(fit.in_sample, FoldConfusions)
    cross_validated = fit.cross_validated.confusion[0]
    for k in range(3):
        np.testing.assert_array_equal(cross_validated[k], _sk_cm(BY_HAND[k][chosen[k]]))
    np.testing.assert_array_equal(cross_validated.sum(axis=0), [[4, 2], [4, 2]])
    assert mean_iou(cross_validated.sum(axis=0)) == pytest.approx((4 / 10 + 2 / 8) / 2)
    assert mean_iou(fit.in_sample.confusion[0].sum(axis=0)) == pytest.approx((6 / 8 + 4 / 6) / 2)
    # Each member alone, fold by fold.
    assert isinstance(fit.members, FoldConfusions)
    assert fit.members.confusion.shape == (2, 3, 2, 2)
    for m, alone in enumerate((1.0, 0.0)):
        for k in range(3):
            np.testing.assert_array_equal(fit.members.confusion[m, k], _sk_cm(BY_HAND[k][alone]))


def test_a_member_that_is_always_worse_gets_weight_zero() -> None:
    # b (first, so not favoured by ties) is confidently wrong; a is right but unsure. At a 0.25 step any
    # weight on b flips pixels: 0.25 * 1.0 + 0.75 * 0.4 = 0.55 > 1/2 on a class-0 pixel.
    p1 = {"b": [[1.0, 1.0, 0.0, 0.0]] * 2, "a": [[0.4, 0.4, 0.6, 0.6]] * 2}
    fit = fit_ensemble(_members(p1), _truth, n_classes=2, grid_step=0.25, per_class=False)
    b_zero = [[0.0, 0.0], [1.0, 1.0]]
    np.testing.assert_array_equal(fit.weights, b_zero)
    np.testing.assert_array_equal(fit.fold_weights, [b_zero, b_zero])
    assert isinstance(fit.cross_validated, FoldConfusions) and isinstance(fit.members, FoldConfusions)
    np.testing.assert_array_equal(fit.cross_validated.confusion[0], [[[2, 0], [0, 2]]] * 2)
    np.testing.assert_array_equal(fit.members.confusion[0], [[[0, 2], [2, 0]]] * 2)  # b alone: all wrong


# Three classes. a is right on classes 0 and 1 but calls the class-2 pixel class 0 (0.5 > 0.4); b is
# uniform. Any one weight per model keeps a's argmax (or makes everything a tie, which argmax gives to
# class 0), but weighting class 0 towards b alone shrinks a's class-0 column to 1/3 < 0.4.
THREE_A = torch.tensor([[0.9, 0.1, 0.5], [0.05, 0.8, 0.1], [0.05, 0.1, 0.4]])[:, None, :]  # (3, 1, 3)
THREE_TRUTH = np.array([[0, 1, 2]], np.uint8)


def _three_class_members() -> list[list[Stored]]:
    uniform = torch.full((3, 1, 3), 1 / 3)
    return [
        [Stored(Path(f"{name}/fold{k}.npz"), [f"f{k}.png"], [probs]) for k in range(2)]
        for name, probs in (("a", THREE_A), ("b", uniform))
    ]


def test_per_class_weights_fix_what_one_weight_per_model_cannot() -> None:
    members = _three_class_members()
    fits = {
        per_class: fit_ensemble(members, lambda _: THREE_TRUTH, 3, grid_step=0.5, per_class=per_class)
        for per_class in (False, True)
    }
    np.testing.assert_array_equal(fits[False].weights, [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(fits[True].weights, [[0, 1, 1], [1, 0, 0]])
    in_sample = {key: float(fit.in_sample.score(np.ones(2, bool))[0]) for key, fit in fits.items()}
    assert in_sample[False] == pytest.approx((2 / 4 + 1 + 0) / 3)  # the class-2 pixels go to class 0
    assert in_sample[True] == 1.0
    assert named_weights(fits[True].weights, ["a", "b"], ["bg", "x", "y"]) == {
        "a": {"bg": 0.0, "x": 1.0, "y": 1.0},
        "b": {"bg": 1.0, "x": 0.0, "y": 0.0},
    }


@pytest.mark.parametrize("average", metrics.AVERAGES)
def test_per_class_weights_never_lower_the_score_they_are_fitted_on(average: metrics.Average) -> None:
    rng = np.random.default_rng(0)
    names = [[f"f{k}_{i}.png" for i in range(2)] for k in range(3)]
    truth = {name: rng.integers(0, 3, (3, 4), dtype=np.uint8) for fold in names for name in fold}
    members = []
    for m in range(3):
        folds = []
        for k, fold in enumerate(names):
            # members at different resolutions: merged at the largest, scored at the truth's size
            arrays = [torch.from_numpy(rng.dirichlet([1.0] * 3, (3, 2 + m)).transpose(2, 0, 1)).float()]
            arrays.append(torch.from_numpy(rng.dirichlet([1.0] * 3, (2, 2)).transpose(2, 0, 1)).float())
            folds.append(Stored(Path(f"m{m}/fold{k}.npz"), fold, arrays))
        members.append(folds)
    fits = {pc: fit_ensemble(members, truth.__getitem__, 3, 0.5, pc, average) for pc in (False, True)}
    assert fits[True].weights.shape == (3, 3)
    np.testing.assert_allclose(fits[True].weights.sum(axis=0), 1.0)  # each class's weights on the grid
    before = float(fits[False].in_sample.score(np.ones(3, bool))[0])
    after = float(fits[True].in_sample.score(np.ones(3, bool))[0])
    assert after >= before
    # The same holds for each fold's fit, on the folds it was fitted on.
    for k in range(3):
        others = np.arange(3) != k
        fitted_on = {}
        for pc, fit in fits.items():
            weights = np.asarray(fit.fold_weights[k])[None]
            fitted_on[pc] = candidate_tally(members, truth.__getitem__, weights, 3, average).score(others)[0]
        assert fitted_on[True] >= fitted_on[False]
    # The cross-validated tally is fold k scored with fold k's weights.
    for k in range(3):
        weights = np.asarray(fits[True].fold_weights[k])[None]
        alone = candidate_tally(members, truth.__getitem__, weights, 3, average).score(np.arange(3) == k)
        assert fits[True].cross_validated.score(np.arange(3) == k) == pytest.approx(alone)


def test_write_ensemble_labels_merges_each_fold_with_its_weights_at_native_size() -> None:
    rng = torch.Generator().manual_seed(1)
    shapes = {"x.png": (4, 4), "y.png": (3, 5)}
    probs = {(m, k): torch.rand((3, 2, 2), generator=rng).softmax(0) for m in range(2) for k in range(2)}
    members = [
        [Stored(Path(f"{m}/{k}.npz"), ["x.png" if k == 0 else "y.png"], [probs[m, k]]) for k in range(2)]
        for m in range(2)
    ]
    fold_weights = np.array([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], [[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]]])
    written = []
    write_ensemble_labels(
        members, fold_weights, shapes.__getitem__, lambda k, n, mask: written.append((k, n, mask))
    )
    assert [(k, name) for k, name, _ in written] == [(0, "x.png"), (1, "y.png")]
    for k, name, mask in written:
        w = torch.from_numpy(fold_weights[k]).float()
        merged = w[0][:, None, None] * probs[0, k] + w[1][:, None, None] * probs[1, k]
        upsampled = F.interpolate(merged[None], size=shapes[name], mode="bilinear", align_corners=False)[0]
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, upsampled.argmax(0).numpy())


def test_scores_pool_the_folds_and_summarise_each() -> None:
    cms = np.array([[[3, 1], [0, 2]], [[2, 0], [1, 1]]])
    report = scores(FoldConfusions(cms[None]), [3, 5], ["bg", "can"])
    # pooled [[5, 1], [1, 3]]: IoU 5/7 and 3/5; fold 3: 3/4, 2/3 (17/24); fold 5: 2/3, 1/2 (7/12)
    assert report["oof_miou"] == pytest.approx((5 / 7 + 3 / 5) / 2)
    assert report["iou"] == pytest.approx({"bg": 5 / 7, "can": 3 / 5})
    assert report["folds"] == pytest.approx({"3": 17 / 24, "5": 7 / 12})
    assert report["fold_miou_mean"] == pytest.approx((17 / 24 + 7 / 12) / 2)
    assert report["fold_miou_std"] == pytest.approx(1 / 16)


def test_named_weights_are_one_number_per_model_unless_classes_differ() -> None:
    assert named_weights(np.array([[0.7, 0.7], [0.3, 0.3]]), ["a", "b"], ["bg", "x"]) == {"a": 0.7, "b": 0.3}
    assert named_weights(np.array([[0.7, 1.0], [0.3, 0.0]]), ["a", "b"], ["bg", "x"]) == {
        "a": {"bg": 0.7, "x": 1.0},
        "b": {"bg": 0.3, "x": 0.0},
    }


# ---------------------------------------------------------------------------------------------------------
# stages/ensemble.py, then stages/evaluate.py on what it wrote


def _save_oof(path: Path, names: list[str], classes: list[str], probs: list[np.ndarray]) -> None:
    """The `oof.write_oof` format, written by numpy itself: file_names, classes, p<i> uint8 (C, h, w)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"p{i}": np.round(p * 255).astype(np.uint8) for i, p in enumerate(probs)}
    np.savez_compressed(path, file_names=np.array(names), classes=np.array(classes), **arrays)


ENSEMBLE_ARGS = ["--oof", "oof", "--manifest", "manifest.json", "--masks", "masks", "--weights", "w.json"]
ENSEMBLE_ARGS += ["--report", "report.json", "--labels", "labels"]
EVALUATE_ARGS = ["--labels", "labels", "--report", "report.json", "--manifest", "manifest.json"]
EVALUATE_ARGS += ["--masks", "masks", "--folds", "folds.csv", "--root", "data", "--metrics", "cv.json"]
EVALUATE_ARGS += ["--details", "details.json", "--confusion", "confusion.csv", "--worst", "worst"]
EVALUATE_ARGS += ["--n-worst", "2"]


def _stage_project(tmp_path: Path, metric: dict[str, str] | None = None) -> list[str]:
    """The P1 scenario on disk as the ensemble stage reads it (one 1 x 4 image per fold); -> classes."""
    classes = ["background", "can"]
    names = [f"img/f{k}.png" for k in range(3)]
    for k, name in enumerate(names):
        write_mask(tmp_path / "masks" / mask_relpath(name), TRUTH)
        (tmp_path / "data/img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 1)).save(tmp_path / "data" / name)
        for model in ("a", "b"):
            # quantised in whole levels that sum to 255, as round(255 p) does for these p
            levels = np.round(np.array(P1[model][k]) * 255)[None]
            probs = np.stack([255 - levels, levels]) / 255
            _save_oof(tmp_path / f"oof/{model}/fold{k}.npz", [name], classes, [probs])
    records = [coco.ImageRecord(k, name, 1, 4) for k, name in enumerate(names)]
    presence = np.ones((3, 2), dtype=bool)
    write_manifest(tmp_path / "manifest.json", Manifest(classes, [1], records, presence, [], {}))
    pd.DataFrame({"image_id": names, "fold": [0, 1, 2]}).to_csv(tmp_path / "folds.csv", index=False)
    params: dict = {
        "split": {"n_splits": 3},
        "models": {"a": {}, "b": {}},
        "ensemble": {"folds": [0, 1, 2], "grid_step": 0.5},
    }
    if metric is not None:
        params["metric"] = metric
    write_params(tmp_path / "params.yaml", params)
    return classes


def test_ensemble_stage_then_evaluate_stage_agree_on_the_cv_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = _stage_project(tmp_path)
    run_stage("ensemble.py", ENSEMBLE_ARGS, tmp_path, monkeypatch)

    fitted = json.loads((tmp_path / "w.json").read_text())
    assert fitted == {
        "members": ["a", "b"],
        "folds": [0, 1, 2],
        "classes": classes,
        "weights": [[0.5] * 2] * 2,
        "decision": {"class_scales": None, "postprocess": {}},  # neither step enabled
    }
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["weights"] == {"a": 0.5, "b": 0.5}
    assert report["fold_weights"] == {
        "0": {"a": 0.5, "b": 0.5},
        "1": {"a": 1.0, "b": 0.0},
        "2": {"a": 0.5, "b": 0.5},
    }
    # The cross-validated labels, by hand: fold 0 and 2 with the mix, fold 1 with a alone.
    labels = {k: read_mask(tmp_path / f"labels/fold{k}/img/f{k}.png") for k in range(3)}
    expected = {0: [[0, 0, 1, 1]], 1: [[1, 1, 0, 0]], 2: [[0, 0, 0, 0]]}
    for k in range(3):
        np.testing.assert_array_equal(labels[k], expected[k])
    pred = np.concatenate([labels[k].ravel() for k in range(3)])
    truth = np.tile(TRUTH.ravel(), 3)
    sk_miou = float(np.mean(jaccard_score(truth, pred, average=None)))
    assert report["ensemble"]["oof_miou"] == pytest.approx(sk_miou)
    assert report["models"]["a"]["oof_miou"] == pytest.approx(0.5)  # a alone beats the honest ensemble here
    assert report["in_sample_miou"] == pytest.approx((6 / 8 + 4 / 6) / 2)

    run_stage("evaluate.py", EVALUATE_ARGS, tmp_path, monkeypatch)
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["oof_miou"] == pytest.approx(sk_miou)
    assert json.loads((tmp_path / "details.json").read_text())["weights"] == {"a": 0.5, "b": 0.5}
    # One headline per decision step: here the fitted weights alone (the last step: the ensemble).
    assert cv["steps"] == pytest.approx({"weights": sk_miou})
    assert report["average"] == "dataset" == json.loads((tmp_path / "details.json").read_text())["average"]


def test_ensemble_and_evaluate_stages_by_the_image_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stage_project(tmp_path, {"average": "image"})
    run_stage("ensemble.py", ENSEMBLE_ARGS, tmp_path, monkeypatch)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["average"] == "image"
    # Image mIoUs by hand (one image per fold) of a alone / the mix / b alone:
    #   fold 0: 1, 1, 0;  fold 1: 0, 1, 1;  fold 2: 1, 1/4, 1/4  (all class 0: IoU 2/4 and 0)
    # without fold 0: 1/2, 5/8, 5/8 -> the mix; without 1: 1, 5/8, 1/8 -> a; without 2: 1/2, 1, 1/2 -> mix;
    # all folds: 2/3, 3/4, 5/12 -> the mix: the same weights as the dataset average, here.
    assert report["fold_weights"] == {
        "0": {"a": 0.5, "b": 0.5},
        "1": {"a": 1.0, "b": 0.0},
        "2": {"a": 0.5, "b": 0.5},
    }
    labels = [read_mask(tmp_path / f"labels/fold{k}/img/f{k}.png") for k in range(3)]
    cms = np.stack([_sk_cm(label.ravel()) for label in labels])
    assert report["ensemble"]["oof_miou"] == pytest.approx(metrics.score(cms, "image"))
    assert report["ensemble"]["oof_miou"] == pytest.approx((1 + 0 + 1 / 4) / 3)
    assert report["ensemble"]["folds"] == pytest.approx({"0": 1.0, "1": 0.0, "2": 0.25})
    iou = metrics.class_ious(cms, "image")
    assert report["ensemble"]["iou"] == pytest.approx({"background": iou[0], "can": iou[1]})
    assert report["models"]["a"]["oof_miou"] == pytest.approx(2 / 3)
    assert report["in_sample_miou"] == pytest.approx(3 / 4)

    run_stage("evaluate.py", EVALUATE_ARGS, tmp_path, monkeypatch)
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["average"] == "image"
    assert details["oof_miou"] == pytest.approx(report["ensemble"]["oof_miou"])
    assert "average" not in json.loads((tmp_path / "cv.json").read_text())  # numbers only

    # A report fitted by one average, judged by the other: stale, and said so.
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    write_params(tmp_path / "params.yaml", {**params, "metric": {"average": "dataset"}})
    with pytest.raises(SystemExit):
        run_stage("evaluate.py", EVALUATE_ARGS, tmp_path, monkeypatch)
    assert "report.json: scored by the image average, params say dataset" in capsys.readouterr().err


def test_ensemble_stage_with_calibration_and_post_processing_reports_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = _stage_project(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["ensemble"].update(calibrate=True, postprocess=True)
    write_params(tmp_path / "params.yaml", params)
    run_stage("ensemble.py", ENSEMBLE_ARGS, tmp_path, monkeypatch)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["steps"]) == ["members", "weights", "calibration", "postprocess"]
    for step in ("weights", "calibration", "postprocess"):
        assert set(report["steps"][step]) >= {"oof_miou", "in_sample_miou", "iou", "folds"}
    # The last step is the ensemble; the labels written are its nested ones (evaluate checks the score).
    assert report["ensemble"]["oof_miou"] == report["steps"]["postprocess"]["oof_miou"]
    fitted = json.loads((tmp_path / "w.json").read_text())
    assert fitted["decision"] == report["decision"]
    assert set(fitted["decision"]["class_scales"]) == set(classes)
    assert set(report["fold_decisions"]) == {"0", "1", "2"}
    labels = [read_mask(tmp_path / f"labels/fold{k}/img/f{k}.png") for k in range(3)]
    cms = np.stack([_sk_cm(label.ravel()) for label in labels])
    assert report["ensemble"]["oof_miou"] == pytest.approx(metrics.score(cms, "dataset"))
    run_stage("evaluate.py", EVALUATE_ARGS, tmp_path, monkeypatch)
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert list(cv["steps"]) == ["weights", "calibration", "postprocess"]
    assert cv["oof_miou"] == pytest.approx(cv["steps"]["postprocess"])


def test_tied_seed_copies_fit_as_one_member_holding_their_mean() -> None:
    # a1 and a2 are seed copies of one recipe (group 0), b its own: the tied fit must equal an untied
    # fit of [mean(a1, a2), b] (merging is linear), with a1 and a2 sharing each weight equally.
    a1 = [[0.1, 0.1, 0.9, 0.9], [0.7, 0.7, 0.3, 0.3], [0.1, 0.1, 0.6, 0.6]]
    a2 = [[0.3, 0.1, 0.7, 0.9], [0.5, 0.5, 0.5, 0.5], [0.1, 0.3, 0.5, 0.5]]
    mean = [[(x + y) / 2 for x, y in zip(r1, r2, strict=True)] for r1, r2 in zip(a1, a2, strict=True)]
    three = _members({"a1": a1, "a2": a2, "b": P1["b"]})
    tied = fit_ensemble(three, _truth, 2, 0.25, False, groups=[0, 0, 1])
    merged = fit_ensemble(_members({"a": mean, "b": P1["b"]}), _truth, 2, 0.25, False)
    fits = [(tied.weights, merged.weights), *zip(tied.fold_weights, merged.fold_weights, strict=True)]
    for got, want in fits:
        np.testing.assert_allclose(got[0], got[1])  # the copies share the group's weight equally
        np.testing.assert_allclose(got[0] + got[1], want[0])
        np.testing.assert_allclose(got[2], want[1])
    folds, classes = [0, 1, 2], ["bg", "x"]
    got, want = scores(tied.cross_validated, folds, classes), scores(merged.cross_validated, folds, classes)
    for key in ("oof_miou", "folds", "iou"):
        assert got[key] == pytest.approx(want[key]), key
    # Each member is still scored alone, the copies included.
    alone = scores(fit_ensemble(_members({"a1": a1}), _truth, 2, 0.25, False).members, folds, classes)
    assert scores(tied.members.take([0]), folds, classes)["folds"] == pytest.approx(alone["folds"])
    assert len(tied.members) == 3
    with pytest.raises(ValueError, match="groups must number"):
        fit_ensemble(_members({"a1": a1, "b": P1["b"]}), _truth, 2, 0.25, False, groups=[0, 2])
