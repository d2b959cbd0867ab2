"""Whole images for inference (test, validation, out-of-fold): normalisation, the dataset, its loader."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data import records
from pipeline.data.geometry import Geometry, build_resize, pad_to_multiple, padded_shape
from pipeline.data.images import image_path, mask_relpath, read_image, read_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folded into one multiply-add on 0..255 values: (x / 255 - mean) / std = x * scale + offset.
_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=np.float32)
_OFFSET = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dtype=np.float32)


def normalize(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) tensor, normalised with the ImageNet mean and std."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    planar = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    planar *= _SCALE[:, None, None]
    planar += _OFFSET[:, None, None]
    return torch.from_numpy(planar)


class InferenceBatch(NamedTuple):
    """A batch of whole images for inference, as `collate_inference` builds it."""

    images: torch.Tensor  # float32 (B, 3, H, W): one padded shape per batch
    indexes: list[int]  # dataset indexes
    shapes: list[tuple[int, int]]  # each image's (h, w) inside `images`, before padding
    masks: list[torch.Tensor] | None  # uint8 (height, width) truth at each image's own size, or None


class ImageDataset(Dataset):
    """Whole images for inference (test, validation, out-of-fold) at the model's geometry.

    Item `index` -> (image float32 (3, H, W), index, (h, w), mask): the image resized to
    `geometry.inference_shape` (h, w) with the training resize rule, then reflect-padded to multiples of
    32 (H, W); mask is the uint8 truth at the image's own size when `masks_dir` is given, else None.
    `images[index]` gives back the record (and so the native size).
    """

    def __init__(
        self,
        root: str | Path,
        images: Sequence[records.ImageRecord],
        geometry: Geometry,
        masks_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.images = list(images)
        self.geometry = geometry
        self.masks_dir = None if masks_dir is None else Path(masks_dir)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[int, int], torch.Tensor | None]:
        record = self.images[index]
        image = read_image(image_path(self.root, record.file_name), (record.height, record.width))
        shape = self.geometry.inference_shape(record.height, record.width)
        image = pad_to_multiple(build_resize(*shape)(image=image)["image"])
        mask = None
        if self.masks_dir is not None:
            mask_path = self.masks_dir / mask_relpath(record.file_name)
            mask = torch.from_numpy(read_mask(mask_path, (record.height, record.width)))
        return normalize(image), index, shape, mask


def collate_inference(
    items: Sequence[tuple[torch.Tensor, int, tuple[int, int], torch.Tensor | None]],
) -> InferenceBatch:
    """Stack `ImageDataset` items of one padded shape (`build_inference_loader` batches them so);
    masks stay a list, as their native sizes may differ."""
    images = torch.stack([item[0] for item in items])
    masks = None if items[0][3] is None else [item[3] for item in items]
    return InferenceBatch(images, [item[1] for item in items], [tuple(item[2]) for item in items], masks)


class ShapeBatchSampler(Sampler[list[int]]):
    """Batches of consecutive `indices` whose images have the same padded inference shape.

    Batching only equal shapes (rather than padding to the batch's largest) keeps each image's
    prediction a function of the image alone, whatever the batch size or its neighbours.
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        last_shape = None
        for index in indices:
            record = dataset.images[index]
            shape = padded_shape(*dataset.geometry.inference_shape(record.height, record.width))
            if shape != last_shape or len(self.batches[-1]) == batch_size:
                self.batches.append([])
            self.batches[-1].append(index)
            last_shape = shape

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_inference_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int,
    distributed: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """In-order `InferenceBatch`es of every image (`ShapeBatchSampler`); under DDP each rank gets a
    disjoint shard, rank, rank + world, ... (no padding with repeated images, which DistributedSampler
    adds and a confusion matrix summed over ranks would count twice)."""
    rank, world_size = rank_and_world(distributed)
    indices = range(rank, len(dataset), world_size)
    return DataLoader(
        dataset,
        batch_sampler=ShapeBatchSampler(dataset, indices, batch_size),
        collate_fn=collate_inference,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def rank_and_world(distributed: bool) -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) when not `distributed`."""
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised (use torchrun)")
    return dist.get_rank(), dist.get_world_size()
