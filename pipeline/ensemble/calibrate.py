"""Per-class probability scales fitted on out-of-fold probabilities to maximise mIoU, nested like the weights.

Argmax over probabilities is not what maximises mIoU when a class is rare: a model that gives a small
object 0.3 while background holds 0.5 loses it at every pixel. A scale per class on the merged
probabilities (labels = argmax_c s_c p_c, i.e. an offset log s_c per class on the log-probabilities)
moves each class's decision boundary (scaling a merged class is scaling its column of the member
weights). Background keeps scale 1: only the ratios matter.

The scales are fitted by one round of coordinate ascent over the classes from 1 (scale 1 tried first, so
a tie keeps the class as it was), for all folds and for each fold left out from that fold's weights: fold
k's scales never saw fold k, and the pooled folds give the honest score.

While class c's scale is tried, every other class keeps its merged value, so a trial only decides, pixel
by pixel, whether class c beats the best of the others: each image is merged once per fit, and each
trial is a comparison instead of a merge and an argmax over every class (`scale_trial_labels`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.geometry import class_argmax
from pipeline.data.probstore import StoredProbabilities
from pipeline.ensemble.fit import (
    OofTally,
    best_candidate,
    cross_validated,
    labels_tally,
    merged_labels,
    resized_members,
)
from pipeline.metrics import Average

# Powers of sqrt(2) from 1/4 to 8, identity first; upwards further than downwards because the classes
# argmax loses are the rare ones, whose probabilities need lifting.
SCALES = (1.0, *(2.0 ** (k / 2) for k in range(-4, 7) if k != 0))


@dataclass(frozen=True)
class CalibrationFit:
    """Per-class scales fitted on every fold (for predict) and without each fold, and their tallies."""

    scales: np.ndarray  # float64 (C,): fitted on every fold, background's 1
    fold_scales: np.ndarray  # float64 (K, C): fold k's, fitted on the other folds
    cross_validated: OofTally  # one predictor: fold k scored with its weights and fold_scales[k]
    in_sample: OofTally  # one predictor: `scales` on the folds that chose them


def fit_calibration(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    n_classes: int,
    fold_weights: np.ndarray,
    weights: np.ndarray,
    average: Average = "dataset",
) -> CalibrationFit:
    """Scales for the ensemble merged with fold_weights[k] ((K, M, C), without fold k) on fold k and with
    `weights` ((M, C)) on every fold, by coordinate ascent over classes 1..C-1 on `SCALES`."""
    if n_classes < 2:
        raise ValueError("calibration needs a class besides background")
    n_folds = len(fold_weights)
    fits = [np.asarray(w, dtype=np.float64) for w in fold_weights] + [np.asarray(weights, np.float64)]
    used = [np.arange(n_folds) != k for k in range(n_folds)] + [np.ones(n_folds, dtype=bool)]
    scales = np.ones((len(fits), n_classes))
    tallies: list[OofTally] = []
    for c in range(1, n_classes):
        # Fit s's trials: its merge with its scales so far, class c's replaced by each of SCALES.
        trial_scales = np.repeat(scales[:, None], len(SCALES), axis=1)  # (S, T, C)
        trial_scales[:, :, c] = SCALES
        candidates = np.stack(fits)[:, None] * trial_scales[:, :, None, :]  # (S, T, M, C)
        trials = torch.from_numpy(candidates.astype(np.float32))
        labels = functools.partial(scale_trial_labels, trials=trials, c=c)
        n_trials = len(fits) * len(SCALES)
        tally = labels_tally(members, truth, labels, n_trials, n_classes, average, f"class {c} scale")
        tallies = []
        for s, mask in enumerate(used):
            own = np.arange(s * len(SCALES), (s + 1) * len(SCALES))
            best = best_candidate(tally.take(own).score(mask))
            scales[s, c] = SCALES[best]
            tallies.append(tally.take([own[best]]))
    return CalibrationFit(
        scales=scales[-1],
        fold_scales=scales[:-1],
        cross_validated=cross_validated(tallies[:-1]),
        in_sample=tallies[-1],
    )


def scale_trial_labels(
    probs: Sequence[torch.Tensor], shape: tuple[int, int], trials: torch.Tensor, c: int
) -> list[torch.Tensor]:
    """The uint8 (H, W) labels at `shape` of every trial weighting trials[s, t] ((S, T, M, C), the trials
    of fit s differing only in column `c`), in (s, t) order: what `fit.merged_labels` gives for the flat
    (S * T, M, C) candidates, up to float rounding where class c ties another to the last bit.

    Per fit the members are merged once; a trial then only decides where class c wins: argmax returns the
    first maximal index, so c wins over an earlier class only when strictly higher, over a later one when
    at least equal, and elsewhere the label is the argmax of the other classes.
    """
    n_members, n_classes = trials.shape[2:]
    resized = resized_members(probs, shape)
    if resized is None:  # a photo too large: the general path, in strips
        return merged_labels(probs, trials.reshape(-1, n_members, n_classes), shape)
    labels = []
    for fit in trials:
        merged = torch.einsum("mc,mchw->chw", fit[0], resized)  # every class but c is the same in each trial
        earlier = merged[:c].amax(0)
        later = merged[c + 1 :].amax(0) if c + 1 < n_classes else None
        merged[c] = -torch.inf
        others = class_argmax(merged)
        for weights in fit:
            value = torch.einsum("m,mhw->hw", weights[:, c], resized[:, c])
            wins = value > earlier if later is None else (value > earlier) & (value >= later)
            labels.append(torch.where(wins, torch.tensor(c, dtype=torch.uint8), others))
    return labels
