"""Rare-class copy-paste: objects of the bank, cut by their polygons, pasted into training images."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import AugmentParams
from pipeline.data.images import (
    MAX_INSTANCES,
    ObjectRecord,
    image_path,
    instance_map_path,
    read_image,
    read_instance_map,
    read_objects,
)
from pipeline.data.records import MIN_OBJECT_PIXELS
from pipeline.errors import UserError

# Positions placement "background" tries; the one covering the fewest foreground pixels wins. A few
# suffice to avoid burying an object in another: more would push every paste into the same empty corner.
PLACEMENT_TRIES = 5
# Cut objects kept per process (each a box of its source image): rare classes have few objects, drawn
# again and again, and decoding their whole source image for every paste would cost more than the rest
# of the item's augmentation.
CACHED_CUTS = 64


@dataclass(frozen=True)
class Cut:
    """An object ready to paste: its box of the source image and which of the box's pixels are its own."""

    pixels: np.ndarray  # uint8 (h, w, 3)
    inside: np.ndarray  # bool (h, w): the object's pixels (its instance map's), never the whole box


class CopyPaste:
    """Pastes bank objects of the allowed source images into a training image, mask and instance map.

    With probability `params.copy_paste` an image gets n ~ U{1..copy_paste_max} objects. Each is drawn
    class first, a class with probability proportional to `class_weights[c]` among the classes that have
    objects from the allowed images, then one of that class's objects uniformly; it is scaled by
    s ~ U[copy_paste_scale] (its side lengths), mirrored with probability copy_paste_hflip and placed by
    `copy_paste_placement` (`place`). Objects come at their source's pixel size (times s).

    `allowed`: the only source images (the fold's training images: an object of a held-out image pasted
    into a training batch would leak the validation set). `class_weights`: (C,), e.g.
    `augment.rarity_weights`; classes weighing 0 are never pasted.
    """

    def __init__(
        self,
        objects: Sequence[ObjectRecord],
        allowed: Iterable[str],
        class_weights: np.ndarray,
        root: str | Path,
        masks_dir: str | Path,
        params: AugmentParams,
    ) -> None:
        weights = np.asarray(class_weights, dtype=np.float64)
        allowed = set(allowed)
        by_class: dict[int, list[ObjectRecord]] = {}
        for record in objects:
            if record.file_name in allowed:
                by_class.setdefault(record.label, []).append(record)
        too_high = [c for c in by_class if c >= len(weights)]
        if too_high:
            raise ValueError(
                f"the bank has objects of class {max(too_high)}; class_weights has {len(weights)}"
            )
        self.classes = sorted(c for c in by_class if weights[c] > 0)
        self.objects = [by_class[c] for c in self.classes]
        total = weights[self.classes].sum()
        self.class_p = weights[self.classes] / total if self.classes else np.zeros(0)
        self.root = Path(root)
        self.masks_dir = Path(masks_dir)
        self.params = params

    @classmethod
    def from_bank(
        cls,
        bank: str | Path,
        allowed: Iterable[str],
        class_weights: np.ndarray,
        root: str | Path,
        masks_dir: str | Path,
        params: AugmentParams,
    ) -> CopyPaste:
        """A CopyPaste of the bank file `bank` (`images.write_objects`), restricted to `allowed` sources."""
        return cls(read_objects(bank), allowed, class_weights, root, masks_dir, params)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(image, mask, instances) with objects pasted, new arrays; the inputs themselves when none is.

        image uint8 (H, W, 3), mask uint8 (H, W), instances uint16 (H, W) or None: pasted pixels take the
        source's values, the object's class and a new instance id (the map's largest + 1). Every random
        draw comes from `rng`, in a fixed order, so one seed gives one result.
        """
        params = self.params
        if rng.random() >= params.copy_paste or not self.classes:
            return image, mask, instances
        image, mask = image.copy(), mask.copy()
        instances = None if instances is None else instances.copy()
        low, high = params.copy_paste_scale
        for _ in range(int(rng.integers(1, params.copy_paste_max + 1))):
            k = int(rng.choice(len(self.classes), p=self.class_p))
            pool = self.objects[k]
            record = pool[int(rng.integers(len(pool)))]
            scale = float(rng.uniform(low, high))
            flip = bool(rng.random() < params.copy_paste_hflip)
            cut = transform_cut(load_cut(self.root, self.masks_dir, record), scale, flip)
            tries = PLACEMENT_TRIES if params.copy_paste_placement == "background" else 1
            positions = [random_position(mask.shape, cut.inside.shape, rng) for _ in range(tries)]
            y, x = place(mask, cut.inside, positions)
            paste(image, mask, instances, cut, self.classes[k], y, x)
        return image, mask, instances


# ---------------------------------------------------------------------------------------------------------
# Geometry: pure functions of arrays and positions.


def transform_cut(cut: Cut, scale: float, flip: bool) -> Cut:
    """`cut` resized by `scale` (image linear, membership nearest; sides at least 1 px), mirrored if flip."""
    h, w = cut.inside.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # cv2 wants (width, height)
    pixels, inside = cut.pixels, cut.inside
    if size != (w, h):
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
        inside = cv2.resize(inside.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    if flip:
        pixels, inside = pixels[:, ::-1], inside[:, ::-1]
    return Cut(pixels, inside)


def random_position(
    target: tuple[int, ...], cut: tuple[int, ...], rng: np.random.Generator
) -> tuple[int, int]:
    """A uniform top-left (y, x) for a `cut` (h, w) box in a `target` (H, W) image: inside when it fits;
    along a side where it is longer, a shift that keeps the image covered (the cut is clipped there)."""
    y = int(rng.integers(min(0, target[0] - cut[0]), max(0, target[0] - cut[0]) + 1))
    x = int(rng.integers(min(0, target[1] - cut[1]), max(0, target[1] - cut[1]) + 1))
    return y, x


def overlap_slices(
    target: tuple[int, ...], cut: tuple[int, ...], y: int, x: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(target region, cut region) where a `cut` (h, w) box at top-left (y, x) meets a `target` (H, W)."""
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(target[0], y + cut[0]), min(target[1], x + cut[1])
    y1, x1 = max(y0, y1), max(x0, x1)
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def foreground_covered(mask: np.ndarray, inside: np.ndarray, y: int, x: int) -> int:
    """Non-background pixels of `mask` that the object `inside` (bool (h, w)) at (y, x) would cover."""
    region, part = overlap_slices(mask.shape, inside.shape, y, x)
    return int(np.count_nonzero(mask[region][inside[part]]))


def place(mask: np.ndarray, inside: np.ndarray, positions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Of `positions` (y, x), the first covering the fewest foreground pixels of `mask`."""
    covered = [foreground_covered(mask, inside, y, x) for y, x in positions]
    return positions[int(np.argmin(covered))]


def paste(
    image: np.ndarray, mask: np.ndarray, instances: np.ndarray | None, cut: Cut, label: int, y: int, x: int
) -> bool:
    """Paste `cut` at top-left (y, x) in place: its pixels into `image`, `label` into `mask` and a new id
    into `instances`. Skipped (False) when fewer than `MIN_OBJECT_PIXELS` of it land in the image, too
    little to show the object (the bank's own floor), or when the instance map has no id left."""
    region, part = overlap_slices(mask.shape, cut.inside.shape, y, x)
    inside = cut.inside[part]
    if np.count_nonzero(inside) < MIN_OBJECT_PIXELS:
        return False
    if instances is not None:
        new_id = int(instances.max()) + 1
        if new_id > MAX_INSTANCES:
            return False
        instances[region][inside] = new_id
    image[region][inside] = cut.pixels[part][inside]
    mask[region][inside] = label
    return True


# ---------------------------------------------------------------------------------------------------------
# Reading cuts.


@functools.lru_cache(maxsize=CACHED_CUTS)
def load_cut(root: Path, masks_dir: Path, record: ObjectRecord) -> Cut:
    """`record`'s box of its source image and its pixels there (read-only arrays, shared by the cache).

    `UserError` when the instance map no longer shows the object as the bank says (a stale bank).
    """
    image = read_image(image_path(root, record.file_name))
    path = instance_map_path(masks_dir, record.file_name)
    instances = read_instance_map(path, image.shape[:2])
    x, y, w, h = record.bbox
    inside = instances[y : y + h, x : x + w] == record.instance
    if int(np.count_nonzero(inside)) != record.area or inside.shape != (h, w):
        raise UserError(
            f"{path}: object {record.instance} is not the one the object bank lists ({record.area} pixels "
            f"in box {list(record.bbox)}); re-run the masks stage"
        )
    pixels = np.ascontiguousarray(image[y : y + h, x : x + w])
    pixels.flags.writeable = False
    inside.flags.writeable = False
    return Cut(pixels, inside)
