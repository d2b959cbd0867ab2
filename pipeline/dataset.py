"""Torch datasets (training images with masks, test images without) and their DataLoaders."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from pipeline import coco
from pipeline.augment import build_resize
from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Folded into one multiply-add on 0..255 values: (x / 255 - mean) / std = x * scale + offset.
_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=np.float32)
_OFFSET = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dtype=np.float32)
# Worker seeds of different DDP ranks must differ, or every rank would augment alike.
_RANK_SEED_STRIDE = 1_000_003


def normalize(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) tensor, normalised with the ImageNet mean and std."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    planar = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    planar *= _SCALE[:, None, None]
    planar += _OFFSET[:, None, None]
    return torch.from_numpy(planar)


class SegmentationDataset(Dataset):
    """Training / validation images with their masks -> (image float32 (3, S, S), mask int64 (S, S)).

    Item i reads `root/file_names[i]` and `masks_dir/mask_relpath(file_names[i])`, applies `transform`
    (albumentations, image + mask), then `elastic` with probability `elastic_p[i]` (rare-class weighted).
    The dataset owns the random state of both transforms: it seeds them, and its own draws, from `seed`
    here and from each DataLoader worker's seed in `seed_worker`, so workers differ and a seed replays.
    """

    def __init__(
        self,
        root: str | Path,
        file_names: Sequence[str],
        masks_dir: str | Path,
        transform: A.BasicTransform,
        elastic: A.BasicTransform | None = None,
        elastic_p: Sequence[float] | np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        if elastic_p is not None:
            if elastic is None:
                raise ValueError("elastic_p given without an elastic transform")
            elastic_p = np.asarray(elastic_p, dtype=np.float64)
            if elastic_p.shape != (len(file_names),):
                raise ValueError(f"elastic_p has shape {elastic_p.shape}, expected ({len(file_names)},)")
        self.root = Path(root)
        self.file_names = list(file_names)
        self.masks_dir = Path(masks_dir)
        self.transform = transform
        self.elastic = elastic
        self.elastic_p = elastic_p
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart every random stream this dataset uses (its own draws and both transforms')."""
        streams = np.random.SeedSequence(seed).spawn(3)
        self._rng = np.random.default_rng(streams[0])
        self.transform.set_random_seed(int(streams[1].generate_state(1)[0]))
        if self.elastic is not None:
            self.elastic.set_random_seed(int(streams[2].generate_state(1)[0]))

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        file_name = self.file_names[index]
        image = coco.read_image(coco.image_path(self.root, file_name))
        mask_path = self.masks_dir / coco.mask_relpath(file_name)
        mask = coco.read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise UserError(
                f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                f"{image.shape[0]}x{image.shape[1]} (re-run the masks stage)"
            )
        out = self.transform(image=image, mask=mask)
        if self.elastic_p is not None and self._rng.random() < self.elastic_p[index]:
            out = self.elastic(image=out["image"], mask=out["mask"])
        return normalize(out["image"]), torch.from_numpy(out["mask"].astype(np.int64))


class ImageDataset(Dataset):
    """Images without masks (test, or out-of-fold prediction) -> (image float32 (3, size, size), index).

    Images are resized with the same resize as training; `images[index]` gives back the original size.
    """

    def __init__(self, root: str | Path, images: Sequence[coco.ImageRecord], size: int) -> None:
        self.root = Path(root)
        self.images = list(images)
        self.size = size
        self.resize = build_resize(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.images[index]
        image = coco.read_image(coco.image_path(self.root, record.file_name), (record.height, record.width))
        return normalize(self.resize(image=image)["image"]), index


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy, and a SegmentationDataset's streams, from the worker's seed.

    torch gives each worker `base_seed + worker_id`, base_seed drawn from the loader's generator, so
    workers differ from each other and from epoch to epoch (unless persistent), and a seed replays.
    """
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)
    if isinstance(info.dataset, SegmentationDataset):
        info.dataset.reseed(info.seed)


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded over DDP ranks.

    Each epoch every rank draws the same `ceil(N / world) * world` indices from a generator seeded
    with `seed + epoch` (so ranks agree without communicating) and keeps every world-th one from its
    rank. Call `set_epoch` each epoch, as with DistributedSampler.
    """

    def __init__(
        self, weights: Sequence[float] | np.ndarray, rank: int, world_size: int, seed: int = 0
    ) -> None:
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(self.weights) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.world_size
        indices = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(indices[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """In-order indices rank, rank + world, ...: each image exactly once over all ranks, no padding.

    DistributedSampler pads with repeated images so every rank has as many; repeats would count twice
    in a confusion matrix summed over ranks. Shards here differ in length by at most one.
    """

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n = n
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sample_weights: Sequence[float] | np.ndarray | None = None,
    distributed: bool = False,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Shuffled (or rarity-weighted, with replacement) training batches; the last partial batch dropped.

    sample_weights: per-image oversampling weights (`augment.sampling_weights`), or None for a plain
    shuffle. distributed: shard over the initialised process group; with weights too, each rank draws
    its share of one weighted draw (`DistributedWeightedSampler`), otherwise `DistributedSampler`.
    Either way call `loader.sampler.set_epoch(epoch)` every epoch under DDP. The last batch is dropped
    only when a rank has at least one full batch, so tiny configurations still train.
    """
    rank, world_size = _rank_and_world(distributed)
    rank_seed = seed + _RANK_SEED_STRIDE * rank
    n = len(dataset)
    if sample_weights is not None and len(sample_weights) != n:
        raise ValueError(f"{len(sample_weights)} sample weights for {n} images")
    sampler: Sampler[int] | None
    if distributed and sample_weights is not None:
        sampler = DistributedWeightedSampler(sample_weights, rank, world_size, seed=seed)
    elif distributed:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif sample_weights is not None:
        sampler = WeightedRandomSampler(
            torch.as_tensor(np.asarray(sample_weights, dtype=np.float64)),
            num_samples=n,
            replacement=True,
            generator=torch.Generator().manual_seed(seed),
        )
    else:
        sampler = None
    per_rank = len(sampler) if sampler is not None else n
    if num_workers == 0 and isinstance(dataset, SegmentationDataset):
        dataset.reseed(rank_seed)  # in-process loading: the dataset's own streams, per rank
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=per_rank >= batch_size,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(rank_seed),
    )


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, distributed: bool = False, pin_memory: bool = False
) -> DataLoader:
    """In-order batches of every image; under DDP each rank gets a disjoint shard (`ShardSampler`)."""
    sampler = ShardSampler(len(dataset), *_rank_and_world(True)) if distributed else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised (use torchrun)")
    return dist.get_rank(), dist.get_world_size()
