"""Training one (model, fold): train_one_epoch, evaluate and fit, resumable, on one process or many (DDP)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from dvclive import Live
from scmrepo.exceptions import SCMError as GitSCMError
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.config import AugmentParams, Recipe, TrainParams
from pipeline.data import records
from pipeline.data.folds import held_out_mask, read_folds
from pipeline.data.geometry import geometry_of, resize_argmax
from pipeline.data.images import image_path, objects_path
from pipeline.data.loaders import ImageDataset, build_inference_loader
from pipeline.data.manifest import read_manifest
from pipeline.data.pseudo import PseudoSet, read_pseudo
from pipeline.errors import UserError
from pipeline.metrics import Average, class_ious, confusion_matrix_torch, score
from pipeline.models.checkpoints import checkpoint_state, load_checkpoint, save_checkpoint
from pipeline.models.factory import build_model, parameter_groups
from pipeline.models.losses import PIXEL_WEIGHTED_LOSSES, TrainingObjective, build_loss
from pipeline.progress import epoch_line
from pipeline.training import augment
from pipeline.training.copypaste import CopyPaste
from pipeline.training.dataset import ConcatSegmentation, SegmentationDataset, build_train_loader
from pipeline.training.resume import read_resume_state, restore_rng_states, rng_states, run_fingerprint
from pipeline.training.runtime import Runtime, seed_everything
from pipeline.training.weightmap import BoundaryWeighting, boundary_weighting


@dataclass(frozen=True)
class FoldPaths:
    """What one (model, fold)'s run reads and writes; dvc.yaml names every one of these."""

    root: Path  # images are root/file_name
    manifest: Path  # the masks stage's manifest: classes, images, class presence
    masks: Path  # one PNG per training image (stage `masks`)
    folds: Path  # folds.csv: image_id,fold
    model_dir: Path  # best.pt and the resume state last.pt
    metrics: Path  # JSON: the best epoch's validation mIoU and its index
    live: Path  # dvclive per-epoch curves
    # The pseudo stage's output (`pseudo.read_pseudo`): test images with pseudo-labels that join the
    # training part (never validation); None or an empty set: none.
    pseudo: Path | None = None


@dataclass(frozen=True)
class FoldData:
    """The fold's split of the training set."""

    classes: list[str]  # background first
    train_names: list[str]  # file_names of the training images
    val_images: list[records.ImageRecord]  # the held-out fold
    presence: np.ndarray  # bool (len(train_names), len(classes)): classes in each training mask
    # Pseudo-labelled test images that join the training part (never the held-out fold); None: none.
    pseudo: PseudoSet | None = None

    @property
    def all_presence(self) -> np.ndarray:
        """Class presence of every training item: the fold's images, then the pseudo-labelled ones."""
        return self.presence if self.pseudo is None else np.vstack([self.presence, self.pseudo.presence])


