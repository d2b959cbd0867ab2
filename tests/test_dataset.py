"""Tests for pipeline.training.dataset: normalisation, datasets, samplers and loaders."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision.transforms.functional import normalize as tv_normalize

from pipeline.config import AugmentParams
from pipeline.data import coco
from pipeline.data.geometry import Geometry, build_resize
from pipeline.data.images import (
    INSTANCES_DIR,
    instance_map_path,
    mask_relpath,
    read_mask,
    write_instance_map,
    write_mask,
)
from pipeline.data.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    build_inference_loader,
    normalize,
    rank_and_world,
)
from pipeline.errors import UserError, one_line
from pipeline.training.augment import build_elastic, build_train_transform
from pipeline.training.dataset import (
    DistributedWeightedSampler,
    SeededSampler,
    SegmentationDataset,
    build_train_loader,
)
from pipeline.training.weightmap import BoundaryWeighting, boundary_weights, class_balance_weights

Data = tuple[Path, Path, list[str]]
PARAMS = AugmentParams(size=32, hflip=0.5, vflip=0.5, shift_scale_rotate=0.5, color=0.5, elastic_alpha=300.0)
N_IMAGES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """6 small JPEGs (48x64) in two folders, with masks holding labels 0..3."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    names = []
    for i in range(N_IMAGES):
        name = f"batch_{i % 2}/{i:03d}.jpg"
        image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / name, quality=90)
        mask = np.zeros((48, 64), np.uint8)
        mask[5:30, 10 + i : 40] = 1 + i % 3
        write_mask(root / "masks" / mask_relpath(name), mask)
        names.append(name)
    return root / "images", root / "masks", names


def _train_set(
    data: tuple[Path, Path, list[str]], seed: int, elastic_p: float | None = 0.5
) -> SegmentationDataset:
    images, masks, names = data
    p = None if elastic_p is None else np.full(len(names), elastic_p)
    elastic = build_elastic(PARAMS) if elastic_p is not None else None
    return SegmentationDataset(images, names, masks, build_train_transform(PARAMS), elastic, p, seed=seed)


