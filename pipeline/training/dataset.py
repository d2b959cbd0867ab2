"""Training data: images with their masks (and pasted objects), seeded samplers, the training loader."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pipeline.data.images import (
    image_path,
    instance_map_path,
    mask_relpath,
    read_image,
    read_instance_map,
    read_mask,
)
from pipeline.data.loaders import normalize, rank_and_world
from pipeline.training.weightmap import BoundaryWeighting

# A step on the raw (image, mask, instance map or None) drawing from the generator given, as
# `copypaste.CopyPaste` is; named by its shape so that this module does not import the copy-paste code.
RawStep = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, np.random.Generator],
    tuple[np.ndarray, np.ndarray, np.ndarray | None],
]


class SegmentationDataset(Dataset):
    """Training / validation images with their masks -> (image float32 (3, S, S), mask int64 (S, S)), or
    with `boundary` -> (image, mask, weight float32 (S, S)).

    Item `key` reads `root/file_names[i]` and `masks_dir/mask_relpath(file_names[i])`, pastes objects
    into them with `copy_paste` (a `copypaste.CopyPaste`, if given), applies `transform` (albumentations,
    image + mask), then `elastic` with probability `elastic_p[i]` (rare-class weighted).

    With `boundary` (a `weightmap.BoundaryWeighting`) the item also carries the per-pixel loss weight
    `boundary.weights(instances, mask)`, computed per item on the augmented maps: distances must be those
    of the pixels the model sees, after scaling, affine and elastic steps. The instance map is read from
    `images.instance_map_path(masks_dir, file_names[i])` (where the masks stage writes it) and goes
    through every step with the mask (nearest neighbour, uint16 kept; pasted objects get new ids), only
    when `boundary.w0 > 0`. The random draws are the same with and without `boundary`: image and mask
    are those of a dataset without.

    Copy-paste, transform and elastic step each draw from their own stream, so copy-paste (on, or with
    probability 0) leaves every draw of the other two as it is without it.

    The key is an index i, drawing from the dataset's own random streams (seeded by `seed` or `reseed`),
    or an `(i, item_seed)` pair as `SeededSampler` yields, drawing from streams seeded by item_seed alone:
    then an item's augmentation depends on its seed only, never on which worker loads it, how many
    workers there are or what they loaded before, so persistent workers and a resumed run replay it.
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
        boundary: BoundaryWeighting | None = None,
        copy_paste: RawStep | None = None,
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
        self.boundary = boundary
        self.copy_paste = copy_paste
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the dataset's own random streams, which index keys draw from."""
        self._streams = _Streams.from_seed(seed)

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        if isinstance(key, tuple):
            index, item_seed = key
            streams = _Streams.from_seed(item_seed)
        else:
            index, streams = key, self._streams
        file_name = self.file_names[index]
        image = read_image(image_path(self.root, file_name))
        mask = read_mask(self.masks_dir / mask_relpath(file_name), image.shape[:2])
        instances = None
        if self.boundary is not None and self.boundary.needs_instances:
            instances = read_instance_map(instance_map_path(self.masks_dir, file_name), mask.shape, "mask")
        if self.copy_paste is not None:
            image, mask, instances = self.copy_paste(image, mask, instances, streams.copy_paste)
        # The instance map rides along as albumentations' `masks`: mask interpolation and fills, no draws
        # of its own, so every random draw is the one made without it.
        extra: dict[str, list[np.ndarray]] = {} if instances is None else {"masks": [instances]}
        # One generator pair per transform tree, shared by its children: albumentations' set_random_seed
        # would give every child its own generator with the same seed, and identical streams make
        # HorizontalFlip and VerticalFlip (and every other pair of draws) fire together.
        self.transform.set_random_state(streams.transform, streams.transform_py)
        out = self.transform(image=image, mask=mask, **extra)
        if self.elastic_p is not None and streams.elastic.random() < self.elastic_p[index]:
            self.elastic.set_random_state(streams.elastic, streams.elastic_py)
            if extra:
                extra["masks"] = list(out["masks"])
            out = self.elastic(image=out["image"], mask=out["mask"], **extra)
        image_t, mask_t = normalize(out["image"]), torch.from_numpy(out["mask"].astype(np.int64))
        if self.boundary is None:
            return image_t, mask_t
        instances = out["masks"][0] if extra else None
        return image_t, mask_t, torch.from_numpy(self.boundary.weights(instances, out["mask"]))