@dataclass
class TrainState:
    """Everything an optimizer step changes, i.e. what the resume state holds."""

    raw: nn.Module  # the plain smp model: its state_dict is what checkpoints store
    model: nn.Module  # what training runs: raw, or raw compiled and/or wrapped in DDP
    net: nn.Module  # raw or compiled raw, without DDP: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    # train.ema: the exponential moving average of raw's weights and buffers, updated after every
    # optimizer step; validated and saved in best.pt in place of raw. None when off.
    ema: AveragedModel | None = None

    @property
    def evaluated(self) -> nn.Module:
        """What validation runs and best.pt stores: the EMA model when on, else the trained one."""
        return self.net if self.ema is None else self.ema.module

    @property
    def kept(self) -> nn.Module:
        """The module whose weights best.pt stores (raw, or the EMA copy of raw)."""
        return self.raw if self.ema is None else self.ema.module


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
    data = load_fold_data(recipe, fold, paths)
    all_names = data.train_names + [image.file_name for image in data.val_images]
    inputs = [paths.folds, paths.manifest]
    if recipe.augment.copy_paste > 0:
        inputs.append(objects_path(paths.masks))
    extra_files = []
    if data.pseudo is not None:
        for image in data.pseudo.images:
            extra_files += [image_path(paths.root, image.file_name), data.pseudo.mask_path(image)]
    fingerprint = run_fingerprint(
        recipe,
        fold,
        runtime.world_size,
        inputs,
        paths.root,
        paths.masks,
        all_names,
        average=average,
        extra_files=extra_files,
    )
    train_loader, val_loader = build_loaders(recipe.augment, train, num_workers, data, paths, runtime)
    steps_per_epoch = math.ceil(batches_per_epoch(len(train_loader), train.max_batches) / train.accumulate)

    seed_everything(train.seed)
    resume = read_resume_state(paths.model_dir, fingerprint)
    state = build_train_state(recipe, len(data.classes), runtime, steps_per_epoch * train.epochs, resume)
    check_side_weights(recipe, state.raw)
    loss = build_loss(train.losses, train.class_weights)
    loss_fn = TrainingObjective(loss, train.side_weights, train.presence_weight).to(runtime.device)
    history: list[dict[str, float]] = resume["history"] if resume else []
    best_score = resume["best_score"] if resume else -math.inf
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
            cms = evaluate(state.evaluated, val_loader, len(data.classes), runtime)
            val_score = score(cms, average)
            record["val_miou"] = val_score
        history.append(record)
        if not runtime.is_main:
            continue
        val_miou = val_score if validate else None
        print(epoch_line(run_name, epoch + 1, train.epochs, loss, val_miou, lr), flush=True)
        log_epoch(live, record)
        # The first validation always saves: even a NaN score leaves a best.pt.
        if validate and (val_score > best_score or best_score == -math.inf):
            best_score = val_score
            best = checkpoint_state(
                state.kept, recipe.model, data.classes, recipe.augment, epoch, best_score, fold
            )
            iou = dict(zip(data.classes, class_ious(cms, average).tolist(), strict=True))
            extra = {"iou": iou, "fingerprint": fingerprint, "recipe": recipe.name}
            save_checkpoint(paths.model_dir / "best.pt", {**best, **extra})
        save_checkpoint(paths.model_dir / "last.pt", resume_state(state, fingerprint, history, best_score))

    if not runtime.is_main:
        return {}
    live.end()
    return write_metrics(paths)


def write_metrics(paths: FoldPaths) -> dict[str, Any]:
    """The headline metric of best.pt, its validation mIoU, to paths.metrics; returns it with the epoch.

    Per-class IoUs and the epoch stay in best.pt ("iou", "epoch") and in the ensemble report: a metrics
    file with more columns makes `dvc metrics show`, one table for every file, unreadable.
    """
    best = load_checkpoint(paths.model_dir / "best.pt")
    write_json(paths.metrics, {"miou": best["score"]})
    return {"miou": best["score"], "epoch": best["epoch"]}


# ---------------------------------------------------------------------------------------------------------
# Building blocks of fit, in the order it uses them.


def load_fold_data(recipe: Recipe, fold: int, paths: FoldPaths) -> FoldData:
    """Split the manifest's training images by folds.csv (fold == `fold` is held out).

    Every mistake in the data or in train params that needs the data raises `UserError` here, before
    any training (or any DDP worker) starts.
    """
    manifest = read_manifest(paths.manifest)
    fold_of = read_folds(paths.folds, manifest.train_names(), paths.manifest)
    held_out = held_out_mask(manifest.train_names(), fold_of, fold)
    train_names = [image.file_name for image, out in zip(manifest.train, held_out, strict=True) if not out]
    val_images = [image for image, out in zip(manifest.train, held_out, strict=True) if out]
    if not val_images or not train_names:
        raise UserError(
            f"{paths.folds}: fold {fold} leaves {len(val_images)} validation, "
            f"{len(train_names)} training images"
        )
    check_train_params(recipe, manifest.n_classes)
    pseudo = None if paths.pseudo is None else load_pseudo(paths.pseudo, manifest.classes)
    return FoldData(manifest.classes, train_names, val_images, manifest.presence[~held_out], pseudo)


def load_pseudo(folder: Path, classes: list[str]) -> PseudoSet | None:
    """The pseudo stage's labelled test images that carry a label (None if there are none): an image
    whose every pixel the teacher was unsure of has nothing to teach."""
    pseudo = read_pseudo(folder)
    if pseudo.classes != classes:
        raise UserError(
            f"{folder}: pseudo-labels of classes {pseudo.classes}, the data has {classes} "
            "(re-run the pseudo stage)"
        )
    keep = pseudo.labelled > 0
    if not keep.any():
        return None
    images = [image for image, kept in zip(pseudo.images, keep, strict=True) if kept]
    return dataclasses.replace(
        pseudo, images=images, presence=pseudo.presence[keep], labelled=pseudo.labelled[keep]
    )


