"""One fold's data: the split of the training images, the pseudo-labelled ones, the datasets and loaders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from pipeline.config import AugmentParams, TrainParams
from pipeline.data import records
from pipeline.data.folds import held_out_mask, read_folds
from pipeline.data.geometry import geometry_of
from pipeline.data.images import objects_path
from pipeline.data.loaders import ImageDataset, build_inference_loader
from pipeline.data.manifest import read_manifest
from pipeline.data.pseudo import PseudoSet, read_pseudo
from pipeline.errors import UserError
from pipeline.models.losses import PIXEL_WEIGHTED_LOSSES, WEIGHTED_LOSSES
from pipeline.training import augment
from pipeline.training.copypaste import CopyPaste
from pipeline.training.dataset import ConcatSegmentation, SegmentationDataset, build_train_loader
from pipeline.training.runtime import Runtime
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


def load_fold_data(fold: int, paths: FoldPaths) -> FoldData:
    """Split the manifest's training images by folds.csv (fold == `fold` is held out).

    Every mistake in the data raises `UserError` here, before any training (or any DDP worker) starts.
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


def check_train_params(train: TrainParams, name: str, n_classes: int) -> None:
    """The train-section rules of recipe `name` that need the data's class count (config checks the rest)."""
    weights = train.class_weights
    if weights is not None and len(weights) != n_classes:
        raise UserError(
            f"params: models.{name}: train.class_weights has {len(weights)} weights for "
            f"{n_classes} classes (background first)"
        )
    unweighted = sorted(loss for loss, w in train.losses.items() if w > 0 and loss not in WEIGHTED_LOSSES)
    if weights is not None and unweighted:
        raise UserError(
            f"params: models.{name}: train.class_weights weights only {', '.join(sorted(WEIGHTED_LOSSES))}; "
            f"train.losses also names {', '.join(unweighted)}, which has no per-class weighting"
        )
    weighted = boundary_weighting(train, n_classes) is not None
    if weighted and not PIXEL_WEIGHTED_LOSSES & set(train.losses):
        raise UserError(
            f"params: models.{name}: the boundary weight map (train.boundary_w0, "
            "train.boundary_class_balance) weights the pixels of "
            f"{', '.join(sorted(PIXEL_WEIGHTED_LOSSES))}, which train.losses does not name"
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