def test_normalize_matches_torchvision() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = tv_normalize(
        torch.from_numpy(image).permute(2, 0, 1).float() / 255, IMAGENET_MEAN, IMAGENET_STD
    )
    result = normalize(image)
    assert result.shape == (3, 5, 7) and result.dtype == torch.float32 and result.is_contiguous()
    torch.testing.assert_close(result, expected)
    # Black is -mean/std per channel.
    black = normalize(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]
    torch.testing.assert_close(black, -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_normalize_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        normalize(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        normalize(np.zeros((4, 4, 3), np.float32))


def test_segmentation_dataset_returns_normalised_image_and_int64_mask(data: Data) -> None:
    dataset = _train_set(data, seed=0)
    assert len(dataset) == N_IMAGES
    for i in range(N_IMAGES):
        image, mask = dataset[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3}
    assert float(image.min()) > -2.2 and float(image.max()) < 2.7  # normalised, not 0..255


def test_segmentation_dataset_replays_with_a_seed(data: Data) -> None:
    first, second, other = _train_set(data, seed=3), _train_set(data, seed=3), _train_set(data, seed=4)
    a = [first[i % N_IMAGES] for i in range(12)]
    b = [second[i % N_IMAGES] for i in range(12)]
    c = [other[i % N_IMAGES] for i in range(12)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x[0], z[0]) for x, z in zip(a, c, strict=True))
    # reseed restarts the streams.
    first.reseed(3)
    assert torch.equal(first[0][0], a[0][0])


def test_elastic_probability_0_never_deforms(data: Data) -> None:
    # The elastic draw has its own stream, so p=0 leaves every other draw as without elastic.
    plain, never = _train_set(data, seed=5, elastic_p=None), _train_set(data, seed=5, elastic_p=0.0)
    always = _train_set(data, seed=5, elastic_p=1.0)
    deformed = 0
    for i in range(N_IMAGES):
        reference = plain[i]
        assert torch.equal(never[i][0], reference[0])
        deformed += not torch.equal(always[i][0], reference[0])
    assert deformed == N_IMAGES


def test_mask_of_the_wrong_size_is_a_user_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.jpg")
    write_mask(tmp_path / "masks/a.png", np.zeros((10, 10), np.uint8))
    dataset = SegmentationDataset(tmp_path, ["a.jpg"], tmp_path / "masks", A.Compose([build_resize(8)]))
    with pytest.raises(UserError, match=r"masks/a.png: mask is 10x10 but its image is 10x12"):
        dataset[0]
    records = [coco.ImageRecord(id=0, file_name="a.jpg", height=10, width=12)]
    with pytest.raises(UserError, match=r"masks/a.png: mask is 10x10 but its image is 10x12"):
        ImageDataset(tmp_path, records, Geometry("squash", 32), masks_dir=tmp_path / "masks")[0]


# Each object has its own class, so the instance map is a relabelling of the mask (id of class c =
# INSTANCE_IDS[c]) and the weights of any augmented item can be recomputed from its returned mask.
INSTANCE_IDS = np.array([0, 7, 65535, 300], np.uint16)
BOUNDARY = BoundaryWeighting(w0=10.0, sigma=3.0, class_balance=True, n_classes=4)


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """4 JPEGs (48x64): classes 1 and 2 touching side by side, class 3 below them 3 px apart; the masks
    stage's layout (masks/, masks/instances/)."""
    root = tmp_path_factory.mktemp("instance_data")
    rng = np.random.default_rng(1)
    names = []
    for i in range(4):
        name = f"b/{i:03d}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "images" / name)
        mask = np.zeros((48, 64), np.uint8)
        mask[8:30, 6 + i : 30], mask[8:30, 30:56], mask[33:44, 10 : 50 - i] = 1, 2, 3
        write_mask(root / "masks" / mask_relpath(name), mask)
        write_instance_map(instance_map_path(root / "masks", name), INSTANCE_IDS[mask])
        names.append(name)
    return root / "images", root / "masks", names


def test_boundary_weights_are_those_of_the_augmented_mask(instance_data: Data) -> None:
    # Full training augmentation, elastic step always: the weight map must be the one of the instance
    # map as augmented with the mask, and image and mask must be exactly those drawn without weights.
    images, masks, names = instance_data
    p = np.ones(len(names))

    def dataset(boundary: BoundaryWeighting | None) -> SegmentationDataset:
        transform, elastic = build_train_transform(PARAMS), build_elastic(PARAMS)
        return SegmentationDataset(images, names, masks, transform, elastic, p, boundary=boundary)

    plain, weighted = dataset(None), dataset(BOUNDARY)
    for key in [(i % len(names), seed) for i, seed in enumerate(range(100, 108))]:
        reference = plain[key]
        assert len(reference) == 2
        image, mask, weight = weighted[key]
        assert torch.equal(image, reference[0]) and torch.equal(mask, reference[1])
        assert weight.dtype == torch.float32 and weight.shape == (32, 32)
        labels = mask.numpy()
        expected = boundary_weights(labels, labels, 4, BOUNDARY.w0, BOUNDARY.sigma, True)
        np.testing.assert_array_equal(weight.numpy(), expected)
        assert float(weight.max()) > 1.0 + 0.5 * BOUNDARY.w0  # the seam between classes 1 and 2


def test_boundary_weights_flip_with_a_horizontal_flip(instance_data: Data) -> None:
    images, masks, names = instance_data
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    boundary = BoundaryWeighting(w0=10.0, sigma=3.0, class_balance=False, n_classes=4)
    dataset = SegmentationDataset(images, names, masks, flip, boundary=boundary)
    _, mask, weight = dataset[1]
    original = read_mask(masks / mask_relpath(names[1]))
    instances = INSTANCE_IDS[original]
    unflipped = boundary_weights(instances, original, 4, 10.0, 3.0, class_balance=False)
    np.testing.assert_array_equal(mask.numpy(), original[:, ::-1])
    np.testing.assert_array_equal(weight.numpy(), unflipped[:, ::-1])
    assert not np.array_equal(unflipped, unflipped[:, ::-1])  # the flip is visible in the weights


def test_train_loader_stacks_the_weight_maps(instance_data: Data) -> None:
    images, masks, names = instance_data
    transform = build_train_transform(PARAMS)
    dataset = SegmentationDataset(images, names, masks, transform, boundary=BOUNDARY)
    batch = next(iter(build_train_loader(dataset, batch_size=2, num_workers=0, seed=3)))
    assert [tuple(t.shape) for t in batch] == [(2, 3, 32, 32), (2, 32, 32), (2, 32, 32)]
    assert [t.dtype for t in batch] == [torch.float32, torch.int64, torch.float32]


def test_a_missing_or_stale_instance_map_is_a_one_line_user_error(
    instance_data: Data, tmp_path: Path
) -> None:
    images, masks, names = instance_data
    # The class masks without their instance maps, as an older masks stage left them.
    masks = Path(shutil.copytree(masks, tmp_path / "masks", ignore=shutil.ignore_patterns(INSTANCES_DIR)))
    transform = A.Compose([build_resize(32)])
    dataset = SegmentationDataset(images, names, masks, transform, boundary=BOUNDARY)
    with pytest.raises(UserError) as caught:
        dataset[0]
    line = one_line(caught.value)
    path = instance_map_path(masks, names[0])
    assert line == f"{path}: instance map file not found (re-run the masks stage)"
    write_instance_map(path, np.zeros((48, 60), np.uint16))
    with pytest.raises(
        UserError, match=r"instance map is 48x60 but its mask is 48x64 \(re-run the masks stage\)"
    ):
        dataset[0]
    # Class balance alone needs no instance map.
    balance_only = BoundaryWeighting(w0=0.0, sigma=3.0, class_balance=True, n_classes=4)
    dataset = SegmentationDataset(images, names, masks, transform, boundary=balance_only)
    _, mask, weight = dataset[2]
    np.testing.assert_array_equal(weight.numpy(), class_balance_weights(mask.numpy(), 4))


def test_image_dataset_squash_resizes_like_training(data: Data) -> None:
    images, masks, names = data
    records = [coco.ImageRecord(id=i, file_name=n, height=48, width=64) for i, n in enumerate(names)]
    test_set = ImageDataset(images, records, Geometry("squash", 32))
    train_like = SegmentationDataset(images, names, masks, A.Compose([build_resize(32)]))
    image, index, shape, mask = test_set[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and index == 4
    assert shape == (32, 32) and mask is None
    torch.testing.assert_close(image, train_like[4][0], rtol=0, atol=0)


def test_image_dataset_crop_keeps_the_aspect_and_pads_to_32(data: Data) -> None:
    images, masks, names = data
    records = [coco.ImageRecord(id=i, file_name=n, height=48, width=64) for i, n in enumerate(names)]
    test_set = ImageDataset(images, records, Geometry("crop", 32, short_side=40), masks_dir=masks)
    image, _, shape, mask = test_set[1]
    assert shape == (40, 53)  # 48x64 scaled by 40/48, rounded
    assert image.shape == (3, 64, 64)  # padded up to multiples of 32
    # the padding reflects the image: row 40 mirrors row 38
    torch.testing.assert_close(image[:, 40], image[:, 38], rtol=0, atol=0)
    expected = read_mask(masks / mask_relpath(names[1]))
    np.testing.assert_array_equal(mask.numpy(), expected)  # the truth stays at the native 48x64


def test_inference_loader_batches_equal_shapes_in_order(tmp_path: Path) -> None:
    sizes = [(32, 32), (32, 32), (32, 64), (32, 32), (32, 32), (32, 32)]
    records = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
        records.append(coco.ImageRecord(id=i, file_name=f"{i}.png", height=h, width=w))
    dataset = ImageDataset(tmp_path, records, Geometry("crop", 32))
    batches = list(build_inference_loader(dataset, batch_size=2, num_workers=0))
    assert [b.indexes for b in batches] == [[0, 1], [2], [3, 4], [5]]
    assert [tuple(b.images.shape) for b in batches][:2] == [(2, 3, 32, 32), (1, 3, 32, 64)]
    assert batches[1].shapes == [(32, 64)] and batches[0].masks is None


def test_a_user_error_in_a_loader_worker_still_prints_as_one_line(data: Data) -> None:
    images, _, names = data
    records = [coco.ImageRecord(id=1, file_name=names[0], height=50, width=64)]
    loader = build_inference_loader(ImageDataset(images, records, Geometry("squash", 32)), 1, num_workers=1)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch re-raises from the worker
    line = one_line(caught.value)
    assert line.endswith("json says 50x64") and "\n" not in line


def test_image_dataset_checks_the_json_size(data: Data) -> None:
    images, _, names = data
    test_set = ImageDataset(
        images, [coco.ImageRecord(id=1, file_name=names[0], height=50, width=64)], Geometry("squash", 32)
    )
    with pytest.raises(UserError, match="json says 50x64"):
        test_set[0]


# ---------------------------------------------------------------------------------------------------------
# Samplers and loaders


def test_distributed_weighted_sampler_splits_one_weighted_draw() -> None:
    weights = np.array([0.0, 1.0, 0.0, 3.0, 0.0])
    samplers = [DistributedWeightedSampler(weights, rank, 2, seed=1) for rank in range(2)]
    draws = [list(s) for s in samplers]
    assert [len(d) for d in draws] == [3, 3] == [len(s) for s in samplers]
    assert set(itertools.chain(*draws)) <= {1, 3}  # zero-weight images never drawn
    assert draws == [list(s) for s in samplers]  # same epoch, same draw
    for s in samplers:
        s.set_epoch(1)
    big = DistributedWeightedSampler(np.ones(200), 0, 2, seed=1)
    first = list(big)
    big.set_epoch(1)
    assert list(big) != first
    # Over many images the draw follows the weights (index 3 three times as often as index 1).
    many = np.array(list(DistributedWeightedSampler(np.tile(weights, 400), 0, 1, seed=0)))
    ratio = np.isin(many % 5, 3).sum() / np.isin(many % 5, 1).sum()
    assert 2.5 < ratio < 3.6


class _Indexes(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | tuple[int, int]) -> int:
        # Training loaders pass (index, item seed), as SeededSampler yields.
        return key[0] if isinstance(key, tuple) else key


def test_train_loader_shuffles_drops_last_and_oversamples() -> None:
    loader = build_train_loader(_Indexes(10), batch_size=4, num_workers=0, seed=0)
    batches = [b.tolist() for b in loader]
    assert [len(b) for b in batches] == [4, 4]  # partial batch dropped
    assert len(set(itertools.chain(*batches))) == 8
    assert batches == [b.tolist() for b in build_train_loader(_Indexes(10), 4, 0, seed=0)]
    loader.sampler.set_epoch(1)
    assert [b.tolist() for b in loader] != batches  # a new order each epoch
    loader.sampler.set_epoch(0)
    assert [b.tolist() for b in loader] == batches  # and the same order for the same epoch

    weights = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=float)
    weighted = build_train_loader(_Indexes(10), batch_size=5, num_workers=0, sample_weights=weights, seed=0)
    assert isinstance(weighted.sampler.sampler, DistributedWeightedSampler)
    assert set(torch.cat(list(weighted)).tolist()) <= {2, 9}

    tiny = build_train_loader(_Indexes(3), batch_size=4, num_workers=0)
    assert [len(b) for b in tiny] == [3]  # fewer images than a batch: keep the partial one


def test_distributed_loaders_need_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="not initialised"):
        build_train_loader(_Indexes(4), 2, 0, distributed=True)
    with pytest.raises(RuntimeError, match="not initialised"):
        rank_and_world(True)  # what the inference loader shards by
    assert rank_and_world(False) == (0, 1)