def check_train_params(recipe: Recipe, n_classes: int) -> None:
    """The train-section rules that need the data (config checks the rest)."""
    weights = recipe.train.class_weights
    if weights is not None and len(weights) != n_classes:
        raise UserError(
            f"params: models.{recipe.name}: train.class_weights has {len(weights)} weights for "
            f"{n_classes} classes (background first)"
        )
    weighted = boundary_weighting(recipe.train, n_classes) is not None
    if weighted and not PIXEL_WEIGHTED_LOSSES & set(recipe.train.losses):
        raise UserError(
            f"params: models.{recipe.name}: the boundary weight map (train.boundary_w0, "
            "train.boundary_class_balance) weights the pixels of "
            f"{', '.join(sorted(PIXEL_WEIGHTED_LOSSES))}, which train.losses does not name"
        )


def check_side_weights(recipe: Recipe, model: nn.Module) -> None:
    """train.side_weights must give one weight per deep-supervision side output of the built model."""
    weights = recipe.train.side_weights
    n_side = getattr(model, "n_side_outputs", 0)
    if weights is not None and len(weights) != n_side:
        raise UserError(
            f"params: models.{recipe.name}: train.side_weights has {len(weights)} weights, but "
            f"{recipe.model.arch} with these model.options gives {n_side} side outputs"
        )


def build_loaders(
    aug: AugmentParams,
    train: TrainParams,
    num_workers: int,
    data: FoldData,
    paths: FoldPaths,
    runtime: Runtime,
) -> tuple[DataLoader, DataLoader]:
    """(training loader, validation loader), sharded over ranks under DDP; workers persist for the run.

    Call `train_loader.sampler.set_epoch(epoch)` before each epoch: order and augmentation are then
    functions of (seed, epoch) alone, never of what ran before, which is what lets a resumed run match
    an uninterrupted one.
    """
    boundary = boundary_weighting(train, len(data.classes))
    train_set, sample_weights = training_set(
        aug, paths.root, data.train_names, paths.masks, data.all_presence, boundary, data.pseudo
    )
    pin = runtime.device.type == "cuda"
    train_loader = build_train_loader(
        train_set,
        train.batch_size,
        num_workers,
        sample_weights,
        runtime.distributed,
        seed=train.seed,
        pin_memory=pin,
    )
    val_set = ImageDataset(paths.root, data.val_images, geometry_of(aug), masks_dir=paths.masks)
    return train_loader, build_inference_loader(
        val_set, train.batch_size, num_workers, runtime.distributed, pin
    )


def training_set(
    aug: AugmentParams,
    root: Path,
    file_names: list[str],
    masks_dir: Path,
    presence: np.ndarray,
    boundary: BoundaryWeighting | None = None,
    pseudo: PseudoSet | None = None,
) -> tuple[SegmentationDataset | ConcatSegmentation, np.ndarray | None]:
    """The training Dataset of `fit` (augmentation, rare-class-weighted elastic and copy-paste) and its
    per-image oversampling weights (None unless `augment.oversample`). Benchmarks build theirs here too.

    presence: bool (N, C), the classes in each item's mask: the `file_names`, then `pseudo`'s images.
    With `boundary` each item also carries its boundary weight map, computed after augmentation (the
    instance maps beside the masks).
    With `augment.copy_paste` > 0 objects of the masks stage's bank (`images.objects_path(masks_dir)`) are
    pasted, drawn by the same rarity weights, from the images of `file_names` only: never from a held-out one.
    With `pseudo` its images (test images, IGNORE_INDEX where the teacher was unsure) follow the fold's
    images as more training items, augmented alike; rarity weights are counted over both.
    """
    rarity = augment.rarity_weights(presence, aug.elastic_gamma)
    elastic_p = augment.elastic_probabilities(presence, aug)
    copy_paste = None
    if aug.copy_paste > 0:
        bank = objects_path(masks_dir)
        # Sources: the fold's annotated training images only (the bank holds no pseudo-labelled image).
        copy_paste = CopyPaste.from_bank(bank, file_names, rarity, root, masks_dir, aug)

    def part(names: list[str], masks: Path, p: np.ndarray) -> SegmentationDataset:
        transform, elastic = augment.build_train_transform(aug), augment.build_elastic(aug)
        return SegmentationDataset(
            root, names, masks, transform, elastic, p, boundary=boundary, copy_paste=copy_paste
        )

    n = len(file_names)
    dataset: SegmentationDataset | ConcatSegmentation = part(file_names, masks_dir, elastic_p[:n])
    if pseudo is not None:
        names = [image.file_name for image in pseudo.images]
        dataset = ConcatSegmentation([dataset, part(names, pseudo.masks_dir, elastic_p[n:])])
    return dataset, augment.sampling_weights(presence, rarity) if aug.oversample else None


