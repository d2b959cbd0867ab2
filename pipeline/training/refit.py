"""A recipe's refit: one more model trained on every training image for the epochs CV chose, no validation."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Recipe
from pipeline.data.images import objects_path
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError
from pipeline.models.checkpoints import REFIT_FILE, checkpoint_state, load_checkpoint, save_checkpoint
from pipeline.progress import epoch_line
from pipeline.training.dataset import build_train_loader
from pipeline.training.fold_data import check_train_params, load_pseudo, training_set
from pipeline.training.resume import run_fingerprint
from pipeline.training.runtime import Runtime, seed_everything
from pipeline.training.state import resume_state
from pipeline.training.train import pseudo_files, start_training, train_one_epoch
from pipeline.training.weightmap import boundary_weighting


@dataclass(frozen=True)
class RefitPaths:
    """What one recipe's refit reads and writes; dvc.yaml names every one of these."""

    root: Path  # images are root/file_name
    manifest: Path  # the masks stage's manifest
    masks: Path  # one PNG per training image
    model_dir: Path  # final.pt and the resume state last.pt
    pseudo: Path | None = None  # the pseudo stage's folder, as in training a fold


def refit_epochs(configured: int | None, best_epochs: Sequence[int]) -> int:
    """The refit's epoch count: `configured` (refit.epochs), else the median of the folds' best epochs
    (counted from 1), the upper middle one for an even count: CV's estimate of how long to train."""
    if configured is not None:
        return configured
    if not best_epochs:
        raise ValueError("refit_epochs needs the folds' best epochs when refit.epochs is null")
    return int(statistics.median_high(best_epochs))


def fold_best_epochs(checkpoints: Sequence[Path]) -> list[int]:
    """Each fold's best.pt epoch counted from 1 (a top-k average counts as its best single epoch)."""
    epochs = []
    for path in checkpoints:
        if not path.is_file():
            raise UserError(f"{path}: missing; the refit's epoch count is read from the folds' best.pt")
        epoch = load_checkpoint(path).get("epoch")
        if not isinstance(epoch, int):
            raise UserError(f"{path}: no best epoch recorded (re-run its train stage)")
        epochs.append(epoch + 1)
    return epochs


def refit(
    recipe: Recipe, num_workers: int, paths: RefitPaths, runtime: Runtime, epochs: int
) -> dict[str, Any]:
    """Train `recipe` on every training image (and the pseudo-labelled ones) for `epochs` epochs, the
    warmup-cosine schedule spanning them, and save the last epoch's weights (the EMA's when
    `train.ema` is on) as `REFIT_FILE`. Nothing is validated, so `train.val_every` and `train.average_top_k`
    do not apply. Resumes after the last finished epoch like `train.fit` (last.pt, same fingerprint),
    bit for bit on CPU. Returns {"epochs", "train_loss"} on the main process ({} on others).
    """
    train = recipe.train.model_copy(update={"epochs": epochs})
    recipe = recipe.model_copy(update={"train": train})
    manifest = read_manifest(paths.manifest)
    classes, names = manifest.classes, manifest.train_names()
    check_train_params(train, recipe.name, len(classes))
    pseudo = None if paths.pseudo is None else load_pseudo(paths.pseudo, classes)
    # Class presence of every training item: the annotated images, then the pseudo-labelled ones.
    presence = manifest.presence if pseudo is None else np.vstack([manifest.presence, pseudo.presence])
    inputs = [paths.manifest] + ([objects_path(paths.masks)] if recipe.augment.copy_paste > 0 else [])
    # This module shapes only the refit's weights, not the folds': it is read here, not by every run.
    extra_files = [Path(__file__), *pseudo_files(pseudo, paths.root)]
    fingerprint = run_fingerprint(
        recipe,
        None,
        runtime.world_size,
        inputs,
        paths.root,
        paths.masks,
        names,
        average="none",  # nothing is scored
        execution=runtime.execution(),
        extra_files=extra_files,
    )
    boundary = boundary_weighting(train, len(classes))
    dataset, weights = training_set(
        recipe.augment, paths.root, names, paths.masks, presence, boundary, pseudo
    )
    loader = build_train_loader(
        dataset,
        train.batch_size,
        num_workers,
        weights,
        runtime.distributed,
        seed=train.seed,
        pin_memory=runtime.device.type == "cuda",
    )
    state, loss_fn, resume = start_training(
        recipe, len(classes), runtime, paths.model_dir, fingerprint, len(loader)
    )
    history: list[dict[str, float]] = resume["history"] if resume else []
    run_name = f"{recipe.name} refit"
    if runtime.is_main and resume:
        print(f"resuming {run_name} from epoch {len(history) + 1}/{epochs}", flush=True)

    since = time.perf_counter()
    for epoch in range(len(history), epochs):
        seed_everything(train.seed + epoch)
        loader.sampler.set_epoch(epoch)
        lr = state.optimizer.param_groups[0]["lr"]
        loss = train_one_epoch(
            state, loader, loss_fn, runtime, train, f"{run_name} epoch {epoch + 1}/{epochs}"
        )
        if not math.isfinite(loss):
            raise UserError(
                f"params: {run_name} diverged in epoch {epoch} (loss {loss}); "
                f"lower models.{recipe.name}.train.lr"
            )
        history.append({"train_loss": loss, "lr": lr})
        if runtime.is_main:
            now = time.perf_counter()
            print(epoch_line(run_name, epoch + 1, epochs, loss, None, lr, now - since), flush=True)
            since = now
            last = resume_state(state, fingerprint, history, -math.inf, None, None, [])
            save_checkpoint(paths.model_dir / "last.pt", last)

    if not runtime.is_main:
        return {}
    # Written again, to the same bits, by a resumed run that finds every epoch done: a kill while
    # writing it leaves nothing to repair.
    final = checkpoint_state(state.kept, recipe.model, classes, recipe.augment, epochs - 1, math.nan, None)
    extra = {"fingerprint": fingerprint, "recipe": recipe.name, "refit": True}
    save_checkpoint(paths.model_dir / REFIT_FILE, {**final, **extra})
    return {"epochs": epochs, "train_loss": history[-1]["train_loss"]}
