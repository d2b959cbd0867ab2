"""Training one fold: train_one_epoch, evaluate and fit, resumable, on one process or many (DDP)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import random
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
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import augment, coco
from pipeline.atomic import atomic_dir, write_json
from pipeline.config import AugmentParams, Params, TrainParams
from pipeline.dataset import ImageDataset, SegmentationDataset, build_inference_loader, build_train_loader
from pipeline.errors import UserError
from pipeline.folds import class_presence, read_folds
from pipeline.geometry import geometry_of, resize_argmax
from pipeline.infer import predict_images, resolve_tta
from pipeline.losses import build_loss
from pipeline.metrics import confusion_matrix_torch, iou_per_class, mean_iou
from pipeline.models import (
    build_model,
    checkpoint_state,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pipeline.runtime import Runtime, seed_everything


@dataclass(frozen=True)
class FoldPaths:
    """What one fold's run reads and writes; dvc.yaml names every one of these."""

    root: Path  # images are root/file_name
    train_json: Path
    masks: Path  # one PNG per training image (stage `masks`)
    folds: Path  # folds.csv: image_id,fold
    model_dir: Path  # best.pt and the resume state last.pt
    metrics: Path  # JSON: miou, per-class iou, best epoch
    live: Path  # dvclive per-epoch curves
    oof: Path  # out-of-fold label PNGs at each image's own size


@dataclass(frozen=True)
class FoldData:
    """The fold's split of the training set."""

    classes: list[str]  # background first
    train_names: list[str]  # file_names of the training images
    val_images: list[coco.ImageRecord]  # the held-out fold
    presence: np.ndarray  # bool (len(train_names), len(classes)): classes in each training mask


@dataclass
class TrainState:
    """Everything an optimizer step changes, i.e. what the resume state holds."""

    raw: nn.Module  # the plain smp model: its state_dict is what checkpoints store
    model: nn.Module  # what training runs: raw, or raw compiled and/or wrapped in DDP
    net: nn.Module  # raw or compiled raw, without DDP: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def train_one_epoch(
    state: TrainState, loader: DataLoader, loss_fn: nn.Module, runtime: Runtime, train: TrainParams, desc: str
) -> float:
    """One pass over `loader` (at most `train.max_batches` batches); returns the mean loss over all ranks."""
    state.model.train()
    n_batches = batches_per_epoch(len(loader), train.max_batches)
    loss_sum = torch.zeros((), device=runtime.device)
    state.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(itertools.islice(loader, n_batches), desc, total=n_batches, disable=not runtime.is_main)
    for i, (images, masks) in enumerate(progress):
        images, masks = runtime.to_device(images), masks.to(runtime.device, non_blocking=True)
        group_start = i - i % train.accumulate
        group_size = min(train.accumulate, n_batches - group_start)  # the epoch's last group may be short
        stepping = i == group_start + group_size - 1
        # DDP all-reduces gradients on every backward unless told not to: only the stepping one needs it.
        no_sync = runtime.distributed and not stepping
        with state.model.no_sync() if no_sync else contextlib.nullcontext():
            with runtime.autocast():
                loss = loss_fn(state.model(images), masks)
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
        if runtime.is_main and i % 10 == 0:  # .item() waits for the GPU; not every step
            progress.set_postfix(loss=f"{loss.item():.4f}")
    if runtime.distributed:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (n_batches * runtime.world_size)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, n_classes: int, runtime: Runtime) -> np.ndarray:
    """Dataset-level confusion matrix, int64 (C, C), rows truth, summed over ranks.

    The loader yields `InferenceBatch`es with truth masks (`build_inference_loader` over an
    `ImageDataset` given masks): each image is predicted whole at the model's geometry and scored at
    its own size, as the out-of-fold predictions and the leaderboard are.
    """
    model.eval()
    cm = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=runtime.device)
    for batch in loader:
        with runtime.autocast():
            logits = model(runtime.to_device(batch.images))
        probs = logits.float().softmax(dim=1)
        for image_probs, (h, w), mask in zip(probs, batch.shapes, batch.masks, strict=True):
            pred = resize_argmax(image_probs[:, :h, :w], tuple(mask.shape))
            cm += confusion_matrix_torch(mask.to(runtime.device), pred, n_classes)
    if runtime.distributed:
        dist.all_reduce(cm)  # each rank saw a disjoint shard of the held-out images
    return cm.cpu().numpy()