def build_train_state(
    recipe: Recipe, n_classes: int, runtime: Runtime, total_steps: int, resume: dict[str, Any] | None
) -> TrainState:
    """Model, AdamW and warmup-cosine schedule (per optimizer step), loaded from `resume` if given."""
    train = recipe.train
    raw = build_model(recipe.model, n_classes).to(runtime.device)
    if runtime.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if runtime.distributed and runtime.device.type == "cuda":
        # Per-GPU batches are small at 512 px; statistics over the global batch are steadier.
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    # Encoder and decoder at their own lrs; weight decay on weights only (models.parameter_groups).
    groups = parameter_groups(raw, train.lr, train.encoder_lr, train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, fused=runtime.device.type == "cuda")
    warmup_steps = round(train.warmup_epochs * total_steps / train.epochs)
    schedule = functools.partial(
        lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, cosine=train.schedule == "cosine"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_scaler)
    ema = None
    if train.ema is not None:
        # use_buffers: BatchNorm's running statistics are averaged too, so the EMA model validates with
        # statistics of its own weights' trajectory and needs no extra pass over the data.
        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(train.ema), use_buffers=True)
    if resume is not None:
        raw.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        scheduler.load_state_dict(resume["scheduler_state"])
        scaler.load_state_dict(resume["scaler_state"])
        restore_rng_states(resume["rng"])
        if ema is not None:
            ema.load_state_dict(resume["ema_state"])
    net = torch.compile(raw) if train.compile else raw
    model = net
    if runtime.distributed:
        # Architecture options may leave parameters out of the graph (an encoder_depth below 5 skips
        # the encoder's last stage); DDP must then look for them, at a small cost per step.
        model = DistributedDataParallel(
            net,
            device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
            find_unused_parameters=bool(recipe.model.options),
        )
    return TrainState(raw, model, net, optimizer, scheduler, scaler, ema)


def lr_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool = True) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then cosine to 0.

    Warmup rises from 1/warmup_steps to 1 over `warmup_steps` steps; the cosine then falls from 1 at
    step warmup_steps to 0 at step total_steps. With `cosine` False the lr stays at 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches_per_epoch(loader_len: int, max_batches: int | None) -> int:
    """Batches one epoch runs: the whole loader, or `train.max_batches` of it."""
    return loader_len if max_batches is None else min(loader_len, max_batches)


def open_live(live_dir: Path, fold: int, elastic_by_class: dict[str, float], history: list[dict]) -> Live:
    """A fresh dvclive logger holding the curves of the epochs already done (a resumed run replays them).

    DVC deletes a stage's plot outputs before it re-runs it, so replaying, rather than appending to
    what is on disk, is what makes a resumed run's curves whole.
    """
    try:
        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    except GitSCMError:
        live = _FilesOnlyLive(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    # How much more often rare classes get elastic deformation: logged once per fold.
    print(
        f"fold {fold} mean elastic probability by class: "
        + ", ".join(f"{name} {p:.2f}" for name, p in elastic_by_class.items())
    )
    live.log_params({"fold": fold, "elastic_p_by_class": elastic_by_class})
    for record in history:
        log_epoch(live, record)
    return live


class _FilesOnlyLive(Live):
    """dvclive without its repository lookups: it only writes the metric files dvc.yaml declares.

    dvclive 3.49 reads the git HEAD even when it saves no experiment, and raises in a git repository
    with no commit yet (treeverse/dvclive#522). Skipping the lookup leaves the state dvclive itself
    falls back to when that lookup fails with a DVC error: no experiment, no Studio updates.
    """

    def _init_dvc(self) -> None:
        return None


def log_epoch(live: Live, record: dict[str, float]) -> None:
    """One point of each per-epoch curve (x = epoch, dvclive's step)."""
    for name, value in record.items():
        live.log_metric(name, value)
    live.next_step()


def resume_state(
    state: TrainState, fingerprint: str, history: list[dict], best_score: float
) -> dict[str, Any]:
    """Everything needed to continue after the last finished epoch (tensors and builtins only)."""
    return {
        "fingerprint": fingerprint,
        "epoch": len(history) - 1,
        "history": history,
        "best_score": best_score,
        "model_state": state.raw.state_dict(),
        "optimizer_state": state.optimizer.state_dict(),
        "scheduler_state": state.scheduler.state_dict(),
        "scaler_state": state.scaler.state_dict(),
        "rng": rng_states(),
        "ema_state": None if state.ema is None else state.ema.state_dict(),
    }
