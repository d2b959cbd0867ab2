"""Generate the demo dataset: textured synthetic trash photos with exact COCO annotations, seeded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from pipeline.config import DemoParams
from pipeline.data.coco import decode_segmentation

# The competition's categories, ids 1..10 in its order.
CATEGORIES = [
    "General trash", "Paper", "Paper pack", "Metal", "Glass",
    "Plastic", "Styrofoam", "Plastic bag", "Battery", "Clothing",
]  # fmt: skip

# Relative frequency of each common class among an image's objects. Paper, plastic bags, general trash
# and plastic dominate as in the real data; the middle classes are less starved than there, so that a
# small model trained from scratch on a CPU learns every class within a dozen epochs.
COMMON_WEIGHTS = {
    "General trash": 0.16, "Paper": 0.18, "Paper pack": 0.1, "Metal": 0.1,
    "Glass": 0.1, "Plastic": 0.14, "Styrofoam": 0.08, "Plastic bag": 0.16,
}  # fmt: skip

# Rare classes appear in exactly this share of each split's images, so a 3-fold split of 240 training
# images still holds each one in every fold.
RARE_SHARE = {"Battery": 0.06, "Clothing": 0.06}

# Independent random streams per split, so the test images do not change with n_train.
SPLIT_STREAMS = {"train": 0, "test": 1}

# Annotation storage formats, drawn per object, so loaders meet every kind the real data may hold.
FORMAT_SHARE = {"polygon": 0.76, "rle": 0.10, "compressed_rle": 0.10, "crowd": 0.04}


@dataclass(frozen=True)
class Frame:
    """An object's placement: centre (x, y), rotation (radians) and extent along / across its axis (px)."""

    cx: float
    cy: float
    angle: float
    length: float
    width: float

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised object frame (u along the axis, v across, each -1..1) -> image (x, y)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = u * self.length / 2, v * self.width / 2
        return self.cx + u * c - v * s, self.cy + u * s + v * c

    def from_image(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (x, y) -> normalised object frame (u, v), each -1..1 across the object's extent."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        return (dx * c + dy * s) / (self.length / 2), (-dx * s + dy * c) / (self.width / 2)


@dataclass(frozen=True)
class Sprite:
    """A drawable object: its outline (unit-frame points), colour image HxWx3 and opacity (scalar or HxW)."""

    outline: np.ndarray  # (N, 2) points (u, v) in -1..1
    rgb: np.ndarray
    alpha: float | np.ndarray


@dataclass(frozen=True)
class Canvas:
    """Pixel-centre coordinates of a square image, shared by every texture drawn on it."""

    size: int
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def square(cls, size: int) -> Canvas:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        return cls(size, x, y)


def generate_demo(out_dir: str | Path, params: DemoParams) -> None:
    """Write `out_dir/images/*.jpg`, `train.json`, `test.json` (no annotations) and `test_truth.json`.

    Deterministic in `params.seed`; each image depends only on (seed, split, index).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": k, "name": name, "supercategory": name} for k, name in enumerate(CATEGORIES, 1)]
    info = {"description": f"trashseg generated demo data (seed {params.seed})"}
    head = {"info": info, "categories": categories}
    train_images, train_annotations = _render_split(out, params, "train", params.n_train)
    test_images, test_annotations = _render_split(out, params, "test", params.n_test)
    _write(out / "train.json", {**head, "images": train_images, "annotations": train_annotations})
    _write(out / "test.json", {**head, "images": test_images})
    _write(out / "test_truth.json", {**head, "images": test_images, "annotations": test_annotations})


def _render_split(
    out: Path, params: DemoParams, split: str, n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render and save one split's images; return its COCO `images` and `annotations` lists."""
    stream = SPLIT_STREAMS[split]
    rare = _rare_images(params.seed, stream, n)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in tqdm(range(n), desc=f"demo {split}", unit="img", leave=False):
        rng = np.random.default_rng([params.seed, stream, index])
        names = _object_classes(rng, params.max_objects, [c for c in RARE_SHARE if index in rare[c]])
        pixels, objects, _ = render_image(rng, params.image_size, names)
        file_name = f"images/{split}_{index:04d}.jpg"
        Image.fromarray(pixels).save(out / file_name, quality=params.jpeg_quality)
        size = params.image_size
        images.append({"id": index, "file_name": file_name, "height": size, "width": size})
        for obj in objects:
            annotations.append({"id": len(annotations), "image_id": index, **obj})
    return images, annotations


def render_image(
    rng: np.random.Generator, size: int, class_names: list[str]
) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Draw one photo: (RGB uint8 HxWx3, COCO annotation fields per object, uint8 HxW class map).

    Objects are painted largest first, each through the mask of the polygon it is annotated with, so the
    class map equals `coco.rasterize(..., overlap="area_desc")` of the annotations.
    """
    canvas = Canvas.square(size)
    image = _background(rng, canvas)
    drawn = []
    for name in class_names:
        frame, sprite = SPRITES[name](rng, canvas)
        x, y = frame.to_image(sprite.outline[:, 0], sprite.outline[:, 1])
        # Clamped into the image like real annotations; the object is painted through this very polygon,
        # so clamping cannot make image and annotation disagree.
        polygon = np.stack([np.clip(x, 0, size), np.clip(y, 0, size)], axis=1).round(1)
        mask = decode_segmentation([polygon.ravel().tolist()], size, size)
        drawn.append((name, polygon, mask, sprite))
    # Same order as rasterize's area_desc rule: larger first, ties by annotation id (creation order).
    order = sorted(range(len(drawn)), key=lambda i: -int(drawn[i][2].sum()))
    class_map = np.zeros((size, size), dtype=np.uint8)
    for i in order:
        name, _, mask, sprite = drawn[i]
        alpha = sprite.alpha if np.isscalar(sprite.alpha) else sprite.alpha[mask, None]
        image[mask] = (1 - alpha) * image[mask] + alpha * _jitter(rng, sprite.rgb[mask])
        class_map[mask] = CATEGORIES.index(name) + 1
    image = np.clip(image + rng.normal(0, 0.015, image.shape), 0, 1)  # sensor noise
    objects = [_annotation(rng, name, polygon, mask) for name, polygon, mask, _ in drawn]
    return (image * 255 + 0.5).astype(np.uint8), objects, class_map


def _rare_images(seed: int, stream: int, n: int) -> dict[str, set[int]]:
    """For each rare class, the indexes of the images that hold it (a fixed share, at least 2)."""
    # An entropy word no image index reaches, so this stream never equals an image's.
    rng = np.random.default_rng([seed, stream, 2**32 - 1])
    return {
        name: set(rng.choice(n, size=min(n, max(2, round(share * n))), replace=False).tolist())
        for name, share in RARE_SHARE.items()
    }


def _object_classes(rng: np.random.Generator, max_objects: int, rare: list[str]) -> list[str]:
    """The classes of one image's objects: its rare classes first, then common ones drawn by weight."""
    rare = rare[:max_objects]
    n = int(rng.integers(1, max_objects + 1))
    names = list(COMMON_WEIGHTS)
    p = np.array(list(COMMON_WEIGHTS.values()))
    common = [names[k] for k in rng.choice(len(names), size=max(0, n - len(rare)), p=p / p.sum())]
    return rare + common


def _annotation(rng: np.random.Generator, name: str, polygon: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of one object, stored in a randomly drawn format that decodes to exactly `mask`."""
    kinds = list(FORMAT_SHARE)
    kind = kinds[rng.choice(len(kinds), p=list(FORMAT_SHARE.values()))]
    x, y = polygon[:, 0], polygon[:, 1]
    if kind == "polygon":
        segmentation: Any = [polygon.ravel().tolist()]
    elif kind == "compressed_rle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = {"size": list(mask.shape), "counts": _uncompressed_counts(mask)}
    return {
        "category_id": CATEGORIES.index(name) + 1,
        "segmentation": segmentation,
        # Shoelace area of the polygon: approximate, as in real data; the pipeline measures masks itself.
        "area": round(float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2), 1),
        "bbox": [float(x.min()), float(y.min()), float(x.max() - x.min()), float(y.max() - y.min())],
        "iscrowd": int(kind == "crowd"),
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts: alternating run lengths of 0s then 1s, column-major."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _write(path: Path, coco: dict[str, Any]) -> None:
    path.write_text(json.dumps(coco, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------------------
# Textures. Colours are float RGB in 0..1; every function draws on the whole canvas and the caller keeps
# the object's mask, which is cheap at demo sizes and keeps each texture a plain array expression.


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Value noise in 0..1 with features about `cell` pixels across (bicubic upsampling of a coarse grid)."""
    n = max(2, round(size / cell)) + 1
    coarse = Image.fromarray(rng.random((n, n), dtype=np.float32), mode="F")
    return np.clip(np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)), 0, 1)