def fit(params: Params, fold: int, paths: FoldPaths, runtime: Runtime) -> dict[str, Any]:
    """Train `fold`, keep the epoch with the best validation mIoU, write the fold's outputs.

    Resumes after the last finished epoch when model_dir/last.pt was written by the same settings and
    data (`run_fingerprint`); each epoch reseeds from seed + epoch (the model's draws, the data order
    and every item's augmentation), so a resumed run ends like an uninterrupted one: bit for bit on
    CPU, and on a GPU up to the nondeterminism of cuDNN's kernels. Only the main process writes.
    Returns the metrics written to `paths.metrics` (on the main process; other processes return {}).
    """
    train = params.train
    data = load_fold_data(params, fold, paths)
    all_names = data.train_names + [image.file_name for image in data.val_images]
    fingerprint = run_fingerprint(params, fold, paths, all_names, runtime.world_size)
    train_loader, val_loader = build_loaders(params, data, paths, runtime)
    steps_per_epoch = math.ceil(batches_per_epoch(len(train_loader), train.max_batches) / train.accumulate)

    seed_everything(train.seed)
    resume = read_resume_state(paths.model_dir, fingerprint)
    state = build_train_state(params, len(data.classes), runtime, steps_per_epoch * train.epochs, resume)
    loss_fn = build_loss(train.losses, train.class_weights).to(runtime.device)
    history: list[dict[str, float]] = resume["history"] if resume else []
    best_score = resume["best_score"] if resume else -math.inf
    if runtime.is_main and resume:  # messages count epochs from 1; files index them from 0 (dvclive's step)
        done = len(history)
        print(
            f"resuming fold {fold} from epoch {done + 1}/{train.epochs}"
            if done < train.epochs
            else f"fold {fold}: all {done} epochs done; rewriting the outputs from best.pt",
            flush=True,
        )
    elastic_p = train_loader.dataset.elastic_p
    elastic_by_class = augment.elastic_probability_by_class(data.presence, elastic_p, data.classes)
    live = open_live(paths.live, fold, elastic_by_class, history) if runtime.is_main else None

    for epoch in range(len(history), train.epochs):
        seed_everything(train.seed + epoch)
        train_loader.sampler.set_epoch(epoch)  # this epoch's order and augmentation seeds
        desc = f"fold {fold} epoch {epoch + 1}/{train.epochs}"
        lr = state.optimizer.param_groups[0]["lr"]  # the lr this epoch starts at
        loss = train_one_epoch(state, train_loader, loss_fn, runtime, train, desc)
        if not math.isfinite(loss):
            raise UserError(f"params: fold {fold} diverged in epoch {epoch} (loss {loss}); lower train.lr")
        # Validating a whole held-out fold costs a good share of an epoch on a CPU: train.val_every
        # spaces it out; the last epoch is always validated, so the best checkpoint has seen the end.
        validate = (epoch + 1) % train.val_every == 0 or epoch == train.epochs - 1
        record = {"train_loss": loss, "lr": lr}
        if validate:
            cm = evaluate(state.net, val_loader, len(data.classes), runtime)
            score = mean_iou(cm)
            record["val_miou"] = score
        history.append(record)
        if not runtime.is_main:
            continue
        scored = f", val mIoU {score:.4f}" if validate else ""
        print(f"{desc}: train loss {loss:.4f}{scored}, lr {lr:.2e}", flush=True)
        log_epoch(live, record)
        # The first validation always saves: even a NaN score leaves a best.pt.
        if validate and (score > best_score or best_score == -math.inf):
            best_score = score
            best = checkpoint_state(
                state.raw, params.model, data.classes, params.augment, epoch, best_score, fold
            )
            iou = dict(zip(data.classes, iou_per_class(cm).tolist(), strict=True))
            save_checkpoint(paths.model_dir / "best.pt", {**best, "iou": iou, "fingerprint": fingerprint})
        save_checkpoint(paths.model_dir / "last.pt", resume_state(state, fingerprint, history, best_score))

    if not runtime.is_main:
        return {}
    live.end()
    return write_outputs(params, fold, paths, data.val_images, runtime)


