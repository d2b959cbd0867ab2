"""Ensemble weights fitted on out-of-fold probabilities, and the ensemble's cross-validated OOF score.

Members are model recipes; each contributes, for every training image, the probabilities its model of
that image's fold predicted (it never saw the image). A candidate weighting is scored by the mIoU of
the weighted mean's argmax at each image's own size, over one confusion matrix per fold. Every
candidate is scored on every fold in one pass over the images, so fitting without fold k (for the
cross-validated score) costs no extra pass: weights_k = the best candidate on the other folds, scored
on fold k, and the K scored folds pooled into one matrix give the honest OOF mIoU. The weights used
for the test set are the best candidate over all folds.
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
from pipeline.errors import UserError
from pipeline.geometry import resize_argmax
from pipeline.infer import merge_probabilities
from pipeline.metrics import confusion_matrix_torch, iou_per_class, mean_iou
from pipeline.oof import OofProbabilities


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
    n_classes = probs[0].shape[0]
    if len(probs) * n_classes * shape[0] * shape[1] * 4 > RESIZED_BYTES:
        return [resize_argmax(merge_probabilities(probs, weights), shape) for weights in candidates]
    resized = torch.stack([F.interpolate(p[None], size=shape, mode="bilinear")[0] for p in probs])
    return [
        torch.einsum("mc,mchw->chw", weights, resized).argmax(0).to(torch.uint8) for weights in candidates
    ]


def candidate_confusions(
    members: Sequence[Sequence[OofProbabilities]],
    truth: Callable[[str], np.ndarray],
    candidates: np.ndarray,
    n_classes: int,
    desc: str = "scoring weights",
) -> np.ndarray:
    """int64 (G, K, C, C): the confusion matrix of every candidate weighting on every fold.

    members[m][k]: member m's stored probabilities of fold k (all members list the same images per fold).
    truth(file_name): uint8 (H, W) truth at the image's own size. candidates: (G, M, C) weights.
    """
    n_folds = len(members[0])
    cms = torch.zeros((len(candidates), n_folds, n_classes, n_classes), dtype=torch.int64)
    weights = torch.from_numpy(np.asarray(candidates, dtype=np.float32))
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
            for g, pred in enumerate(merged_labels(probs, weights, tuple(mask.shape))):
                cms[g, k] += confusion_matrix_torch(mask, pred, n_classes)
            progress.update()
    progress.close()
    return cms.numpy()


def best_candidate(cms: np.ndarray, folds: np.ndarray) -> int:
    """Index of the candidate with the highest mIoU over the folds where `folds` (bool (K,)) is True.

    cms: (G, K, C, C). Ties go to the earliest candidate; a NaN score never wins.
    """
    scores = np.array([mean_iou(cm) for cm in cms[:, folds].sum(axis=1)])
    return int(np.argmax(np.nan_to_num(scores, nan=-1.0)))


@dataclass(frozen=True)
class EnsembleFit:
    """Fitted weights and the confusion matrices that judge them (folds in `folds` order)."""

    weights: np.ndarray  # (M, C) fitted on every fold: what predict uses
    fold_weights: np.ndarray  # (K, M, C): fold k's weights, fitted on the other folds
    fold_confusion: np.ndarray  # (K, C, C): fold k scored with fold_weights[k]; pooled = the CV score
    member_confusion: np.ndarray  # (M, K, C, C): each member alone
    in_sample_confusion: np.ndarray  # (K, C, C): `weights` scored on the folds that chose them


def fit_ensemble(
    members: Sequence[Sequence[OofProbabilities]],
    truth: Callable[[str], np.ndarray],
    n_classes: int,
    grid_step: float,
    per_class: bool,
) -> EnsembleFit:
    """Fit one weight per member on the simplex grid (and, if `per_class`, then one per member and class
    by one round of coordinate ascent over classes), for all folds and for each fold left out."""
    n_members, n_folds = len(members), len(members[0])
    grid = simplex_grid(n_members, grid_step)
    candidates = np.repeat(grid[:, :, None], n_classes, axis=2)  # (G, M, C)
    cms = candidate_confusions(members, truth, candidates, n_classes)
    # One search per "fit": fold k left out for k < K, all folds for k == K.
    used = [np.arange(n_folds) != k for k in range(n_folds)] + [np.ones(n_folds, dtype=bool)]
    chosen = [candidates[best_candidate(cms, mask)] for mask in used]
    chosen_cms = [cms[best_candidate(cms, mask)] for mask in used]
    if per_class:
        for c in range(n_classes):
            # For every fit, every grid row in column c with the fit's other columns kept: one pass.
            trial = np.stack([_with_column(w, c, row) for w in chosen for row in grid])
            # Fits often share weights: score each distinct candidate once, in the trial order's terms.
            distinct, inverse = np.unique(trial.reshape(len(trial), -1), axis=0, return_inverse=True)
            distinct_cms = candidate_confusions(
                members, truth, distinct.reshape(-1, *trial.shape[1:]), n_classes, desc=f"class {c} weights"
            )
            trial_cms = distinct_cms[inverse.ravel()]
            for s, mask in enumerate(used):
                own = trial_cms[s * len(grid) : (s + 1) * len(grid)]
                best = best_candidate(own, mask)
                chosen[s], chosen_cms[s] = trial[s * len(grid) + best], own[best]
    vertices = [int(np.flatnonzero(grid[:, m] == 1)[0]) for m in range(n_members)]
    return EnsembleFit(
        weights=chosen[-1],
        fold_weights=np.stack(chosen[:-1]),
        fold_confusion=np.stack([chosen_cms[k][k] for k in range(n_folds)]),
        member_confusion=np.stack([cms[g] for g in vertices]),
        in_sample_confusion=chosen_cms[-1],
    )


def _with_column(weights: np.ndarray, column: int, values: np.ndarray) -> np.ndarray:
    out = weights.copy()
    out[:, column] = values
    return out


def write_ensemble_labels(
    members: Sequence[Sequence[OofProbabilities]],
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


def scores(cms: np.ndarray, folds: Sequence[int], classes: Sequence[str]) -> dict:
    """The report of one predictor from its per-fold matrices (K, C, C): pooled OOF mIoU, fold mIoUs
    (mean, population std, each), and per-class IoU of the pooled matrix."""
    fold_miou = [mean_iou(cm) for cm in cms]
    pooled = cms.sum(axis=0)
    return {
        "oof_miou": mean_iou(pooled),
        "fold_miou_mean": float(np.nanmean(fold_miou)),
        "fold_miou_std": float(np.nanstd(fold_miou)),
        "folds": {str(k): v for k, v in zip(folds, fold_miou, strict=True)},
        "iou": dict(zip(classes, iou_per_class(pooled).tolist(), strict=True)),
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
    """What the ensemble stage hands predict: which (model, fold) checkpoints, merged with which weights."""

    members: list[str]  # model recipe names
    folds: list[int]  # every member's folds, averaged with equal weights
    classes: list[str]
    weights: list[list[float]]  # (M, C): one weight per member and class


def write_weights(path: str | Path, fitted: FittedWeights) -> None:
    """`fitted` as JSON, atomically."""
    write_json(path, dataclasses.asdict(fitted))


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