def test_distributed_loaders_shard_with_a_process_group(tmp_path: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        plain = build_train_loader(_Indexes(8), 2, 0, distributed=True)
        assert isinstance(plain.sampler.sampler, DistributedSampler)
        weighted = build_train_loader(_Indexes(8), 2, 0, sample_weights=np.ones(8), distributed=True)
        assert isinstance(weighted.sampler.sampler, DistributedWeightedSampler)
        assert rank_and_world(True) == (0, 1)
    finally:
        torch.distributed.destroy_process_group()


def test_seeded_sampler_seeds_differ_by_epoch_and_rank_and_replay() -> None:
    def draw(epoch: int, rank: int) -> list[tuple[int, int]]:
        sampler = SeededSampler(DistributedSampler(range(6), num_replicas=1, rank=0, seed=3), 3, rank)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = draw(0, 0)
    assert sorted(index for index, _ in first) == list(range(6)) and len({s for _, s in first}) == 6
    assert first == draw(0, 0)
    assert {s for _, s in draw(1, 0)}.isdisjoint(s for _, s in first)
    assert {s for _, s in draw(0, 1)}.isdisjoint(s for _, s in first)


def test_augmentation_depends_on_the_item_seed_not_the_workers(data: Data) -> None:
    images, masks, names = data
    same = [names[0]] * 8  # one image: any difference between items comes from the random draws

    def epochs(num_workers: int) -> list[list[torch.Tensor]]:
        dataset = SegmentationDataset(
            images, same, masks, build_train_transform(PARAMS), build_elastic(PARAMS), np.full(8, 0.5)
        )
        loader = build_train_loader(dataset, batch_size=1, num_workers=num_workers, seed=11)
        out = []
        for epoch in (0, 1, 0):  # one loader, persistent workers, as training keeps it
            loader.sampler.set_epoch(epoch)
            out.append([image[0] for image, _ in loader])
        return out

    in_process, workers = epochs(0), epochs(2)
    for a, b in zip(in_process, workers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    epoch0, epoch1, epoch0_again = workers
    assert len({tuple(x.flatten()[:64].tolist()) for x in epoch0}) > 4  # items augment differently
    assert all(torch.equal(x, y) for x, y in zip(epoch0, epoch0_again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1, strict=True))


@pytest.mark.parametrize("keyed", [False, True])
def test_flips_are_drawn_independently(tmp_path: Path, keyed: bool) -> None:
    # albumentations' set_random_seed seeds every child transform alike, which makes the flips fire
    # together: only "none" and "both" would occur. The dataset shares one generator pair instead.
    image = np.zeros((16, 16, 3), np.uint8)
    image[:8, :8] = 255  # the bright quadrant tells which flips ran
    Image.fromarray(image).save(tmp_path / "a.png")
    write_mask(tmp_path / "masks/a.png", np.zeros((16, 16), np.uint8))
    params = AugmentParams(size=16, hflip=0.5, vflip=0.5, shift_scale_rotate=0.0, color=0.0)
    dataset = SegmentationDataset(tmp_path, ["a.png"], tmp_path / "masks", build_train_transform(params))
    counts = {}
    for i in range(400):
        out = dataset[(0, i)] if keyed else dataset[0]
        quadrant = out[0][0].reshape(2, 8, 2, 8).mean(dim=(1, 3)).argmax().item()  # 0..3: TL, TR, BL, BR
        counts[quadrant] = counts.get(quadrant, 0) + 1
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(60 < n < 140 for n in counts.values()), counts  # 100 each if independent


class _Keys(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(key)


def test_an_epoch_cut_short_leaves_nothing_for_the_next() -> None:
    # train.max_batches stops an epoch early; persistent workers have batches of it in flight by then.
    loader = build_train_loader(_Keys(), batch_size=4, num_workers=2, seed=5)
    loader.sampler.set_epoch(0)
    assert len(list(itertools.islice(loader, 2))) == 2
    loader.sampler.set_epoch(1)
    assert torch.cat(list(loader)).tolist() == [list(key) for key in loader.sampler]