def _jitter(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Per-object brightness and per-channel colour jitter, so colour alone is not a perfect cue."""
    gain = rng.uniform(0.85, 1.12) * rng.uniform(0.92, 1.08, size=3)
    return np.clip(rgb * gain, 0, 1)


def _colour(rng: np.random.Generator, base: tuple[float, float, float], spread: float = 0.06) -> np.ndarray:
    return np.clip(np.array(base) + rng.normal(0, spread, 3), 0, 1)


def _fill(canvas: Canvas, colour: np.ndarray) -> np.ndarray:
    return np.broadcast_to(colour.astype(np.float32), (canvas.size, canvas.size, 3)).copy()


def _background(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    """A muted floor: wood grain, tiles, concrete or a gradient, so objects must be told from texture."""
    kind = rng.integers(4)
    s = canvas.size
    if kind == 0:  # wood
        a = rng.uniform(0, math.pi)
        t = (canvas.x * math.cos(a) + canvas.y * math.sin(a)) / s
        grain = 0.5 + 0.5 * np.sin(t * rng.uniform(25, 45) + 6 * _smooth_noise(rng, s, s / 4))
        base = _colour(rng, (0.45, 0.32, 0.2), 0.04)
        return _fill(canvas, base) * (0.75 + 0.35 * grain[..., None])
    if kind == 1:  # tiles with grout
        period = s / rng.integers(3, 7)
        gx, gy = canvas.x % period, canvas.y % period
        grout = (np.minimum(gx, gy) < period * 0.05)[..., None]
        tone = 0.9 + 0.2 * rng.random((s // int(period) + 2,) * 2)
        tile = tone[(canvas.y // period).astype(int), (canvas.x // period).astype(int)][..., None]
        base = _fill(canvas, _colour(rng, (0.55, 0.53, 0.5), 0.05)) * tile
        return np.where(grout, base * 0.55, base)
    if kind == 2:  # concrete
        noise = 0.6 * _smooth_noise(rng, s, s / 8) + 0.4 * _smooth_noise(rng, s, 3)
        return _fill(canvas, _colour(rng, (0.42, 0.42, 0.4), 0.04)) * (0.8 + 0.4 * noise[..., None])
    a, b = _colour(rng, (0.35, 0.38, 0.42), 0.03), _colour(rng, (0.55, 0.5, 0.45), 0.03)
    t = ((canvas.x * rng.uniform(-1, 1) + canvas.y * rng.uniform(-1, 1)) / (2 * s) + 0.5)[..., None]
    return (1 - t) * a + t * b + rng.normal(0, 0.02, (s, s, 3))


# ---------------------------------------------------------------------------------------------------------
# Shapes: outlines in the unit object frame (u along the axis, v across, both -1..1).


def _ellipse(n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _blob(rng: np.random.Generator, harmonics: range, amplitude: float, n: int = 40) -> np.ndarray:
    """A smooth star-shaped outline: a circle whose radius wobbles with random low harmonics."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n)
    for k in harmonics:
        r += rng.uniform(0, amplitude) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    r /= r.max()
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _capsule(ratio: float, n: int = 10) -> np.ndarray:
    """A rectangle with round ends; `ratio` = width / length."""
    t = np.linspace(-math.pi / 2, math.pi / 2, n)
    cap_u = 1 - ratio
    right = np.stack([cap_u + ratio * np.cos(t), np.sin(t)], axis=1)
    return np.concatenate([right, -right])


RECT = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
# Milk carton: a box with a gable top.
CARTON = np.array([[-1, -1], [0.55, -1], [1, 0], [0.55, 1], [-1, 1]], dtype=float)
# Bottle: body, shoulder, neck (u from base to mouth).
BOTTLE = np.array(
    [[-1, -0.9], [-0.95, -1], [0.25, -1], [0.55, -0.38], [1, -0.38], [1, 0.38], [0.55, 0.38], [0.25, 1],
     [-0.95, 1], [-1, 0.9]]
)  # fmt: skip


def _frame(
    rng: np.random.Generator, canvas: Canvas, length: tuple[float, float], ratio: tuple[float, float]
) -> Frame:
    """Random placement with the object's length a fraction of the image side and width = ratio * length."""
    s = canvas.size
    size = rng.uniform(*length) * s
    return Frame(
        cx=rng.uniform(0.2, 0.8) * s,
        cy=rng.uniform(0.2, 0.8) * s,
        angle=rng.uniform(0, math.pi),
        length=size,
        width=size * rng.uniform(*ratio),
    )


# ---------------------------------------------------------------------------------------------------------
# One sprite function per class, each with its own shape, texture and hue family (jittered per object):
#   General trash  jagged polygon, dark patchwork        Paper        rectangle, blue-white ruled sheet
#   Paper pack     gabled carton, red diagonal print     Metal        ellipse, steel-blue pressed rings
#   Glass          bottle, translucent green + highlight Plastic      rounded rectangle, glossy blue
#   Styrofoam      chamfered block, white beads          Plastic bag  wavy blob, translucent yellow wrinkles
#   Battery        capsule, copper top on black          Clothing     large blob, purple/magenta plaid


def _general_trash(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.37, 0.55), (0.7, 1.0))
    n = int(rng.integers(9, 14))
    t = np.sort(rng.uniform(0, 2 * math.pi, n))
    r = rng.uniform(0.6, 1.0, n)
    outline = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    # A dark patchwork of mixed debris colours.
    palette = rng.uniform(0.05, 0.3, (4, 3))
    patch = np.minimum((_smooth_noise(rng, canvas.size, canvas.size / 14) * 4).astype(int), 3)
    rgb = palette[patch] * (0.85 + 0.3 * _smooth_noise(rng, canvas.size, 2)[..., None])
    return frame, Sprite(outline, rgb, 1.0)


