"""Tests for the decisions made on OOF after the weights: per-class calibration and post-processing rules.

Hand-sized label strips and probabilities whose every score can be counted by hand; the component
bookkeeping is cross-checked against relabelling the images and counting again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.data.probstore import read_probabilities
from pipeline.ensemble import fit as ensemble_fit
from pipeline.ensemble.calibrate import SCALES, fit_calibration, scale_trial_labels
from pipeline.ensemble.decision import LabelDecision
from pipeline.ensemble.fit import merged_labels, scores
from pipeline.ensemble.postprocess import (
    KEEP,
    ClassRule,
    ComponentTableBuilder,
    apply_rules,
    candidate_rules,
    decide_rules,
    fit_postprocess,
)

# ---------------------------------------------------------------------------------------------------------
# Calibration: a rare class argmax never predicts


def _stored(tmp_path: Path, k: int, rare: list[float]) -> object:
    """Fold k's one 1 x 4 image with P(rare) = `rare` per pixel (background the rest), as the oof stage
    stores it (uint8 levels)."""
    levels = np.round(np.array(rare) * 255)[None]
    probs = np.stack([255 - levels, levels]).astype(np.uint8)
    path = tmp_path / f"fold{k}.npz"
    np.savez_compressed(path, file_names=np.array([f"f{k}.png"]), classes=np.array(["bg", "rare"]), p0=probs)
    return read_probabilities(path)


TRUTH = np.array([[0, 0, 1, 1]], dtype=np.uint8)


def test_calibration_recovers_a_rare_class_argmax_loses_and_its_nested_score_is_lower(tmp_path: Path) -> None:
    # Folds 0 and 1 need a scale >= 1.5 on the rare class (0.4 s > 0.6); fold 2 needs 1.22 < s < 1.86
    # (0.45 s > 0.55 and 0.35 s < 0.65): of SCALES only sqrt(2). Argmax (s = 1) never predicts it.
    member = [
        _stored(tmp_path, 0, [0.1, 0.1, 0.4, 0.4]),
        _stored(tmp_path, 1, [0.1, 0.1, 0.4, 0.4]),
        _stored(tmp_path, 2, [0.35, 0.35, 0.45, 0.45]),
    ]
    ones = np.ones((1, 2))
    fit = fit_calibration([member], lambda name: TRUTH, 2, np.stack([ones] * 3), ones, "dataset")
    # All folds: s = 2 gets folds 0 and 1 right and calls fold 2 all rare: bg 4/6, rare 6/8 (0.708);
    # sqrt(2) loses folds 0 and 1: bg 6/10, rare 2/6 (0.467).
    assert fit.scales.tolist() == [1.0, 2.0]
    in_sample = scores(fit.in_sample, [0, 1, 2], ["bg", "rare"])
    assert in_sample["oof_miou"] == pytest.approx((4 / 6 + 6 / 8) / 2)
    assert in_sample["iou"]["rare"] == pytest.approx(6 / 8)  # argmax's is 0
    # Without fold 0 (or 1): sqrt(2) and 2 tie at 0.583 and the earlier in SCALES wins; without fold 2: 2.
    assert SCALES.index(2**0.5) < SCALES.index(2.0)
    np.testing.assert_allclose(fit.fold_scales, [[1, 2**0.5], [1, 2**0.5], [1, 2]])
    # Nested: folds 0 and 1 all background, fold 2 all rare: bg 4/10, rare 2/8.
    nested = scores(fit.cross_validated, [0, 1, 2], ["bg", "rare"])
    assert nested["oof_miou"] == pytest.approx((4 / 10 + 2 / 8) / 2)
    assert nested["oof_miou"] < in_sample["oof_miou"]
    assert nested["iou"]["rare"] > 0


def test_calibration_keeps_scale_one_when_argmax_is_already_right(tmp_path: Path) -> None:
    member = [_stored(tmp_path, k, [0.1, 0.1, 0.9, 0.9]) for k in range(3)]
    ones = np.ones((1, 2))
    fit = fit_calibration([member], lambda name: TRUTH, 2, np.stack([ones] * 3), ones, "image")
    assert fit.scales.tolist() == [1.0, 1.0]  # every scale from 0.25 to 8 ties; the first tried is 1
    assert scores(fit.cross_validated, [0, 1, 2], ["bg", "rare"])["oof_miou"] == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["resized", "ties", "large"])
def test_scale_trials_give_the_merged_argmax_of_each_trial_weighting(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every trial's labels are those of the general path, which merges and takes the argmax of each trial
    # weighting, for two fits with their own weights and scales so far. "resized": two members at other
    # sizes than the truth's, in the oof store's 1/255 steps. "ties": one member at the truth's size with
    # values in quarters and power-of-two weights, so that a scaled class ties others exactly and
    # argmax's first-index rule decides. "large": a photo above RESIZED_BYTES (the general path, in strips).
    generator = torch.Generator().manual_seed(0)
    if case == "ties":
        probs = [torch.randint(0, 4, (5, 13, 11), generator=generator) / 4]
        fits = np.array([np.ones((1, 5)), np.full((1, 5), 0.5)])
    else:
        probs = [torch.randint(0, 256, size, generator=generator) / 255 for size in [(5, 6, 7), (5, 9, 4)]]
        rng = np.random.default_rng(0)
        fits = rng.dirichlet(np.ones(2), size=(2, 5)).transpose(0, 2, 1)  # (S, M, C); columns sum to 1
    if case == "large":
        monkeypatch.setattr(ensemble_fit, "RESIZED_BYTES", 0)
    n_members = len(probs)
    scales_so_far = np.array([[1.0, 2.0, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 4.0, 1.0]])
    for c in range(1, 5):
        trial_scales = np.repeat(scales_so_far[:, None], len(SCALES), axis=1)
        trial_scales[:, :, c] = SCALES
        trials = torch.from_numpy((fits[:, None] * trial_scales[:, :, None, :]).astype(np.float32))
        fast = scale_trial_labels(probs, (13, 11), trials, c)
        general = merged_labels(probs, trials.reshape(-1, n_members, 5), (13, 11))
        assert len(fast) == len(general) == 2 * len(SCALES)
        for ours, theirs in zip(fast, general, strict=True):
            assert ours.dtype == torch.uint8 and torch.equal(ours, theirs), c


def test_label_decision_scales_before_the_argmax_and_applies_the_rules_after() -> None:
    probs = torch.tensor([[[0.6, 0.6, 0.9, 0.6]], [[0.4, 0.4, 0.1, 0.4]]])
    assert LabelDecision().labels(probs, (1, 4)).tolist() == [[0, 0, 0, 0]]
    scaled = LabelDecision([1.0, 2.0])
    assert scaled.labels(probs, (1, 4)).tolist() == [[1, 1, 0, 1]]
    # The lone pixel (a quarter of the image) goes with a rule removing components of <= 1/4.
    both = LabelDecision([1.0, 2.0], [KEEP, ClassRule(max_fraction=0.25)])
    assert both.labels(probs, (1, 4)).tolist() == [[1, 1, 0, 0]]
    assert LabelDecision.from_json(both.to_json(["bg", "x"]), ["bg", "x"]) == both
    assert both.to_json(["bg", "x"]) == {
        "class_scales": {"bg": 1.0, "x": 2.0},
        "postprocess": {"x": {"max_fraction": 0.25, "largest_only": False}},
    }
    with pytest.raises(ValueError, match="class scales for"):
        LabelDecision.from_json(both.to_json(["bg", "x"]), ["bg", "y"])


# ---------------------------------------------------------------------------------------------------------
# Post-processing: per class, by nnU-Net's rule

# Classes background, A, B on a 1 x 20 strip. A's lone pixel (8) is a false positive: removing it helps A
# and background. B's lone pair (10, 11) holds one true B pixel: removing it raises the mean (background,
# whose IoU A's overreach (5, 6) keeps low, gains more than B loses) but lowers B's IoU, which nnU-Net's
# rule does not allow.
STRIP_TRUTH = np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 2, 2, 2, 2, 2]], dtype=np.uint8)
STRIP_PRED = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 2, 2, 0, 0, 2, 2, 2, 2, 2, 2]], dtype=np.uint8)


def _table(pairs: list[tuple[int, np.ndarray, np.ndarray]], n_classes: int = 3) -> object:
    builder = ComponentTableBuilder(n_classes)
    for fold, pred, truth in pairs:
        builder.add(fold, pred, truth)
    return builder.build()


def test_post_processing_is_adopted_for_the_class_it_helps_not_the_one_it_hurts() -> None:
    table = _table([(k, STRIP_PRED, STRIP_TRUTH) for k in range(3)])
    every = np.ones(3, dtype=bool)
    before = metrics.class_ious(table.cms, "dataset")
    # B's candidates alone (A's rule in place or not): the mean rises, B's IoU falls.
    for a_rule in (KEEP, ClassRule(max_fraction=0.05)):
        for rule in candidate_rules(table, 2, every):
            cms = table.confusions([KEEP, a_rule, rule])
            base = table.confusions([KEEP, a_rule, KEEP])
            assert metrics.score(cms, "dataset") > metrics.score(base, "dataset")
            assert metrics.class_ious(cms, "dataset")[2] < metrics.class_ious(base, "dataset")[2]
    rules = decide_rules(table, every, "dataset")
    assert rules == [KEEP, ClassRule(max_fraction=0.05), KEEP]
    after = metrics.class_ious(table.confusions(rules), "dataset")
    assert after[1] > before[1] and after[2] == before[2]
    fit = fit_postprocess(table, 3, "image")
    assert fit.rules == rules and all(own == rules for own in fit.fold_rules)


def test_component_bookkeeping_matches_relabelling_and_counting_again() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(4):
        # Blocky random labels, so components of many sizes exist.
        pred = np.kron(rng.integers(0, 4, (6, 6)), np.ones((2, 3), dtype=np.int64)).astype(np.uint8)
        pred[rng.random(pred.shape) < 0.1] = rng.integers(0, 4)
        truth = np.kron(rng.integers(0, 4, (6, 6)), np.ones((2, 3), dtype=np.int64)).astype(np.uint8)
        pairs.append((k % 2, pred, truth))
    table = _table(pairs, 4)
    candidates = [ClassRule(max_fraction=f) for f in (0.002, 0.01, 0.05)] + [ClassRule(largest_only=True)]
    for rules in ([KEEP, c, KEEP, KEEP] for c in candidates):
        expected = [metrics.confusion_matrix(t, apply_rules(p, rules), 4) for _, p, t in pairs]
        np.testing.assert_array_equal(table.confusions(rules), np.stack(expected))
    mixed = [KEEP, candidates[1], candidates[3], ClassRule(max_fraction=0.05, largest_only=True)]
    expected = [metrics.confusion_matrix(t, apply_rules(p, mixed), 4) for _, p, t in pairs]
    np.testing.assert_array_equal(table.confusions(mixed), np.stack(expected))


def test_apply_rules_keeps_the_largest_component_or_drops_small_ones() -> None:
    labels = np.array([[1, 0, 1, 1, 0, 2], [0, 0, 1, 1, 0, 0]], dtype=np.uint8)  # 1: sizes 1 and 4
    assert apply_rules(labels, [KEEP, ClassRule(largest_only=True), KEEP]).tolist() == [
        [0, 0, 1, 1, 0, 2],
        [0, 0, 1, 1, 0, 0],
    ]
    # 1/12 of the image: the lone 1 and the lone 2 at max_fraction 1/12, not the block of 4.
    rules = [KEEP, ClassRule(max_fraction=1 / 12), ClassRule(max_fraction=1 / 12)]
    assert apply_rules(labels, rules).tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    # Diagonal neighbours are one component (8-connectivity).
    diagonal = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    assert apply_rules(diagonal, [KEEP, ClassRule(largest_only=True)]).tolist() == diagonal.tolist()


def test_nested_post_processing_decides_each_fold_without_it() -> None:
    # Fold 0 and 1: A's lone pixel is false (removing it helps); fold 2: it is true (removing it hurts).
    helps = (STRIP_PRED, STRIP_TRUTH)
    true_singles = STRIP_TRUTH.copy()
    true_singles[0, 8] = 1
    table = _table([(0, *helps), (1, *helps), (2, STRIP_PRED, true_singles)])
    fit = fit_postprocess(table, 3, "dataset")
    # Without fold 2 the rule is adopted and applied to fold 2, where it hurts: nested < in-sample.
    assert fit.fold_rules[2][1].active
    nested = metrics.score(fit.cross_validated, "dataset")
    in_sample = metrics.score(fit.in_sample, "dataset")
    assert nested < in_sample
    own_2 = table.fold == 2
    np.testing.assert_array_equal(fit.cross_validated[own_2], table.confusions(fit.fold_rules[2])[own_2])