def write_outputs(
    params: Params, fold: int, paths: FoldPaths, val_images: list[coco.ImageRecord], runtime: Runtime
) -> dict[str, Any]:
    """From best.pt alone: the out-of-fold predictions, then the metrics JSON (returned too)."""
    best = load_checkpoint(paths.model_dir / "best.pt")
    write_oof(
        model_from_checkpoint(best, source=str(paths.model_dir / "best.pt")),
        val_images,
        params,
        paths,
        runtime,
    )
    result = {"fold": fold, "miou": best["score"], "iou": best["iou"], "epoch": best["epoch"]}
    write_json(paths.metrics, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Building blocks of fit, in the order it uses them.


def load_fold_data(params: Params, fold: int, paths: FoldPaths) -> FoldData:
    """Split the training json by folds.csv (fold == `fold` is held out) and read the training masks.

    Every mistake in the data or in train params that needs the data raises `UserError` here, before
    any training (or any DDP worker) starts.
    """
    train_set = coco.load_coco(
        paths.train_json,
        root=paths.root,
        on_bad=params.data.on_bad_annotation,
        unused=params.data.unused_categories,
    )
    fold_of = read_folds(paths.folds, train_set)
    train_names = [image.file_name for image in train_set.images if fold_of[image.file_name] != fold]
    val_images = [image for image in train_set.images if fold_of[image.file_name] == fold]
    if not val_images or not train_names:
        raise UserError(
            f"{paths.folds}: fold {fold} leaves {len(val_images)} validation, "
            f"{len(train_names)} training images"
        )
    masks = (coco.read_mask(paths.masks / coco.mask_relpath(name)) for name in train_names)
    try:
        presence = class_presence(masks, train_set.n_classes)
    except ValueError as exc:
        raise UserError(f"{paths.masks}: {exc} (re-run the masks stage)") from None
    check_train_params(params.train, train_set.n_classes)
    # The out-of-fold predictions use predict.tta once training ends: refuse a bad one before it starts.
    resolve_tta(params.predict.tta, [dataclasses.asdict(params.augment)])
    return FoldData(train_set.classes, train_names, val_images, presence)


def check_train_params(train: TrainParams, n_classes: int) -> None:
    """The train-section rules that need the data (config checks the rest)."""
    if train.class_weights is not None and len(train.class_weights) != n_classes:
        raise UserError(
            f"params: train.class_weights has {len(train.class_weights)} weights for {n_classes} classes "
            "(background first)"
        )


def build_loaders(
    params: Params, data: FoldData, paths: FoldPaths, runtime: Runtime
) -> tuple[DataLoader, DataLoader]:
    """(training loader, validation loader), sharded over ranks under DDP; workers persist for the run.

    Call `train_loader.sampler.set_epoch(epoch)` before each epoch: order and augmentation are then
    functions of (seed, epoch) alone, never of what ran before, which is what lets a resumed run match
    an uninterrupted one.
    """
    train, aug = params.train, params.augment
    train_set, sample_weights = training_set(aug, paths.root, data.train_names, paths.masks, data.presence)
    pin = runtime.device.type == "cuda"
    train_loader = build_train_loader(
        train_set,
        train.batch_size,
        train.num_workers,
        sample_weights,
        runtime.distributed,
        seed=train.seed,
        pin_memory=pin,
    )
    val_set = ImageDataset(paths.root, data.val_images, geometry_of(aug), masks_dir=paths.masks)
    return train_loader, build_inference_loader(
        val_set, train.batch_size, train.num_workers, runtime.distributed, pin
    )


def training_set(
    aug: AugmentParams, root: Path, file_names: list[str], masks_dir: Path, presence: np.ndarray
) -> tuple[SegmentationDataset, np.ndarray | None]:
    """The training Dataset of `fit` (augmentation, rare-class-weighted elastic) and its per-image
    oversampling weights (None unless `augment.oversample`). Benchmarks build theirs here too.

    presence: bool (len(file_names), C), the classes in each image's mask.
    """
    dataset = SegmentationDataset(
        root,
        file_names,
        masks_dir,
        augment.build_train_transform(aug),
        augment.build_elastic(aug),
        augment.elastic_probabilities(presence, aug),
    )
    rarity = augment.rarity_weights(presence, aug.elastic_gamma)
    return dataset, augment.sampling_weights(presence, rarity) if aug.oversample else None


# The pipeline modules whose code shapes the trained weights. infer.py is left out on purpose: it only
# shapes the out-of-fold predictions, which are rewritten from best.pt without retraining.
WEIGHT_MODULES = (
    "augment",
    "coco",
    "config",
    "dataset",
    "folds",
    "geometry",
    "losses",
    "metrics",
    "models",
    "runtime",
    "train",
)
# Libraries whose versions shape the weights (augmentation draws, kernels, initialisation). OpenCV is
# installed under one of several distribution names; the one that is not installed reads None.
WEIGHT_LIBRARIES = (
    "albumentations",
    "numpy",
    "opencv-python",
    "opencv-python-headless",
    "segmentation-models-pytorch",
    "torch",
)


def run_fingerprint(
    params: Params, fold: int, paths: FoldPaths, file_names: list[str], world_size: int
) -> str:
    """Hash of everything that shapes the trained weights; a resume state with another hash is stale.

    DVC re-runs a train stage when any of its deps changes, and the fold's folder persists, so this is
    what tells a killed run (resume it) from a finished run whose inputs changed (train again): the
    settings, folds.csv, the json, the bytes of every image and mask the fold reads (`file_names`), a
    local encoder weights file, the code in WEIGHT_MODULES and the library versions.
    predict/submission settings are left out: they only change the outputs, which are rewritten anyway.
    """
    train = dataclasses.asdict(params.train)
    del train["folds"]  # which other folds run does not change this one
    data = hashlib.sha256()
    for name in file_names:
        for path in (coco.image_path(paths.root, name), paths.masks / coco.mask_relpath(name)):
            data.update(_sha256(path).encode())
    weights = params.model.encoder_weights
    package = Path(__file__).parent
    relevant = {
        "data": {
            "overlap": params.data.overlap,
            "on_bad_annotation": params.data.on_bad_annotation,
            "unused_categories": params.data.unused_categories,
        },
        "augment": dataclasses.asdict(params.augment),
        "model": dataclasses.asdict(params.model),
        "train": train,
        "fold": fold,
        "world_size": world_size,
        "folds_csv": _sha256(paths.folds),
        "train_json": _sha256(paths.train_json),
        "images_and_masks": data.hexdigest(),
        "encoder_weights_file": _sha256(Path(weights)) if weights and Path(weights).is_file() else None,
        "code": {name: _sha256(package / f"{name}.py") for name in WEIGHT_MODULES},
        "libraries": {name: _version(name) for name in WEIGHT_LIBRARIES},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def read_resume_state(model_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """last.pt if it and best.pt were both written by a run with this fingerprint, else None (start fresh)."""
    last, best = model_dir / "last.pt", model_dir / "best.pt"
    if not (last.is_file() and best.is_file()):
        return None
    try:
        state = load_checkpoint(last)
        best_fingerprint = load_checkpoint(best).get("fingerprint")
    except UserError as exc:  # e.g. written by an older version: retraining beats refusing to run
        print(f"warning: cannot resume ({exc}); starting fresh", flush=True)
        return None
    if state.get("fingerprint") != fingerprint or best_fingerprint != fingerprint:
        return None
    return state


def build_train_state(
    params: Params, n_classes: int, runtime: Runtime, total_steps: int, resume: dict[str, Any] | None
) -> TrainState:
    """Model, AdamW and warmup-cosine schedule (per optimizer step), loaded from `resume` if given."""
    train = params.train
    raw = build_model(params.model, n_classes).to(runtime.device)
    if runtime.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    if runtime.distributed and runtime.device.type == "cuda":
        # Per-GPU batches are small at 512 px; statistics over the global batch are steadier.
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    # Weight decay on weights only: decaying biases and norm scales just fights the normalisation.
    decay = [p for p in raw.parameters() if p.ndim >= 2]
    no_decay = [p for p in raw.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        fused=runtime.device.type == "cuda",
    )
    warmup_steps = round(train.warmup_epochs * total_steps / train.epochs)
    schedule = functools.partial(
        lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, cosine=train.schedule == "cosine"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_scaler)
    if resume is not None:
        raw.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        scheduler.load_state_dict(resume["scheduler_state"])
        scaler.load_state_dict(resume["scaler_state"])
        restore_rng_states(resume["rng"])
    net = torch.compile(raw) if train.compile else raw
    model = net
    if runtime.distributed:
        model = DistributedDataParallel(
            net, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None
        )
    return TrainState(raw, model, net, optimizer, scheduler, scaler)


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
    }


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch generator states in a form `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            **numpy_state,
            "state": {
                **numpy_state["state"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `rng_states` (each epoch also reseeds; this restores the state between epochs)."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_oof(
    model: nn.Module, images: list[coco.ImageRecord], params: Params, paths: FoldPaths, runtime: Runtime
) -> None:
    """Predict the held-out images whole, with the TTA the training augmentation allows, and write one
    label PNG each at the image's own size under paths.oof, replacing the folder whole."""
    dataset = ImageDataset(paths.root, images, geometry_of(params.augment))
    tta = resolve_tta(params.predict.tta, [dataclasses.asdict(params.augment)])
    with atomic_dir(paths.oof) as staging:
        predictions = predict_images(
            models=[model],
            weights=None,
            dataset=dataset,
            out_size=None,
            tta=tta,
            scales=params.predict.scales,
            batch_size=params.predict.batch_size,
            num_workers=params.predict.num_workers,
            device=runtime.device,
            amp=params.predict.amp,
        )
        for index, mask in tqdm(predictions, "out-of-fold predictions", total=len(images)):
            coco.write_mask(staging / coco.mask_relpath(images[index].file_name), mask)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    return digest.hexdigest()