def _paper(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.4, 0.6), (0.6, 0.8))
    u, v = frame.from_image(canvas.x, canvas.y)
    rgb = _fill(canvas, _colour(rng, (0.88, 0.92, 1.0), 0.03))
    spacing = canvas.size * 0.04 / (frame.width / 2)
    ruled = ((v + 2) % spacing) < spacing * 0.3
    rgb[ruled] = _colour(rng, (0.25, 0.35, 0.8), 0.05)
    rgb[np.abs(u + 0.7) < 0.025] = _colour(rng, (0.85, 0.3, 0.3), 0.05)  # margin line
    return frame, Sprite(RECT, rgb, 1.0)


def _paper_pack(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.4, 0.55), (0.45, 0.6))
    u, v = frame.from_image(canvas.x, canvas.y)
    rgb = _fill(canvas, _colour(rng, (0.9, 0.9, 0.88), 0.03))
    print_colour = _colour(rng, (0.85, 0.12, 0.12), 0.05)
    period = canvas.size * 0.09
    stripes = (((u * frame.length + v * frame.width) / 2) % period) < period * 0.6
    rgb[stripes] = print_colour
    rgb[u > 0.55] = print_colour * 0.7  # gable top
    return frame, Sprite(CARTON, rgb, 1.0)


def _metal(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.35, 0.5), (0.55, 0.9))
    u, v = frame.from_image(canvas.x, canvas.y)
    radius = np.sqrt(u**2 + v**2)
    # A can seen from above: concentric pressed rings under a sideways sheen, steel-blue.
    rings = 0.5 + 0.5 * np.cos(radius * 2 * math.pi * rng.uniform(2.5, 3.5))
    sheen = 0.7 + 0.3 * np.cos(v * math.pi / 2 + rng.uniform(-0.5, 0.5)) ** 2
    brushed = 0.9 + 0.2 * _smooth_noise(rng, canvas.size, 2)
    grey = (0.35 + 0.55 * rings) * sheen * brushed
    tint = _colour(rng, (0.75, 0.82, 0.95), 0.04)
    return frame, Sprite(_ellipse(), grey[..., None] * tint, 1.0)


