"""The fitted ensemble's members at inference: their fold checkpoints, loaded with their TTA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.ensemble.fit import FittedWeights
from pipeline.errors import UserError
from pipeline.inference.infer import Member, load_ensemble, resolve_tta


def member_checkpoints(models: Path, fitted: FittedWeights) -> dict[str, list[Path]]:
    """Each member's `models/<member>/fold<k>/best.pt`, for the folds the ensemble was fitted on; a
    missing one is a UserError naming it and its train stage."""
    checkpoints = {}
    for name in fitted.members:
        paths = [models / name / f"fold{k}" / "best.pt" for k in fitted.folds]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            raise UserError(
                f"{missing}: checkpoint of ensemble member '{name}' not found (run its train stage)"
            )
        checkpoints[name] = paths
    return checkpoints


def load_members(checkpoints: Mapping[str, Sequence[Path]], classes: Sequence[str], tta: str) -> list[Member]:
    """Each member's fold models with the TTA `tta` resolves to for them (`resolve_tta`); a member
    trained on other classes than `classes` is a UserError naming its first checkpoint."""
    members = []
    for name, paths in checkpoints.items():
        folds = load_ensemble(paths)
        if folds.classes != list(classes):
            raise UserError(f"{paths[0]}: classes {folds.classes} differ from the data's {list(classes)}")
        members.append(Member(name, folds, resolve_tta(tta, folds.augments)))
    return members
