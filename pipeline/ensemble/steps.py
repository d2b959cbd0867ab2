"""The ensemble stage's decisions on OOF in order (weights, calibration, post-processing), each scored nested.

Every step is decided on all folds (what predict applies) and, for the cross-validated score, without
each fold in turn and applied to it; the OOF labels written are that nested ensemble's. Each step's
honest and in-sample scores are kept, so a report (and `dvc metrics diff`) shows what each step earned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import EnsembleParams, Recipe
from pipeline.data.probstore import StoredProbabilities
from pipeline.ensemble.calibrate import fit_calibration
from pipeline.ensemble.decision import LabelDecision
from pipeline.ensemble.fit import (
    FoldConfusions,
    ImageIous,
    OofTally,
    fit_ensemble,
    named_weights,
    scores,
    write_ensemble_labels,
)
from pipeline.ensemble.postprocess import ClassRule, ComponentTableBuilder, apply_rules, fit_postprocess
from pipeline.metrics import Average, image_ious, image_mious


@dataclass(frozen=True)
class Step:
    """One decision's scores: nested (chosen without the fold it scores) and in-sample."""

    cross_validated: OofTally
    in_sample: OofTally


@dataclass(frozen=True)
class OofDecisions:
    """Everything the ensemble stage decided, and the evidence of each step."""

    weights: np.ndarray  # (M, C): fitted on every fold
    fold_weights: np.ndarray  # (K, M, C): fold k's, without fold k (before calibration)
    members: OofTally  # M predictors: each member alone
    decision: LabelDecision  # calibration and post-processing decided on every fold
    fold_scales: np.ndarray | None  # (K, C) or None without calibration
    fold_rules: list[list[ClassRule]] | None  # K lists of per-class rules, or None without post-processing
    steps: dict[str, Step]  # "weights", then "calibration" and "postprocess" where enabled


def decide_on_oof(
    members: Sequence[Sequence[StoredProbabilities]],
    truth: Callable[[str], np.ndarray],
    shape_of: Callable[[str], tuple[int, int]],
    n_classes: int,
    fitting: EnsembleParams,
    average: Average,
    write: Callable[[int, str, np.ndarray], None],
    read: Callable[[int, str], np.ndarray],
    groups: Sequence[int] | None = None,
) -> OofDecisions:
    """Fit the weights, then (where `fitting` enables them) the class scales and the post-processing rules.

    truth(file_name): uint8 (H, W) truth at the image's own size `shape_of(file_name)`. write(k,
    file_name, labels) receives the nested ensemble's OOF labels of fold position k at that size;
    read(k, file_name) gives them back, for post-processing to rewrite them. groups: members sharing one
    weight (`fit_ensemble`; `seed_groups`).
    """
    fit = fit_ensemble(members, truth, n_classes, fitting.grid_step, fitting.per_class, average, groups)
    steps = {"weights": Step(fit.cross_validated, fit.in_sample)}
    fold_weights, class_scales, fold_scales = fit.fold_weights, None, None
    if fitting.calibrate:
        calibration = fit_calibration(members, truth, n_classes, fit.fold_weights, fit.weights, average)
        steps["calibration"] = Step(calibration.cross_validated, calibration.in_sample)
        fold_scales = calibration.fold_scales
        fold_weights = fit.fold_weights * fold_scales[:, None, :]
        class_scales = calibration.scales.tolist()

    builder = ComponentTableBuilder(n_classes) if fitting.postprocess else None

    def write_and_collect(k: int, name: str, labels: np.ndarray) -> None:
        write(k, name, labels)
        if builder is not None:
            builder.add(k, labels, truth(name))

    write_ensemble_labels(members, fold_weights, shape_of, write_and_collect)
    rules, fold_rules = [], None
    if builder is not None:
        table = builder.build()
        n_folds = len(fold_weights)
        post = fit_postprocess(table, n_folds, average)
        steps["postprocess"] = Step(
            per_image_tally(post.cross_validated, table.fold, n_folds, average),
            per_image_tally(post.in_sample, table.fold, n_folds, average),
        )
        for k, own_rules in enumerate(post.fold_rules):
            if any(rule.active for rule in own_rules):
                for name in members[0][k].file_names:
                    write(k, name, apply_rules(read(k, name), own_rules))
        fold_rules = post.fold_rules
        rules = post.rules if any(rule.active for rule in post.rules) else []
    return OofDecisions(
        weights=fit.weights,
        fold_weights=fit.fold_weights,
        members=fit.members,
        decision=LabelDecision(class_scales, rules),
        fold_scales=fold_scales,
        fold_rules=fold_rules,
        steps=steps,
    )