def _glass(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.45, 0.65), (0.3, 0.4))
    u, v = frame.from_image(canvas.x, canvas.y)
    tint = _colour(rng, (0.15, 0.55, 0.2), 0.05)
    rgb = _fill(canvas, tint) * (0.6 + 0.4 * (1 - np.abs(v)))[..., None]
    highlight = (np.abs(v + 0.45) < 0.12) & (u < 0.9)
    rgb[highlight] = 0.92
    alpha = np.where(highlight, 0.95, 0.85).astype(np.float32)
    return frame, Sprite(BOTTLE, rgb, alpha)


def _plastic(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.37, 0.55), (0.45, 0.7))
    u, v = frame.from_image(canvas.x, canvas.y)
    hue = [(0.1, 0.35, 0.85), (0.15, 0.55, 0.95)][rng.integers(2)]
    rgb = _fill(canvas, _colour(rng, hue, 0.05)) * (0.75 + 0.25 * (1 - v**2))[..., None]
    gloss = np.abs(0.6 * u + 0.8 * v - 0.3) < 0.12
    rgb[gloss] = rgb[gloss] * 0.4 + 0.6
    superellipse = _ellipse(36)
    outline = np.sign(superellipse) * np.abs(superellipse) ** 0.5  # rounded rectangle
    return frame, Sprite(outline, rgb, 0.92)


