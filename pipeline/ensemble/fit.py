"""Ensemble weights fitted on out-of-fold probabilities, and the ensemble's cross-validated OOF score.

Members are model recipes; each contributes, for every training image, the probabilities its model of
that image's fold predicted (it never saw the image). A candidate weighting is scored by the mIoU
(params `metric.average`) of the weighted mean's argmax at each image's own size: for "dataset" from
one confusion matrix per fold, for "image" from each image's mIoU and per-class IoU. Every candidate is
scored on every fold in one pass over the images, so fitting without fold k (for the cross-validated
score) costs no extra pass: weights_k = the best candidate on the other folds, scored on fold k, and
the K scored folds pooled give the honest OOF mIoU. The weights used for the test set are the best
candidate over all folds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.data.geometry import class_argmax, resize_argmax
from pipeline.data.probstore import StoredProbabilities
from pipeline.ensemble.decision import LabelDecision
from pipeline.ensemble.merge import merge_probabilities
from pipeline.errors import UserError
from pipeline.metrics import (
    Average,
    checked_average,
    confusion_matrix_torch,
    image_ious,
    image_mious,
    iou_per_class,
    mean_iou,
    nanmean,
)


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """float64 (G, n_members): every weight vector whose entries are multiples of `step` and sum to 1.

    Rows are in lexicographic order from the first member alone, (1, 0, ...), downwards, which is
    also the tie-break order of `best_candidate`. step: 1/n for an integer n.
    """
    n_steps = round(1 / step)
    rows = [c for c in itertools.product(range(n_steps, -1, -1), repeat=n_members) if sum(c) == n_steps]
    return np.array(rows, dtype=np.float64) / n_steps


# Above this many bytes for every member's probabilities at an image's own size, merged labels are
# computed candidate by candidate in strips (`resize_argmax`) instead of from members resized once.
RESIZED_BYTES = 256 * 2**20


def merged_labels(
    probs: Sequence[torch.Tensor], candidates: torch.Tensor, shape: tuple[int, int]
) -> list[torch.Tensor]:
    """The uint8 (H, W) argmax at `shape` = (H, W) of each candidate's merge of `probs`.

    probs: each member's (C, h_m, w_m) probabilities; candidates: (G, M, C) weights. Resizing is linear,
    so each member is resized to `shape` once and every candidate merged there: one resize per member
    instead of one per candidate. A photo too large for that (RESIZED_BYTES) takes the candidate-by-
    candidate path in strips. The path depends only on the sizes, so scoring and writing labels agree.
    """
    resized = resized_members(probs, shape)
    if resized is None:
        return [resize_argmax(merge_probabilities(probs, weights), shape) for weights in candidates]
    return [class_argmax(torch.einsum("mc,mchw->chw", weights, resized)) for weights in candidates]


def resized_members(probs: Sequence[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor | None:
    """(M, C, H, W): each member's (C, h_m, w_m) probabilities resized bilinearly to `shape` = (H, W), or
    None for a photo too large to hold them all (RESIZED_BYTES): the caller then works in strips."""
    if len(probs) * probs[0].shape[0] * shape[0] * shape[1] * 4 > RESIZED_BYTES:
        return None
    return torch.stack([F.interpolate(p[None], size=shape, mode="bilinear")[0] for p in probs])


@dataclass(frozen=True)
class FoldConfusions:
    """The "dataset" average's evidence on G predictors: one confusion matrix per predictor and fold."""

    confusion: np.ndarray  # int64 (G, K, C, C), rows truth

    def __len__(self) -> int:
        return len(self.confusion)

    def take(self, index: Sequence[int] | np.ndarray) -> FoldConfusions:
        """The predictors at `index`, in that order."""
        return FoldConfusions(self.confusion[np.asarray(index)])

    def score(self, folds: np.ndarray) -> np.ndarray:
        """float64 (G,): each predictor's mIoU of its matrices pooled over the folds where `folds` (bool
        (K,)) is True; NaN where nothing was counted."""
        return np.array([mean_iou(cm) for cm in self.confusion[:, folds].sum(axis=1)])

    def class_iou(self) -> np.ndarray:
        """float64 (G, C): each predictor's per-class IoU over every fold."""
        return np.stack([iou_per_class(cm) for cm in self.confusion.sum(axis=1)])