class ConcatSegmentation(Dataset):
    """Several `SegmentationDataset`s as one (the fold's images, then pseudo-labelled ones), taking the
    same keys: an index or an `(index, item_seed)` pair (torch's ConcatDataset takes integers only)."""

    def __init__(self, parts: Sequence[SegmentationDataset]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def elastic_p(self) -> np.ndarray | None:
        """Every item's elastic probability, in order (None if no part has elastic deformation)."""
        if any(part.elastic_p is None for part in self.parts):
            return None
        return np.concatenate([part.elastic_p for part in self.parts])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = int(index - self.starts[part])
        return self.parts[part][local if seed is None else (local, seed)]


@dataclass(frozen=True)
class _Streams:
    """The generators one item (or one dataset's index keys) draws from.

    The elastic decision and deformation have their own stream, so an elastic probability of 0 leaves
    every other draw as it would be with no elastic step at all; so has copy-paste. Each is one child of
    the seed's SeedSequence (transform 0, elastic 1, copy-paste 2): a child does not depend on how many
    siblings were spawned, so adding one changed no earlier stream.
    """

    transform: np.random.Generator
    transform_py: random.Random
    elastic: np.random.Generator
    elastic_py: random.Random
    copy_paste: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> _Streams:
        transform_seq, elastic_seq, copy_paste_seq = np.random.SeedSequence(seed).spawn(3)
        return cls(
            np.random.default_rng(transform_seq),
            random.Random(int(transform_seq.generate_state(1)[0])),
            np.random.default_rng(elastic_seq),
            random.Random(int(elastic_seq.generate_state(1)[0])),
            np.random.default_rng(copy_paste_seq),
        )


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps an epoch-aware sampler: yields (index, item_seed), item seeds drawn from (seed, epoch, rank).

    The seed travels with the index to whichever worker loads the item, so augmentation is a function
    of (seed, epoch, rank, position in the epoch) alone: the same with 0 or 16 workers, with workers
    kept alive across epochs, and after a resume. Call `set_epoch` every epoch.
    """

    def __init__(
        self, sampler: DistributedSampler | DistributedWeightedSampler, seed: int, rank: int
    ) -> None:
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        generator = np.random.default_rng([self.seed, self.epoch, self.rank])
        seeds = generator.integers(0, 2**63 - 1, size=len(indices))
        return iter(zip(indices, seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.sampler)


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

    Items are tuples of tensors (image, mask[, weight]) that the default collate stacks per position.
    One loader serves the whole run: its workers persist, and `loader.sampler.set_epoch(epoch)` before
    each epoch picks that epoch's order (seeded by seed + epoch) and item seeds (`SeededSampler`).
    The dataset receives (index, item_seed) keys, as `SegmentationDataset` takes them.

    sample_weights: per-image oversampling weights (`augment.sampling_weights`), or None for a plain
    shuffle. distributed: shard over the initialised process group: each rank takes its share of one
    shuffle (`DistributedSampler`) or of one weighted draw (`DistributedWeightedSampler`). The last
    batch is dropped only when a rank has at least one full batch, so tiny configurations still train.
    """
    rank, world_size = rank_and_world(distributed)
    n = len(dataset)
    if sample_weights is not None and len(sample_weights) != n:
        raise ValueError(f"{len(sample_weights)} sample weights for {n} images")
    order: DistributedSampler | DistributedWeightedSampler
    if sample_weights is not None:
        order = DistributedWeightedSampler(sample_weights, rank, world_size, seed=seed)
    else:
        order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler = SeededSampler(order, seed, rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=len(sampler) >= batch_size,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed + rank),
    )