def _styrofoam(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.37, 0.55), (0.6, 0.9))
    cuts = rng.uniform(0.15, 0.4, 4)
    outline = np.array(
        [[-1 + cuts[0], -1], [1 - cuts[1], -1], [1, -1 + cuts[1]], [1, 1 - cuts[2]],
         [1 - cuts[2], 1], [-1 + cuts[3], 1], [-1, 1 - cuts[3]], [-1, -1 + cuts[0]]]
    )  # fmt: skip
    beads = _smooth_noise(rng, canvas.size, 2.5)
    speckle = rng.random((canvas.size, canvas.size)) < 0.04
    grey = np.where(speckle, 0.7, 0.88 + 0.12 * beads)
    return frame, Sprite(outline, grey[..., None] * _colour(rng, (1.0, 1.0, 0.98), 0.02), 1.0)


def _plastic_bag(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.45, 0.65), (0.6, 0.9))
    u, _ = frame.from_image(canvas.x, canvas.y)
    pale = [(0.95, 0.85, 0.3), (0.95, 0.9, 0.4)][rng.integers(2)]
    warp = 3 * _smooth_noise(rng, canvas.size, canvas.size / 5)
    wrinkles = 0.5 + 0.5 * np.sin(u * frame.length / (canvas.size * 0.025) + warp)
    rgb = _fill(canvas, _colour(rng, pale, 0.03)) * (0.72 + 0.3 * wrinkles)[..., None]
    return frame, Sprite(_blob(rng, range(5, 9), 0.07, n=48), rgb, 0.85)


def _battery(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.38, 0.5), (0.38, 0.45))
    u, v = frame.from_image(canvas.x, canvas.y)
    body = _colour(rng, (0.08, 0.08, 0.1), 0.02)
    rgb = _fill(canvas, body)
    rgb[u > -0.3] = _colour(rng, (0.85, 0.5, 0.12), 0.04)  # copper top
    rgb[u > 0.85] = 0.8  # terminal
    rgb[np.abs(u + 0.3) < 0.06] = 0.9  # label stripe
    shading = 0.55 + 0.45 * np.cos(np.clip(v, -1, 1) * math.pi / 2)
    return frame, Sprite(_capsule(frame.width / frame.length), rgb * shading[..., None], 1.0)


def _clothing(rng: np.random.Generator, canvas: Canvas) -> tuple[Frame, Sprite]:
    frame = _frame(rng, canvas, (0.55, 0.75), (0.65, 0.9))
    c, s = math.cos(frame.angle), math.sin(frame.angle)
    a = (canvas.x * c + canvas.y * s) % (canvas.size * 0.08)
    b = (-canvas.x * s + canvas.y * c) % (canvas.size * 0.08)
    across, along = a < canvas.size * 0.025, b < canvas.size * 0.025
    base = _colour(rng, [(0.55, 0.15, 0.6), (0.75, 0.1, 0.45)][rng.integers(2)], 0.05)
    stripe = _colour(rng, (0.92, 0.88, 0.7), 0.05)
    rgb = _fill(canvas, base)
    rgb[across | along] = 0.5 * base + 0.5 * stripe
    rgb[across & along] = stripe * 0.9
    rgb *= (0.9 + 0.2 * _smooth_noise(rng, canvas.size, 2))[..., None]  # weave
    return frame, Sprite(_blob(rng, range(2, 4), 0.18), rgb, 1.0)


SpriteFn = Callable[[np.random.Generator, Canvas], tuple[Frame, Sprite]]
SPRITES: dict[str, SpriteFn] = {
    "General trash": _general_trash,
    "Paper": _paper,
    "Paper pack": _paper_pack,
    "Metal": _metal,
    "Glass": _glass,
    "Plastic": _plastic,
    "Styrofoam": _styrofoam,
    "Plastic bag": _plastic_bag,
    "Battery": _battery,
    "Clothing": _clothing,
}
