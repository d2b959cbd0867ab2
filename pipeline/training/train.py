"""Training one (model, fold): the loop. train_one_epoch, evaluate, and fit, which runs them resumably."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.config import Recipe, TrainParams
from pipeline.data.geometry import resize_argmax
from pipeline.data.images import image_path, objects_path
from pipeline.data.pseudo import PseudoSet
from pipeline.errors import UserError
from pipeline.metrics import Average, class_ious, confusion_matrix_torch, score
from pipeline.models.checkpoints import checkpoint_state, save_checkpoint
from pipeline.models.losses import TrainingObjective, build_loss
from pipeline.progress import epoch_line
from pipeline.training import augment
from pipeline.training.fold_data import FoldPaths, build_loaders, check_train_params, load_fold_data
from pipeline.training.live import log_epoch, open_live, write_metrics
from pipeline.training.resume import read_resume_state, run_fingerprint
from pipeline.training.runtime import Runtime, seed_everything
from pipeline.training.state import TrainState, build_train_state, check_side_weights, resume_state
from pipeline.training.topk import averaged_top_k, keep, prune, updated_top_k


def train_one_epoch(
    state: TrainState, loader: DataLoader, loss_fn: nn.Module, runtime: Runtime, train: TrainParams, desc: str
) -> float:
    """One pass over `loader` (at most `train.max_batches` batches); returns the mean loss over all ranks."""
    state.model.train()
    n_batches = batches_per_epoch(len(loader), train.max_batches)
    loss_sum = torch.zeros((), device=runtime.device)
    state.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(itertools.islice(loader, n_batches), desc, total=n_batches, disable=not runtime.is_main)
    for i, batch in enumerate(progress):
        # (images, masks), or (images, masks, boundary weight maps) with train.boundary_w0 > 0
        images, masks = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        pixel_weights = batch[2].to(runtime.device, non_blocking=True) if len(batch) > 2 else None
        group_start = i - i % train.accumulate
        group_size = min(train.accumulate, n_batches - group_start)  # the epoch's last group may be short
        stepping = i == group_start + group_size - 1
        # DDP all-reduces gradients on every backward unless told not to: only the stepping one needs it.
        no_sync = runtime.distributed and not stepping
        with state.model.no_sync() if no_sync else contextlib.nullcontext():
            with runtime.autocast():
                loss = loss_fn(state.model(images), masks, pixel_weights)
            state.scaler.scale(loss / group_size).backward()
        loss_sum += loss.detach()
        if stepping:
            if train.grad_clip is not None:
                state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the fp16-scaled ones
                nn.utils.clip_grad_norm_(state.raw.parameters(), train.grad_clip)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update_parameters(state.raw)
        if runtime.is_main and i % 10 == 0:  # .item() waits for the GPU; not every step
            progress.set_postfix(loss=f"{loss.item():.4f}")
    if runtime.distributed:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (n_batches * runtime.world_size)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, n_classes: int, runtime: Runtime) -> np.ndarray:
    """Per-image confusion matrices, int64 (N, C, C), rows truth, of every rank's images (under DDP
    gathered from all ranks), from which `metrics.score` gives either average of the metric.

    The loader yields `InferenceBatch`es with truth masks (`build_inference_loader` over an
    `ImageDataset` given masks): each image is predicted whole at the model's geometry and scored at
    its own size, as the out-of-fold predictions and the leaderboard are.
    """
    model.eval()
    cms = []
    for batch in loader:
        with runtime.autocast():
            logits = model(runtime.to_device(batch.images))
        probs = logits.float().softmax(dim=1)
        for image_probs, (h, w), mask in zip(probs, batch.shapes, batch.masks, strict=True):
            pred = resize_argmax(image_probs[:, :h, :w], tuple(mask.shape))
            cms.append(confusion_matrix_torch(mask.to(runtime.device), pred, n_classes))
    local = torch.stack(cms).cpu().numpy() if cms else np.zeros((0, n_classes, n_classes), np.int64)
    if runtime.distributed:
        # Each rank saw a disjoint shard of the held-out images; the per-image average needs every image.
        shards: list[np.ndarray | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, local)
        local = np.concatenate(shards)
    return local


def fit(
    recipe: Recipe,
    num_workers: int,
    fold: int,
    paths: FoldPaths,
    runtime: Runtime,
    *,
    average: Average,
) -> dict[str, Any]:
    """Train `recipe` on all folds but `fold`, keep the epoch with the best validation mIoU (by
    `average`, params metric.average) in best.pt: the EMA weights when `train.ema` is on.

    Resumes after the last finished epoch when model_dir/last.pt was written by the same recipe and
    data (`resume.run_fingerprint`); each epoch reseeds from seed + epoch (the model's draws, the data order
    and every item's augmentation), so a resumed run ends like an uninterrupted one: bit for bit on
    CPU, and on a GPU up to the nondeterminism of cuDNN's kernels. Only the main process writes.
    Returns the metrics written to `paths.metrics` (on the main process; other processes return {}).
    """
    train = recipe.train
    data = load_fold_data(fold, paths)
    check_train_params(train, recipe.name, len(data.classes))
    all_names = data.train_names + [image.file_name for image in data.val_images]
    inputs = [paths.folds, paths.manifest]
    if recipe.augment.copy_paste > 0:
        inputs.append(objects_path(paths.masks))
    fingerprint = run_fingerprint(
        recipe,
        fold,
        runtime.world_size,
        inputs,
        paths.root,
        paths.masks,
        all_names,
        average=average,
        execution=runtime.execution(),
        extra_files=pseudo_files(data.pseudo, paths.root),
    )
    train_loader, val_loader = build_loaders(recipe.augment, train, num_workers, data, paths, runtime)
    state, loss_fn, resume = start_training(
        recipe, len(data.classes), runtime, paths.model_dir, fingerprint, len(train_loader)
    )
    history: list[dict[str, float]] = resume["history"] if resume else []
    best_score = resume["best_score"] if resume else -math.inf
    best_epoch, best_iou = (resume["best_epoch"], resume["best_iou"]) if resume else (None, None)
    # train.average_top_k: the k best validated epochs (epoch, score), whose weights are kept on disk.
    top_k: list[tuple[int, float]] = [tuple(item) for item in resume["top_k"]] if resume else []
    if runtime.is_main:
        prune(paths.model_dir, top_k)  # a kill may have left a file last.pt does not name
    if resume and resume["rewrite_best"] and runtime.is_main:
        # Killed between last.pt and best.pt: last.pt's weights, just restored, are best.pt's epoch.
        print(f"{recipe.name} fold {fold}: best.pt rewritten from last.pt (epoch {best_epoch + 1})")
        write_best(
            paths, state.kept, recipe, data.classes, fold, best_epoch, best_score, best_iou, fingerprint
        )
    if runtime.is_main and resume:  # messages count epochs from 1; files index them from 0 (dvclive's step)
        done = len(history)
        print(
            f"resuming {recipe.name} fold {fold} from epoch {done + 1}/{train.epochs}"
            if done < train.epochs
            else f"{recipe.name} fold {fold}: all {done} epochs done; rewriting the outputs from best.pt",
            flush=True,
        )
    elastic_p = train_loader.dataset.elastic_p
    elastic_by_class = augment.elastic_probability_by_class(data.all_presence, elastic_p, data.classes)
    live = open_live(paths.live, fold, elastic_by_class, history) if runtime.is_main else None

    since = time.perf_counter()  # each epoch's line reports its wall time (bench/realsets.py budgets by it)
    for epoch in range(len(history), train.epochs):
        seed_everything(train.seed + epoch)
        train_loader.sampler.set_epoch(epoch)  # this epoch's order and augmentation seeds
        run_name = f"{recipe.name} fold {fold}"
        desc = f"{run_name} epoch {epoch + 1}/{train.epochs}"
        lr = state.optimizer.param_groups[0]["lr"]  # the lr this epoch starts at
        loss = train_one_epoch(state, train_loader, loss_fn, runtime, train, desc)
        if not math.isfinite(loss):
            raise UserError(
                f"params: {recipe.name} fold {fold} diverged in epoch {epoch} (loss {loss}); "
                f"lower models.{recipe.name}.train.lr"
            )
        # Validating a whole held-out fold costs a good share of an epoch on a CPU: train.val_every
        # spaces it out; the last epoch is always validated, so the best checkpoint has seen the end.
        validate = (epoch + 1) % train.val_every == 0 or epoch == train.epochs - 1
        record = {"train_loss": loss, "lr": lr}
        if validate:
            if runtime.distributed:
                # Without SyncBatchNorm (CPU) each rank's last forward updated its own BatchNorm
                # running stats; validate every shard with rank 0's, the ones best.pt stores.
                for buffer in state.kept.buffers():
                    dist.broadcast(buffer, src=0)
            val_start = time.perf_counter()
            cms = evaluate(state.evaluated, val_loader, len(data.classes), runtime)
            val_score = score(cms, average)
            record["val_miou"] = val_score
            val_seconds = time.perf_counter() - val_start
        history.append(record)
        if validate and train.average_top_k > 1:  # on every rank: each takes part in the final average
            top_k = updated_top_k(top_k, epoch, val_score, train.average_top_k)
        if not runtime.is_main:
            continue
        val_miou, val_s = (val_score, val_seconds) if validate else (None, None)
        now = time.perf_counter()
        seconds, since = now - since, now
        print(epoch_line(run_name, epoch + 1, train.epochs, loss, val_miou, lr, seconds, val_s), flush=True)
        log_epoch(live, record)
        # The first validation always saves: even a NaN score leaves a best.pt.
        improved = validate and (val_score > best_score or best_score == -math.inf)
        if improved:
            best_score, best_epoch = val_score, epoch
            best_iou = dict(zip(data.classes, class_ious(cms, average).tolist(), strict=True))
        if any(kept_epoch == epoch for kept_epoch, _ in top_k):
            # This epoch's weights go to disk before last.pt names them; what fell out goes after.
            keep(paths.model_dir, epoch, val_score, state.kept.state_dict())
        # last.pt first: it names the epoch best.pt holds, so a kill between the two writes leaves a
        # best.pt the resumed run rewrites from last.pt's weights (that epoch's) before going on.
        last = resume_state(state, fingerprint, history, best_score, best_epoch, best_iou, top_k)
        save_checkpoint(paths.model_dir / "last.pt", last)
        prune(paths.model_dir, top_k)
        if improved:
            write_best(
                paths, state.kept, recipe, data.classes, fold, epoch, best_score, best_iou, fingerprint
            )

    if train.average_top_k > 1 and len(top_k) > 1:
        if runtime.distributed:
            dist.barrier()  # the main process wrote the kept weights every rank now reads
        write_top_k_average(
            state, val_loader, runtime, paths, recipe, data.classes, fold, top_k, fingerprint, average
        )

    if not runtime.is_main:
        return {}
    live.end()
    return write_metrics(paths.model_dir, paths.metrics)


def start_training(
    recipe: Recipe, n_classes: int, runtime: Runtime, model_dir: Path, fingerprint: str, loader_len: int
) -> tuple[TrainState, nn.Module, dict[str, Any] | None]:
    """What a fold's training and a refit both start from: the model, optimiser and schedule (over
    `recipe.train.epochs` epochs of `loader_len` batches), restored from model_dir/last.pt when its
    fingerprint is `fingerprint`; the loss; and that resume record (None for a fresh start).

    Call it after building the loaders: seeding here, at the same point for a fresh and a resumed run,
    is what makes the model's initial draws the same in both."""
    train = recipe.train
    steps_per_epoch = math.ceil(batches_per_epoch(loader_len, train.max_batches) / train.accumulate)
    seed_everything(train.seed)
    resume = read_resume_state(model_dir, fingerprint)
    state = build_train_state(recipe.model, train, n_classes, runtime, steps_per_epoch * train.epochs, resume)
    check_side_weights(train, recipe.name, recipe.model.arch, state.raw)
    loss = build_loss(train.losses, train.class_weights)
    loss_fn = TrainingObjective(loss, train.side_weights, train.presence_weight).to(runtime.device)
    return state, loss_fn, resume


