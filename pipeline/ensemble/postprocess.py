"""Per-class connected-component post-processing, decided on out-of-fold labels by nnU-Net's rule, nested.

A rule per class removes some of the class's predicted connected components (8-connectivity): those of
at most a share of the image's pixels, or every one but the largest. Removed pixels become
background. A rule is adopted for a class only if it raises the OOF mIoU and lowers no class's IoU
(nnU-Net's rule), deciding the classes one after another with the earlier ones' rules in place.

nnU-Net scores that choice on the same folds it chose it on, which flatters it. Here, as the ensemble's
weights, rules are also decided without each fold and scored on it, and the pooled folds give the honest
figure; the in-sample one is reported beside it.

Scoring a rule needs no relabelling: each predicted component's truth histogram says where its pixels
move in the confusion matrix when it is removed (from its class's column to background's), so every
candidate costs a few array operations on per-image confusion matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.metrics import Average, class_ious, confusion_matrix, score

# Candidate size thresholds: these quantiles of the class's predicted component sizes (as a share of
# their image) on the deciding folds, taken at an observed size ("lower"), so each candidate removes at
# least the components of that size and a different share of them than the next.
SIZE_QUANTILES = (0.05, 0.1, 0.25, 0.5)
# A rule must raise the mean by more than this, and may lower no class's IoU by more than this: float
# noise, not a tolerance for real losses.
EPS = 1e-12


@dataclass(frozen=True)
class ClassRule:
    """What post-processing removes of one class's predicted components (the default: nothing)."""

    max_fraction: float = 0.0  # components of at most this share of the image's pixels are removed
    largest_only: bool = False  # every component but the largest is removed

    @property
    def active(self) -> bool:
        return self.max_fraction > 0 or self.largest_only

    def removes(self, fraction: np.ndarray, largest: np.ndarray) -> np.ndarray:
        """bool (n,): which components of the class, by their image share and largest flag, it removes."""
        removed = fraction <= self.max_fraction
        if self.largest_only:
            removed |= ~largest
        return removed


KEEP = ClassRule()


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 (H, W) component ids (0: outside `mask`, 1..n inside, 8-connected) and int64 (n,) areas."""
    n, ids, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return ids, stats[1:n, cv2.CC_STAT_AREA].astype(np.int64)


def apply_rules(labels: np.ndarray, rules: Sequence[ClassRule]) -> np.ndarray:
    """uint8 (H, W) `labels` with each class's `rules[c]` applied (removed pixels become background 0).

    rules: one per class, background's first (never applied). The largest of tied components is the one
    cv2 numbers first (the first in row-major order), as in `ComponentTable`.
    """
    out = labels.copy()
    pixels = labels.size
    for c, rule in enumerate(rules):
        if c == 0 or not rule.active:
            continue
        mask = labels == c
        if not mask.any():
            continue
        ids, areas = _components(mask)
        removed = rule.removes(areas / pixels, _largest(areas))
        if removed.any():
            out[np.isin(ids, np.flatnonzero(removed) + 1)] = 0
    return out


def _largest(areas: np.ndarray) -> np.ndarray:
    flags = np.zeros(len(areas), dtype=bool)
    if len(areas):
        flags[int(np.argmax(areas))] = True
    return flags


@dataclass(frozen=True)
class ComponentTable:
    """Every predicted component of N images' labels, with what it covers in the truth."""

    cms: np.ndarray  # int64 (N, C, C): each image's confusion matrix without post-processing, rows truth
    fold: np.ndarray  # int (N,): each image's fold, as a position 0..K-1
    image: np.ndarray  # int (n,): the image a component is in
    cls: np.ndarray  # int (n,): its predicted class (never background)
    fraction: np.ndarray  # float64 (n,): its pixels over its image's pixels
    largest: np.ndarray  # bool (n,): the largest of its class in its image
    truth: np.ndarray  # int64 (n, C): how many of its pixels each true class holds

    def confusions(self, rules: Sequence[ClassRule]) -> np.ndarray:
        """int64 (N, C, C): each image's confusion matrix after `rules` (one per class)."""
        removed = np.zeros(len(self.cls), dtype=bool)
        for c, rule in enumerate(rules):
            if c and rule.active:
                own = self.cls == c
                removed[own] = rule.removes(self.fraction[own], self.largest[own])
        cms = self.cms.copy()
        if removed.any():
            n_classes = cms.shape[1]
            rows = np.arange(n_classes)[None, :]
            image, moved = self.image[removed][:, None], self.truth[removed]
            np.add.at(cms, (image, rows, self.cls[removed][:, None]), -moved)
            np.add.at(cms, (image, rows, 0), moved)
        return cms