@dataclass(frozen=True)
class ImageIous:
    """The "image" average's evidence on G predictors: each image's mIoU and per-class IoU, and its fold.

    These rather than (G, N, C, C) int64 counts, which on a real set (66 candidates x 3000 images) take
    0.2 GB at 11 classes and 5.7 GB at 60; the per-class IoUs are float32 (only reported, never
    compared), the mIoUs float64 (they pick the weights: exactly `metrics.image_mious` of the counts).
    """

    fold: np.ndarray  # int (N,): each image's fold, as a position 0..K-1 in the folds' order
    miou: np.ndarray  # float64 (G, N): mean IoU over the classes in the image's truth or prediction
    iou: np.ndarray  # float32 (G, N, C): per-class IoU, NaN for a class in neither

    def __len__(self) -> int:
        return len(self.miou)

    def take(self, index: Sequence[int] | np.ndarray) -> ImageIous:
        """The predictors at `index`, in that order."""
        index = np.asarray(index)
        return ImageIous(self.fold, self.miou[index], self.iou[index])

    def score(self, folds: np.ndarray) -> np.ndarray:
        """float64 (G,): each predictor's mean image mIoU over the images of the folds where `folds` (bool
        (K,)) is True; NaN where there are none."""
        return nanmean(self.miou[:, np.asarray(folds)[self.fold]], axis=1)

    def class_iou(self) -> np.ndarray:
        """float64 (G, C): each class's IoU averaged over the images whose truth or prediction holds it."""
        return nanmean(self.iou, axis=1)


# What scoring needs of G predictors' out-of-fold labels, by average: see `candidate_tally`.
OofTally = FoldConfusions | ImageIous


def candidate_tally(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    candidates: np.ndarray,
    n_classes: int,
    average: Average,
    desc: str = "scoring weights",
) -> OofTally:
    """What the `average` mIoU of every candidate weighting on every fold needs, in one pass over the images.

    members[m][k]: member m's stored probabilities of fold k (all members list the same images per fold).
    truth(file_name): uint8 (H, W) truth at the image's own size. candidates: (G, M, C) weights.
    "dataset": `FoldConfusions`, (G, K, C, C) counts; "image": `ImageIous` of the images in fold order.
    """
    weights = torch.from_numpy(np.asarray(candidates, dtype=np.float32))

    def labels(probs: Sequence[torch.Tensor], shape: tuple[int, int]) -> list[torch.Tensor]:
        return merged_labels(probs, weights, shape)

    return labels_tally(members, truth, labels, len(candidates), n_classes, average, desc)


def labels_tally(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    labels: Callable[[Sequence[torch.Tensor], tuple[int, int]], Sequence[torch.Tensor]],
    n_predictors: int,
    n_classes: int,
    average: Average,
    desc: str,
) -> OofTally:
    """`candidate_tally` for any G predictors: labels(probs, (H, W)) gives each predictor's uint8 (H, W)
    labels of one image from its members' (C, h_m, w_m) probabilities."""
    checked_average(average)
    n_folds = len(members[0])
    fold_cms = torch.zeros((n_predictors, n_folds, n_classes, n_classes), dtype=torch.int64)
    image_fold: list[int] = []
    image_miou: list[np.ndarray] = []  # per image, (G,)
    image_iou: list[np.ndarray] = []  # per image, (G, C) float32
    total = sum(len(fold) for fold in members[0])
    progress = tqdm(total=total, desc=desc, unit="image")
    for k in range(n_folds):
        fold = [member[k] for member in members]
        for other in fold[1:]:
            if other.file_names != fold[0].file_names:
                raise UserError(
                    f"{other.path}: holds other images than {fold[0].path} (re-run its oof stage)"
                )
        for index, name in enumerate(fold[0].file_names):
            probs = [stored.probabilities(index) for stored in fold]
            mask = torch.from_numpy(truth(name))
            preds = labels(probs, tuple(mask.shape))
            cms = torch.stack([confusion_matrix_torch(mask, pred, n_classes) for pred in preds])
            if average == "dataset":
                fold_cms[:, k] += cms
            else:  # reduced to IoUs right away: the image's (G, C, C) counts are not kept
                counts = cms.numpy()
                image_fold.append(k)
                image_miou.append(image_mious(counts))
                image_iou.append(image_ious(counts).astype(np.float32))
            progress.update()
    progress.close()
    if average == "dataset":
        return FoldConfusions(fold_cms.numpy())
    if not image_fold:
        return ImageIous(
            np.zeros(0, np.int64),
            np.zeros((n_predictors, 0)),
            np.zeros((n_predictors, 0, n_classes), np.float32),
        )
    return ImageIous(np.array(image_fold), np.stack(image_miou, axis=1), np.stack(image_iou, axis=1))


def cross_validated(per_fold: Sequence[OofTally]) -> OofTally:
    """One predictor whose fold k is scored as per_fold[k] (one predictor each) scored it: the ensemble
    with fold k's weights on fold k."""
    first = per_fold[0]
    if isinstance(first, FoldConfusions):
        return FoldConfusions(np.stack([t.confusion[0, k] for k, t in enumerate(per_fold)])[None])
    miou, iou = first.miou.copy(), first.iou.copy()
    for k, tally in enumerate(per_fold):
        own = first.fold == k
        miou[:, own], iou[:, own] = tally.miou[:, own], tally.iou[:, own]
    return ImageIous(first.fold, miou, iou)