def pseudo_files(pseudo: PseudoSet | None, root: Path) -> list[Path]:
    """The pseudo-labelled images and their masks, which a run's fingerprint reads besides its inputs."""
    if pseudo is None:
        return []
    return [
        path
        for image in pseudo.images
        for path in (image_path(root, image.file_name), pseudo.mask_path(image))
    ]


def write_top_k_average(
    state: TrainState,
    val_loader: DataLoader,
    runtime: Runtime,
    paths: FoldPaths,
    recipe: Recipe,
    classes: list[str],
    fold: int,
    top_k: list[tuple[int, float]],
    fingerprint: str,
    average: Average,
) -> None:
    """best.pt: the average of the kept epochs' weights, validated. It is computed again, to the same bits,
    by a resumed run that finds every epoch done, so a kill while writing it leaves nothing to repair.

    best.pt's "epoch" stays the best single epoch (what last.pt names, for `read_resume_state`); its score
    is the averaged model's, and "averaged" lists the epochs with their own scores.
    """
    state.kept.load_state_dict(averaged_top_k(paths.model_dir, top_k))
    cms = evaluate(state.evaluated, val_loader, len(classes), runtime)
    if not runtime.is_main:
        return
    val_score = score(cms, average)
    iou = dict(zip(classes, class_ious(cms, average).tolist(), strict=True))
    best_epoch = top_k[0][0]
    singles = ", ".join(f"{epoch + 1}: {s:.4f}" for epoch, s in sorted(top_k))
    print(
        f"{recipe.name} fold {fold}: best.pt = the average of epochs {{{singles}}}, val mIoU {val_score:.4f}"
    )
    averaged = [{"epoch": epoch, "score": s} for epoch, s in top_k]
    write_best(
        paths, state.kept, recipe, classes, fold, best_epoch, val_score, iou, fingerprint, averaged=averaged
    )


def write_best(
    paths: FoldPaths,
    model: nn.Module,
    recipe: Recipe,
    classes: list[str],
    fold: int,
    epoch: int,
    score: float,
    iou: dict[str, float] | None,
    fingerprint: str,
    averaged: list[dict[str, float]] | None = None,
) -> None:
    """best.pt: `model`'s weights (of `epoch`, or the average of the `averaged` epochs) with its score and
    per-class IoU, self-describing."""
    best = checkpoint_state(model, recipe.model, classes, recipe.augment, epoch, score, fold)
    extra = {"iou": iou, "fingerprint": fingerprint, "recipe": recipe.name, "averaged": averaged}
    save_checkpoint(paths.model_dir / "best.pt", {**best, **extra})


def batches_per_epoch(loader_len: int, max_batches: int | None) -> int:
    """Batches one epoch runs: the whole loader, or `train.max_batches` of it."""
    return loader_len if max_batches is None else min(loader_len, max_batches)