class ComponentTableBuilder:
    """Collects `ComponentTable`'s rows image by image (predictions and truths at the same size)."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self._cms: list[np.ndarray] = []
        self._fold: list[int] = []
        self._rows: list[tuple[int, int, float, bool, np.ndarray]] = []

    def add(self, fold: int, pred: np.ndarray, truth: np.ndarray) -> None:
        """One image: uint8 (H, W) predicted labels and truth; `fold`: its position among the folds."""
        n = self.n_classes
        image = len(self._cms)
        self._cms.append(confusion_matrix(truth, pred, n))
        self._fold.append(fold)
        for c in np.unique(pred):
            if c == 0:
                continue
            ids, areas = _components(pred == c)
            inside = ids > 0
            # Component i's truth histogram: bincount over (id - 1) * C + truth class, in one pass.
            hist = np.bincount(
                (ids[inside].astype(np.int64) - 1) * n + truth[inside].astype(np.int64),
                minlength=len(areas) * n,
            ).reshape(len(areas), n)
            largest = _largest(areas)
            for i, area in enumerate(areas):
                self._rows.append((image, int(c), area / pred.size, bool(largest[i]), hist[i]))

    def build(self) -> ComponentTable:
        n = self.n_classes
        rows = self._rows
        return ComponentTable(
            cms=np.stack(self._cms) if self._cms else np.zeros((0, n, n), np.int64),
            fold=np.array(self._fold, dtype=np.int64),
            image=np.array([r[0] for r in rows], dtype=np.int64),
            cls=np.array([r[1] for r in rows], dtype=np.int64),
            fraction=np.array([r[2] for r in rows], dtype=np.float64),
            largest=np.array([r[3] for r in rows], dtype=bool),
            truth=np.stack([r[4] for r in rows]).astype(np.int64) if rows else np.zeros((0, n), np.int64),
        )


def candidate_rules(table: ComponentTable, c: int, images: np.ndarray) -> list[ClassRule]:
    """Class c's candidates: size thresholds at `SIZE_QUANTILES` of its components' sizes in the images
    where `images` (bool (N,)) is True, and "largest only"."""
    own = (table.cls == c) & images[table.image]
    if not own.any():
        return []
    sizes = np.quantile(table.fraction[own], SIZE_QUANTILES, method="lower")
    return [ClassRule(max_fraction=float(t)) for t in sorted(set(sizes))] + [ClassRule(largest_only=True)]


def _no_class_worse(new: np.ndarray, old: np.ndarray) -> bool:
    """No class with an IoU before has a lower one now (a class whose every prediction and truth left the
    scored images has none: NaN, no loss)."""
    both = ~np.isnan(old) & ~np.isnan(new)
    return bool(np.all(new[both] >= old[both] - EPS))


def decide_rules(table: ComponentTable, images: np.ndarray, average: Average) -> list[ClassRule]:
    """One rule per class, decided on the images where `images` (bool (N,)) is True: for each class in
    turn (earlier classes' rules in place), the candidate with the highest mIoU among those that raise it
    and lower no class's IoU; none: the class keeps every component."""
    n_classes = table.cms.shape[1]
    rules = [KEEP] * n_classes
    current = table.cms[images]
    best_score, best_iou = score(current, average), class_ious(current, average)
    for c in range(1, n_classes):
        for rule in candidate_rules(table, c, images):
            trial = [*rules[:c], rule, *rules[c + 1 :]]
            cms = table.confusions(trial)[images]
            trial_score, trial_iou = score(cms, average), class_ious(cms, average)
            if math.isnan(trial_score) or not trial_score > best_score + EPS:
                continue
            if _no_class_worse(trial_iou, best_iou):
                rules, best_score, best_iou = trial, trial_score, trial_iou
    return rules


@dataclass(frozen=True)
class PostprocessFit:
    """Rules decided on every fold (for predict) and without each fold, and the confusions they give."""

    rules: list[ClassRule]  # decided on every fold: what predict applies
    fold_rules: list[list[ClassRule]]  # fold k's, decided on the other folds
    cross_validated: np.ndarray  # int64 (N, C, C): fold k's images under fold_rules[k]; the honest score
    in_sample: np.ndarray  # int64 (N, C, C): every image under `rules`, which those images chose


def fit_postprocess(table: ComponentTable, n_folds: int, average: Average) -> PostprocessFit:
    """`decide_rules` on all folds and on each fold left out, and the resulting per-image confusions."""
    fold_rules = [decide_rules(table, table.fold != k, average) for k in range(n_folds)]
    rules = decide_rules(table, np.ones(len(table.fold), dtype=bool), average)
    cross_validated = table.cms.copy()
    for k, own_rules in enumerate(fold_rules):
        own = table.fold == k
        cross_validated[own] = table.confusions(own_rules)[own]
    return PostprocessFit(rules, fold_rules, cross_validated, table.confusions(rules))


def rules_to_json(rules: Sequence[ClassRule], classes: Sequence[str]) -> dict[str, dict]:
    """The active rules by class name (classes without one left out)."""
    return {
        name: {"max_fraction": rule.max_fraction, "largest_only": rule.largest_only}
        for name, rule in zip(classes, rules, strict=True)
        if rule.active
    }


def rules_from_json(raw: dict, classes: Sequence[str]) -> list[ClassRule]:
    """`rules_to_json`'s dict back as one rule per class; an unknown class name is a ValueError."""
    unknown = [name for name in raw if name not in classes]
    if unknown:
        raise ValueError(f"post-processing rule for unknown class {unknown[0]!r}")
    return [
        ClassRule(float(raw[name]["max_fraction"]), bool(raw[name]["largest_only"])) if name in raw else KEEP
        for name in classes
    ]