def best_candidate(scores: np.ndarray) -> int:
    """Index of the highest of the candidates' scores (G,). Ties go to the earliest; a NaN never wins."""
    return int(np.argmax(np.nan_to_num(np.asarray(scores), nan=-1.0)))


@dataclass(frozen=True)
class EnsembleFit:
    """Fitted weights and the evidence that judges them (folds in `folds` order), by the fit's average."""

    weights: np.ndarray  # (M, C) fitted on every fold: what predict uses
    fold_weights: np.ndarray  # (K, M, C): fold k's weights, fitted on the other folds
    cross_validated: OofTally  # one predictor: fold k scored with fold_weights[k]; the CV score
    members: OofTally  # M predictors: each member alone
    in_sample: OofTally  # one predictor: `weights` scored on the folds that chose them


def fit_ensemble(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    n_classes: int,
    grid_step: float,
    per_class: bool,
    average: Average = "dataset",
    groups: Sequence[int] | None = None,
) -> EnsembleFit:
    """Fit one weight per member on the simplex grid (and, if `per_class`, then one per member and class
    by one round of coordinate ascent over classes), maximising the `average` mIoU, for all folds and
    for each fold left out.

    groups: each member's group (0..n-1), or None for a group each. A group's members share its weight
    equally (seed copies of one recipe: `ensemble.tie_seeds`), so the grid is over groups, not members.
    """
    n_members, n_folds = len(members), len(members[0])
    groups = list(range(n_members)) if groups is None else list(groups)
    share = tied_shares(groups)  # (M, n_groups)
    member_grid = simplex_grid(share.shape[1], grid_step) @ share.T  # (G, M): each row sums to 1
    candidates = np.repeat(member_grid[:, :, None], n_classes, axis=2)  # (G, M, C)
    # Each member alone is scored for the report; it is a grid row unless its group is shared.
    tied = share.shape[1] < n_members
    if tied:
        alone = np.repeat(np.eye(n_members)[:, :, None], n_classes, axis=2)
        candidates_scored = np.concatenate([candidates, alone])
    else:
        candidates_scored = candidates
    tally = candidate_tally(members, truth, candidates_scored, n_classes, average)
    grid_size = len(candidates)
    # One search per "fit": fold k left out for k < K, all folds for k == K.
    used = [np.arange(n_folds) != k for k in range(n_folds)] + [np.ones(n_folds, dtype=bool)]
    picks = [best_candidate(tally.score(mask)[:grid_size]) for mask in used]
    chosen = [candidates[g] for g in picks]
    chosen_tally = [tally.take([g]) for g in picks]
    if per_class:
        for c in range(n_classes):
            # For every fit, every grid row in column c with the fit's other columns kept: one pass.
            trials = [np.stack([_with_column(w, c, row) for row in member_grid]) for w in chosen]
            picked = best_trials(members, truth, trials, used, n_classes, average, f"class {c} weights")
            chosen = [own[i] for own, (i, _) in zip(trials, picked, strict=True)]
            chosen_tally = [tally for _, tally in picked]
    if tied:
        solo = tally.take(range(grid_size, grid_size + n_members))
    else:
        solo = tally.take([int(np.flatnonzero(member_grid[:, m] == 1)[0]) for m in range(n_members)])
    return EnsembleFit(
        weights=chosen[-1],
        fold_weights=np.stack(chosen[:-1]),
        cross_validated=cross_validated(chosen_tally[:-1]),
        members=solo,
        in_sample=chosen_tally[-1],
    )


def tied_shares(groups: Sequence[int]) -> np.ndarray:
    """float64 (M, n_groups): member m's share of its group's weight, 1 / the group's size (groups are
    numbered 0..n-1 in order of first appearance)."""
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    if sorted(set(groups.tolist())) != list(range(n_groups)):
        raise ValueError(f"groups must number 0..n-1, got {groups.tolist()}")
    share = np.zeros((len(groups), n_groups))
    share[np.arange(len(groups)), groups] = 1.0
    return share / share.sum(axis=0, keepdims=True)


def best_trials(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    trials: Sequence[np.ndarray],
    used: Sequence[np.ndarray],
    n_classes: int,
    average: Average,
    desc: str,
) -> list[tuple[int, OofTally]]:
    """For each fit s, the index of the best of its candidates trials[s] ((T, M, C) weights) by the
    `average` mIoU on the folds where used[s] is True, and its tally (one predictor); ties go to the
    earliest trial.

    Fits often share candidates: each distinct one is scored once, every fit's in one pass over the images.
    """
    flat = np.concatenate(trials)
    distinct, inverse = np.unique(flat.reshape(len(flat), -1), axis=0, return_inverse=True)
    tally = candidate_tally(members, truth, distinct.reshape(-1, *flat.shape[1:]), n_classes, average, desc)
    inverse, picked, start = inverse.ravel(), [], 0
    for own_trials, mask in zip(trials, used, strict=True):
        own = inverse[start : start + len(own_trials)]  # this fit's trials, in its order
        best = best_candidate(tally.score(mask)[own])
        picked.append((int(best), tally.take([own[best]])))
        start += len(own_trials)
    return picked


