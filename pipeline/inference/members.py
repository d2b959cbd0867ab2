"""The fitted ensemble's members at inference: their fold (and refit) checkpoints, loaded with their TTA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.config import RefitParams
from pipeline.ensemble.fit import FittedWeights
from pipeline.errors import UserError
from pipeline.inference.infer import Member, load_ensemble, resolve_tta
from pipeline.models.checkpoints import REFIT_FILE


def member_checkpoints(
    models: Path, fitted: FittedWeights, refits: Path | None = None
) -> dict[str, list[Path]]:
    """Each member's `models/<member>/fold<k>/best.pt`, for the folds the ensemble was fitted on, then
    with `refits` its refit model `refits/<member>/final.pt`; a missing one is a UserError naming it and
    the stage that writes it."""
    checkpoints = {}
    for name in fitted.members:
        paths = [models / name / f"fold{k}" / "best.pt" for k in fitted.folds]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            raise UserError(
                f"{missing}: checkpoint of ensemble member '{name}' not found (run its train stage)"
            )
        if refits is not None:
            paths.append(refits / name / REFIT_FILE)
            if not paths[-1].is_file():
                raise UserError(
                    f"{paths[-1]}: refit model of '{name}' not found (refit.enabled: run stage refit@{name})"
                )
        checkpoints[name] = paths
    return checkpoints


def checkpoints_and_shares(
    models: Path, refits: Path, fitted: FittedWeights, refit: RefitParams
) -> tuple[dict[str, list[Path]], list[float] | None]:
    """What predict and export load: `member_checkpoints`, with each member's refit model when
    `refit.enabled`, and the shares of a member's checkpoints (None: equal, the folds alone)."""
    if not refit.enabled:
        return member_checkpoints(models, fitted), None
    return member_checkpoints(models, fitted, refits), refit_shares(len(fitted.folds), refit.weight)


def refit_shares(n_folds: int, weight: float) -> list[float]:
    """A member's model shares with a refit model: the folds' equal parts of 1 - `weight`, then `weight`
    (params refit.weight: set, not fitted, since a model that saw every image has no OOF)."""
    return [(1 - weight) / n_folds] * n_folds + [weight]


def load_members(
    checkpoints: Mapping[str, Sequence[Path]],
    classes: Sequence[str],
    tta: str,
    shares: Sequence[float] | None = None,
) -> list[Member]:
    """Each member's models with the TTA `tta` resolves to for them (`resolve_tta`), averaged with
    `shares` (one per checkpoint; None: equal); a member trained on other classes than `classes` is a
    UserError naming its first checkpoint."""
    members = []
    for name, paths in checkpoints.items():
        folds = load_ensemble(paths)
        if folds.classes != list(classes):
            raise UserError(f"{paths[0]}: classes {folds.classes} differ from the data's {list(classes)}")
        members.append(
            Member(name, folds, resolve_tta(tta, folds.augments), None if shares is None else list(shares))
        )
    return members
