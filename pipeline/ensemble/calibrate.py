"""Per-class probability scales fitted on out-of-fold probabilities to maximise mIoU, nested like the weights.

Argmax over probabilities is not what maximises mIoU when a class is rare: a model that gives a small
object 0.3 while background holds 0.5 loses it at every pixel. A scale per class on the merged
probabilities (labels = argmax_c s_c p_c, i.e. an offset log s_c per class on the log-probabilities)
moves each class's decision boundary. Scaling a merged class is scaling its column of the member
weights, so a trial scale is one more candidate weighting for `fit.candidate_tally` and costs nothing
extra per image. Background keeps scale 1: only the ratios matter.

The scales are fitted by one round of coordinate ascent over the classes from 1 (scale 1 tried first, so
a tie keeps the class as it was), for all folds and for each fold left out from that fold's weights: fold
k's scales never saw fold k, and the pooled folds give the honest score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.probstore import StoredProbabilities
from pipeline.ensemble.fit import OofTally, best_trials, cross_validated
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
        trials = []
        for s, w in enumerate(fits):
            trial_scales = np.repeat(scales[s][None], len(SCALES), axis=0)
            trial_scales[:, c] = SCALES
            trials.append(w[None] * trial_scales[:, None, :])  # (T, M, C)
        picked = best_trials(members, truth, trials, used, n_classes, average, f"class {c} scale")
        for s, (index, _) in enumerate(picked):
            scales[s, c] = SCALES[index]
        tallies = [tally for _, tally in picked]
    return CalibrationFit(
        scales=scales[-1],
        fold_scales=scales[:-1],
        cross_validated=cross_validated(tallies[:-1]),
        in_sample=tallies[-1],
    )