def seed_groups(recipes: Sequence[Recipe]) -> list[int]:
    """Each recipe's group, numbered in order of first appearance: recipes equal but for their name and
    their distinct `train.seed`s (seed copies, as `models.<name>.seeds` writes them) share one. Recipes
    equal in every setting, seed included, are not copies of a seed ensemble: each keeps its own."""
    keys = []
    for recipe in recipes:
        raw = recipe.model_dump()
        del raw["name"], raw["train"]["seed"]
        keys.append(json.dumps(raw, sort_keys=True, default=str))
    seeds = [recipe.train.seed for recipe in recipes]
    shared = list(keys)
    for i, key in enumerate(shared):
        same = [seeds[j] for j, other in enumerate(shared) if other == key]
        if len(set(same)) < len(same):
            keys[i] = f"{key}#{i}"
    numbers: dict[str, int] = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def per_image_tally(cms: np.ndarray, fold: np.ndarray, n_folds: int, average: Average) -> OofTally:
    """One predictor's tally from its per-image confusion matrices (N, C, C) and the images' folds."""
    if average == "dataset":
        return FoldConfusions(np.stack([cms[fold == k].sum(axis=0) for k in range(n_folds)])[None])
    return ImageIous(fold, image_mious(cms)[None], image_ious(cms).astype(np.float32)[None])


def oof_report(
    decided: OofDecisions,
    names: Sequence[str],
    folds: Sequence[int],
    classes: Sequence[str],
    average: Average,
) -> dict:
    """The ensemble stage's report: the nested ensemble's scores, each step's (nested and in-sample, per
    class), each member's, and what was decided on every fold and without each."""
    models = {name: scores(decided.members.take([m]), folds, classes) for m, name in enumerate(names)}
    best = max(models, key=lambda name: np.nan_to_num(models[name]["oof_miou"], nan=-1.0))
    # Members are not fitted: their OOF scores are honest as they stand (the best one is picked, though).
    steps: dict[str, dict] = {"members": {"oof_miou": models[best]["oof_miou"], "best": best}}
    for name, step in decided.steps.items():
        steps[name] = {
            **scores(step.cross_validated, folds, classes),
            # Optimistic: the same folds chose and judge this step. The nested score above is the honest one.
            "in_sample_miou": scores(step.in_sample, folds, classes)["oof_miou"],
        }
    final = list(decided.steps.values())[-1]
    fold_decisions = {}
    for k, fold in enumerate(folds):
        scales = None if decided.fold_scales is None else decided.fold_scales[k].tolist()
        rules = [] if decided.fold_rules is None else decided.fold_rules[k]
        fold_decisions[str(fold)] = LabelDecision(scales, rules).to_json(classes)
    return {
        "average": average,  # of every mIoU and IoU below, and the one every step maximises
        "ensemble": scores(final.cross_validated, folds, classes),
        "in_sample_miou": scores(final.in_sample, folds, classes)["oof_miou"],
        "steps": steps,
        "models": models,
        "weights": named_weights(decided.weights, names, classes),
        "fold_weights": {
            str(k): named_weights(w, names, classes) for k, w in zip(folds, decided.fold_weights, strict=True)
        },
        "decision": decided.decision.to_json(classes),
        "fold_decisions": fold_decisions,
    }
