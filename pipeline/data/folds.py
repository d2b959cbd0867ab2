"""Multi-label stratified K-fold: which classes each image holds, and folds that balance them."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError


def make_folds(
    presence: np.ndarray, n_splits: int, seed: int, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Fold index (0..n_splits-1) per image, by iterative stratification on the foreground classes.

    presence: bool (N, C), the manifest's: the classes each mask holds. Stratifies on columns 1..C-1 plus
    an "empty" column (image holds no foreground class), so images without objects spread evenly too.
    Deterministic for a seed. Warns, naming the class, when a class is in fewer images than folds: some
    validation folds then never see it. Returns int64 (N,).
    """
    presence = np.asarray(presence, dtype=bool)
    n_images, n_classes = presence.shape
    if n_images < n_splits:
        raise ValueError(f"{n_images} images cannot fill {n_splits} folds")
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(n_classes)]
    for c, count in enumerate(presence.sum(axis=0)[1:], start=1):
        if count < n_splits:
            warnings.warn(
                f"class '{names[c]}' is in {count} training image(s), fewer than {n_splits} folds: "
                "some folds will have none of it to validate on",
                stacklevel=2,
            )
    foreground = presence[:, 1:]
    labels = np.column_stack([foreground, ~foreground.any(axis=1)])
    # Imported here: it pulls in scikit-learn and SciPy (1.5 s), which the stages that only read folds.csv
    # (every train and oof stage) would otherwise import for nothing.
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = np.full(n_images, -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(n_images), labels)):
        folds[held_out] = fold
    return folds


def fold_class_counts(
    presence: np.ndarray, folds: np.ndarray, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Images holding each class, per fold: rows `fold0`.., columns the foreground classes (int64)."""
    presence = np.asarray(presence, dtype=bool)
    folds = np.asarray(folds)
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(presence.shape[1])]
    if len(names) != presence.shape[1]:
        raise ValueError(f"{len(names)} class names for {presence.shape[1]} presence columns")
    n_splits = int(folds.max()) + 1 if len(folds) else 0
    counts = np.array([presence[folds == k].sum(axis=0) for k in range(n_splits)], dtype=np.int64)
    return pd.DataFrame(
        counts.reshape(n_splits, presence.shape[1])[:, 1:],
        index=[f"fold{k}" for k in range(n_splits)],
        columns=names[1:],
    )


def read_folds(path: str | Path, file_names: Iterable[str], source: str | Path) -> dict[str, int]:
    """folds.csv (image_id,fold) -> {image_id: fold}; it must list exactly `file_names` (from `source`)."""
    path = Path(path)
    try:
        # Image ids are file names: none is a missing value, not even one called "NA" or "null".
        table = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{path}: folds file not found (run the split stage)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc}); re-run the split stage") from None
    if list(table.columns) != ["image_id", "fold"]:
        raise UserError(f"{path}: expected columns image_id,fold, got {','.join(map(str, table.columns))}")
    if not pd.api.types.is_integer_dtype(table["fold"]):
        raise UserError(f"{path}: column 'fold' must hold integers")
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise UserError(f"{path}: image_id '{duplicated.iloc[0]}' is listed twice")
    folds = {
        str(image_id): int(fold) for image_id, fold in zip(table["image_id"], table["fold"], strict=True)
    }
    names = set(file_names)
    stray = next((name for name in folds if name not in names), None)
    missing = next((name for name in names if name not in folds), None)
    if stray is not None or missing is not None:
        example = stray if stray is not None else missing
        raise UserError(f"{path}: does not match {source} (e.g. '{example}'); re-run the split stage")
    return folds


def held_out_mask(file_names: Sequence[str], fold_of: dict[str, int], fold: int) -> np.ndarray:
    """bool (N,): which of `file_names` (in manifest order) fold `fold` holds out, by `read_folds`'s map.
    The one definition of a fold's split: training takes the rest, the oof stage predicts these."""
    return np.array([fold_of[name] == fold for name in file_names], dtype=bool).reshape(len(file_names))