def _with_column(weights: np.ndarray, column: int, values: np.ndarray) -> np.ndarray:
    out = weights.copy()
    out[:, column] = values
    return out


def write_ensemble_labels(
    members: Sequence[Sequence[StoredProbabilities]],
    fold_weights: np.ndarray,
    shape_of: Callable[[str], tuple[int, int]],
    write: Callable[[int, str, np.ndarray], None],
) -> None:
    """The ensemble's cross-validated OOF labels: fold k's images merged with fold_weights[k] (fitted
    without fold k), argmax at each image's own size `shape_of(file_name)`; `write(k, name, mask)`."""
    for k, weights in enumerate(torch.from_numpy(np.asarray(fold_weights, dtype=np.float32))):
        fold = [member[k] for member in members]
        for index, name in enumerate(tqdm(fold[0].file_names, f"ensemble OOF labels, fold {k}")):
            probs = [stored.probabilities(index) for stored in fold]
            write(k, name, merged_labels(probs, weights[None], shape_of(name))[0].numpy())


def scores(tally: OofTally, folds: Sequence[int], classes: Sequence[str]) -> dict:
    """The report of one predictor (a tally of one) by the tally's average: OOF mIoU over every fold, fold
    mIoUs (mean, population std, each), and per-class IoU over every fold."""
    if len(tally) != 1:
        raise ValueError(f"scores reports one predictor, got {len(tally)}")
    fold_miou = [float(tally.score(np.arange(len(folds)) == k)[0]) for k in range(len(folds))]
    return {
        "oof_miou": float(tally.score(np.ones(len(folds), dtype=bool))[0]),
        "fold_miou_mean": float(np.nanmean(fold_miou)),
        "fold_miou_std": float(np.nanstd(fold_miou)),
        "folds": {str(k): v for k, v in zip(folds, fold_miou, strict=True)},
        "iou": dict(zip(classes, tally.class_iou()[0].tolist(), strict=True)),
    }


def named_weights(weights: np.ndarray, names: Sequence[str], classes: Sequence[str]) -> dict:
    """(M, C) weights as {member: weight} when every class has the same one, else {member: {class: w}}."""
    per_class = bool(np.any(weights != weights[:, :1]))
    return {
        name: dict(zip(classes, row.tolist(), strict=True)) if per_class else float(row[0])
        for name, row in zip(names, weights, strict=True)
    }


@dataclass(frozen=True)
class FittedWeights:
    """What the ensemble stage hands predict: which (model, fold) checkpoints, merged with which weights,
    and how the merged probabilities become labels."""

    members: list[str]  # model recipe names
    folds: list[int]  # every member's folds, averaged with equal weights
    classes: list[str]
    weights: list[list[float]]  # (M, C): one weight per member and class
    # Calibration and post-processing, decided on every fold (default: plain argmax).
    decision: LabelDecision = dataclasses.field(default_factory=LabelDecision)


def write_weights(path: str | Path, fitted: FittedWeights) -> None:
    """`fitted` as JSON, atomically."""
    raw = {f.name: getattr(fitted, f.name) for f in dataclasses.fields(fitted) if f.name != "decision"}
    write_json(path, {**raw, "decision": fitted.decision.to_json(fitted.classes)})


def read_weights(path: str | Path, classes: Sequence[str]) -> FittedWeights:
    """A file `write_weights` wrote, checked against the data's `classes`; anything else is a UserError."""
    try:
        raw = json.loads(Path(path).read_text())
        fitted = FittedWeights(
            [str(m) for m in raw["members"]],
            [int(k) for k in raw["folds"]],
            [str(c) for c in raw["classes"]],
            [[float(w) for w in row] for row in raw["weights"]],
        )
        if fitted.classes == list(classes):
            fitted = dataclasses.replace(fitted, decision=LabelDecision.from_json(raw["decision"], classes))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: not an ensemble weights file ({exc!r}); re-run the ensemble stage"
        ) from None
    shape_ok = len(fitted.weights) == len(fitted.members) and all(
        len(r) == len(classes) for r in fitted.weights
    )
    if fitted.classes != list(classes) or not shape_ok:
        raise UserError(
            f"{path}: fitted for other classes or members than the data's (re-run the ensemble stage)"
        )
    return fitted
