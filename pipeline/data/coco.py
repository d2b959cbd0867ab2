"""COCO json -> semantic masks and instance maps: load and validate annotations, rasterize, write them."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from tqdm import tqdm

from pipeline.data.images import (
    INSTANCES_DIR,
    MAX_INSTANCES,
    ObjectRecord,
    file_name_problem,
    instance_map_path,
    mask_relpath,
    objects_path,
    read_image,
    write_instance_map,
    write_mask,
    write_objects,
)
from pipeline.data.records import MIN_OBJECT_PIXELS, CocoSet, ImageRecord, OnBad, Overlap, Unused
from pipeline.errors import UserError


def load_coco(
    json_path: str | Path,
    root: str | Path | None = None,
    on_bad: OnBad = "error",
    *,
    require_annotations: bool = False,
    unused: Unused = "keep",
    classes_from: CocoSet | None = None,
) -> CocoSet:
    """Read and validate a COCO json; `root` is the folder `file_name`s are relative to (default: the json's).

    Structural problems (not json, missing lists, duplicate or unsafe images, bad categories) always raise
    `UserError`. A bad annotation (unknown image or category, malformed polygon or RLE) raises with
    `on_bad="error"` and is dropped and counted in `.skipped` / `.problems` with `on_bad="skip"`. Polygon
    coordinates outside the image are legal: the rasterizer intersects the polygon with the image, and
    such annotations are counted in `.clipped`. Without an `annotations` key, or with an empty list, the
    set has no objects, unless `require_annotations` (a training set) makes that an error. Only
    `segmentation` is read: `area`, `bbox` and `iscrowd` may be missing or wrong.

    The classes: with `classes_from` (the loaded training set) they are its classes, the json must list
    each of their category ids, and annotations of its other categories are ignored and counted in
    `.ignored`. Without it this json decides: its categories in json order, where a category that no
    annotation names is kept (`unused="keep"`, so class indexes never shift) or removed (`"drop"`); see
    `unused_report`.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if unused not in ("keep", "drop"):
        raise ValueError(f"unused must be 'keep' or 'drop', got {unused!r}")
    path = Path(json_path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a JSON object with images/annotations/categories")
    required = ["images", "categories"] + (["annotations"] if require_annotations else [])
    for key in required:
        if key not in data:
            raise UserError(f"{path}: no '{key}' list (a COCO json needs images, annotations, categories)")
    for key in ("images", "categories", "annotations"):
        if key in data and not isinstance(data[key], list):
            raise UserError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    if require_annotations and not data["annotations"]:
        raise UserError(f"{path}: 'annotations' is empty; a training set needs annotated objects")

    category_names = _parse_categories(path, data["categories"])
    raw_annotations = data.get("annotations", [])
    unused_found: dict[int, str] = {}
    if classes_from is not None:
        category_ids, classes = _classes_from(path, category_names, classes_from)
    else:
        unused_found = _unused_categories(category_names, raw_annotations)
        category_ids = [cid for cid in category_names if unused == "keep" or cid not in unused_found]
        if not category_ids:
            raise UserError(
                f"{path}: no annotation names any of its {len(category_names)} categories, so dropping "
                "unused categories leaves no class (data.unused_categories: keep, or load the training "
                "json's classes)"
            )
        classes = _display_names(path, category_names, category_ids)
    images = _parse_images(path, data["images"])
    coco = CocoSet(
        path=path,
        root=Path(root) if root is not None else path.parent,
        classes=["background", *classes],
        category_ids=category_ids,
        images=images,
        annotations={image.id: [] for image in images},
        has_annotations=bool(raw_annotations),
        category_names=category_names,
        unused=unused_found,
    )
    by_id = {image.id: image for image in images}
    for index, ann in enumerate(raw_annotations):
        problem, clipped = _annotation_problem(ann, by_id, category_names)
        if problem is not None:
            message = f"{path}: {_describe_annotation(ann, index)}: {problem}"
            if on_bad == "error":
                raise UserError(message)
            coco.skipped += 1
            coco.problems.append(message)
            continue
        if ann["category_id"] not in coco.label_of_category:
            coco.ignored += 1  # a category the training set dropped: not a class, so not in any mask
            continue
        coco.clipped += clipped
        coco.annotations[ann["image_id"]].append(ann)
    return coco


def load_with_training_classes(
    json_path: str | Path,
    train_json: str | Path | None,
    root: str | Path | None = None,
    on_bad: OnBad = "error",
    unused: Unused = "keep",
) -> CocoSet:
    """A test or truth json with the classes of the training json `train_json` (loaded with `unused`).

    The two must agree (`check_same_classes`). Without `train_json` the json is loaded alone, which gives
    the same classes only when unused categories are kept; with `unused="drop"` that is a `UserError`.
    """
    if train_json is None:
        if unused == "drop":
            raise UserError(
                f"{json_path}: with data.unused_categories: drop the classes come from the training json; "
                "give it (--train-json)"
            )
        return load_coco(json_path, root, on_bad)
    train = load_coco(train_json, on_bad=on_bad, unused=unused)
    loaded = load_coco(json_path, root, on_bad, classes_from=train)
    check_same_classes(train, loaded)
    return loaded


def unused_report(coco: CocoSet) -> str | None:
    """One line naming the categories no annotation of `coco` uses and what became of them; None if none.

    e.g. `train.json: category id 0 'medical-waste' is used by no annotation: kept as class 1
    (data.unused_categories: drop removes it)`.
    """
    if not coco.unused:
        return None
    fates = {
        cid: f"kept as class {coco.label_of_category[cid]}" if cid in coco.label_of_category else "dropped"
        for cid in coco.unused
    }
    kept = any(cid in coco.label_of_category for cid in coco.unused)  # one load keeps all or drops all
    if len(fates) == 1:
        cid, name = next(iter(coco.unused.items()))
        what = f"category id {cid} {name!r} is used by no annotation: {fates[cid]}"
        hint = "drop removes it" if kept else "keep keeps it as a class"
    else:
        listed = ", ".join(f"id {cid} {name!r} {fates[cid]}" for cid, name in coco.unused.items())
        what = f"{len(fates)} categories are used by no annotation: {listed}"
        hint = "drop removes them" if kept else "keep keeps them as classes"
    return f"{coco.path}: {what} (data.unused_categories: {hint})"


def check_same_classes(train: CocoSet, test: CocoSet) -> None:
    """Raise `UserError` unless `test` has `train`'s classes and lists no category `train`'s json lacks.

    Classes match when they have the same category ids in the same order and each id has the same name in
    both jsons; names are compared per id, since one json may legitimately give two ids the same name.
    """
    a = [(cid, train.category_names[cid]) for cid in train.category_ids]
    b = [(cid, test.category_names[cid]) for cid in test.category_ids]
    if a != b:
        if len(a) != len(b):
            raise UserError(
                f"{test.path}: {len(b)} categories but {train.path} has {len(a)}; they must match"
            )
        k = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        raise UserError(
            f"{test.path}: category {k + 1} is {b[k][1]!r} (id {b[k][0]}) but in {train.path} it is "
            f"{a[k][1]!r} (id {a[k][0]}); train and test must list the same categories"
        )
    # With classes_from the test set's class list is copied from train, so also compare the test json's
    # own order: loaded alone (a CLI score without --train-json) it would index the classes that way.
    classes = set(train.category_ids)
    own_order = [cid for cid in test.category_names if cid in classes]
    if own_order != train.category_ids:
        k = next(
            (i for i, (x, y) in enumerate(zip(own_order, train.category_ids, strict=False)) if x != y), 0
        )
        raise UserError(
            f"{test.path}: lists category id {own_order[k]} where {train.path} lists id "
            f"{train.category_ids[k]}; train and test must list the categories in the same order"
        )
    extra = next((cid for cid in test.category_names if cid not in train.category_names), None)
    if extra is not None:
        raise UserError(
            f"{test.path}: category id {extra} ({test.category_names[extra]!r}) is not in {train.path}; "
            "train and test must list the same categories"
        )


# ---------------------------------------------------------------------------------------------------------
# Rasterization


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Binary mask (bool HxW) of one annotation's polygons, uncompressed RLE or compressed RLE.

    Decoding is pycocotools' (the reference implementation), so masks agree with `COCO.annToMask`.
    """
    return mask_utils.decode(_to_rle(segmentation, height, width)).astype(bool)


def rasterize(coco: CocoSet, image: ImageRecord, overlap: Overlap = "area_desc") -> np.ndarray:
    """Semantic mask (uint8 HxW of class indexes, 0 = background) of `image`'s annotations.

    Where objects overlap, `overlap` decides the winner: "area_desc" paints the largest object first so
    smaller ones stay visible on top (area counted from the decoded mask, never the json's `area` field);
    "max_class" gives each pixel the highest class index covering it. Ties go by annotation id.
    """
    return _paint(coco, image, overlap, with_instances=False)[0]


def rasterize_instances(
    coco: CocoSet, image: ImageRecord, overlap: Overlap = "area_desc"
) -> tuple[np.ndarray, np.ndarray]:
    """(semantic mask as `rasterize` gives it, instance map uint16 HxW) of `image`'s annotations.

    The instance map holds k where the image's k-th annotation (1-based, in `coco.annotations[image.id]`
    order) owns the pixel after the `overlap` rule, 0 where no object is: both maps come from one painting
    pass, so instance > 0 exactly where class > 0 and instance k's pixels carry its annotation's class.
    """
    n = len(coco.annotations[image.id])
    if n > MAX_INSTANCES:
        raise UserError(
            f"{coco.path}: image id {image.id} ({image.file_name}) has {n} annotations; its instance map "
            f"(a 16-bit PNG) holds at most {MAX_INSTANCES}"
        )
    mask, instances = _paint(coco, image, overlap, with_instances=True)
    assert instances is not None
    return mask, instances


def _paint(
    coco: CocoSet, image: ImageRecord, overlap: Overlap, with_instances: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The class mask and, if asked, the instance map, painting each decoded annotation once."""
    try:
        order_rule = OVERLAP_RULES[overlap]
    except KeyError:
        raise ValueError(f"unknown overlap rule {overlap!r}; valid: {', '.join(OVERLAP_RULES)}") from None
    anns = coco.annotations[image.id]
    rles = [_to_rle(ann["segmentation"], image.height, image.width) for ann in anns]
    labels = [coco.label(ann) for ann in anns]
    areas = [int(mask_utils.area(rle)) for rle in rles]
    ids = [ann.get("id", position) for position, ann in enumerate(anns)]
    mask = np.zeros((image.height, image.width), dtype=np.uint8)
    instances = np.zeros((image.height, image.width), dtype=np.uint16) if with_instances else None
    for i in order_rule(areas, labels, ids):
        pixels = mask_utils.decode(rles[i]).astype(bool)
        mask[pixels] = labels[i]
        if instances is not None:
            instances[pixels] = i + 1
    return mask, instances


def _paint_area_desc(areas: Sequence[int], labels: Sequence[int], ids: Sequence[int]) -> list[int]:
    return sorted(range(len(areas)), key=lambda i: (-areas[i], ids[i]))


def _paint_max_class(areas: Sequence[int], labels: Sequence[int], ids: Sequence[int]) -> list[int]:
    return sorted(range(len(areas)), key=lambda i: (labels[i], ids[i]))


# Each rule returns the painting order (later paints over earlier) from per-object (areas, labels, ids).
OVERLAP_RULES: dict[str, Callable[[Sequence[int], Sequence[int], Sequence[int]], list[int]]] = {
    "area_desc": _paint_area_desc,
    "max_class": _paint_max_class,
}


def _to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """pycocotools RLE of a validated segmentation (the same three cases as `COCO.annToRLE`)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": segmentation["size"], "counts": counts}


# ---------------------------------------------------------------------------------------------------------
# Files: checking images, writing masks


def check_images(coco: CocoSet) -> None:
    """Decode every image of `coco` and check its size against the json; `UserError` on the first bad one."""
    for image in tqdm(coco.images, desc=f"check {coco.path.name} images", unit="img"):
        read_image(coco.image_file(image), (image.height, image.width))


def write_masks(coco: CocoSet, out_dir: str | Path, overlap: Overlap = "area_desc") -> np.ndarray:
    """Check each image of `coco` and write its semantic mask to `out_dir/mask_relpath(file_name)`, its
    instance map (`rasterize_instances`) to `instance_map_path(out_dir, file_name)`, and the bank of every
    object's visible pixels (`visible_objects`) to `objects_path(out_dir)`.

    Returns bool (len(coco.images), n_classes): the classes each mask holds (column 0 background).
    """
    _check_instance_paths(coco)
    presence = np.zeros((len(coco.images), coco.n_classes), dtype=bool)
    objects: list[ObjectRecord] = []
    for row, image in enumerate(tqdm(coco.images, desc=f"masks for {coco.path.name}", unit="img")):
        read_image(coco.image_file(image), (image.height, image.width))
        mask, instances = rasterize_instances(coco, image, overlap)
        presence[row, np.unique(mask)] = True
        write_mask(Path(out_dir) / mask_relpath(image.file_name), mask)
        write_instance_map(instance_map_path(out_dir, image.file_name), instances)
        labels = [coco.label(ann) for ann in coco.annotations[image.id]]
        objects += visible_objects(image.file_name, instances, labels)
    write_objects(objects_path(out_dir), objects, MIN_OBJECT_PIXELS)
    return presence


def visible_objects(
    file_name: str, instances: np.ndarray, labels: Sequence[int], min_pixels: int = MIN_OBJECT_PIXELS
) -> list[ObjectRecord]:
    """The objects of one instance map (uint16 HxW, k = labels[k - 1]'s object) with at least
    `min_pixels` visible pixels, in instance order: bbox (x, y, w, h) and area of their pixels."""
    n = len(labels)
    if instances.size and int(instances.max()) > n:
        raise ValueError(f"{file_name}: instance map holds id {instances.max()} but there are {n} labels")
    area = np.bincount(instances.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(instances, max_label=n)  # (rows, cols) slices per id 1..n; None if absent
    return [
        ObjectRecord(file_name, k, int(labels[k - 1]), _xywh(boxes[k - 1]), int(area[k]))
        for k in range(1, n + 1)
        if area[k] >= max(1, min_pixels)  # ids with no pixel left have no box
    ]


def _xywh(box: tuple[slice, slice]) -> tuple[int, int, int, int]:
    rows, cols = box
    return cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start


def _check_instance_paths(coco: CocoSet) -> None:
    """`UserError` if an instance map would land on another image's mask: images `x.jpg` and
    `instances/x.jpg` both claim `instances/x.png` of the masks folder."""
    owners = {mask_relpath(image.file_name): image.file_name for image in coco.images}
    for image in coco.images:
        taken = owners.get(f"{INSTANCES_DIR}/{mask_relpath(image.file_name)}")
        if taken is not None:
            raise UserError(
                f"{coco.path}: the instance map of {image.file_name!r} would overwrite the mask of "
                f"{taken!r} ({INSTANCES_DIR}/ of the masks folder holds instance maps); rename the folder "
                f"{INSTANCES_DIR!r}"
            )


# ---------------------------------------------------------------------------------------------------------
# Validation


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a JSON file (not UTF-8 text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # thousands of nested brackets: no COCO file is nested more than a few levels
        raise UserError(f"{path}: not a COCO file (JSON nested too deeply to read)") from None


def load_image_list(path: Path) -> list[ImageRecord]:
    """The `images` of a COCO json (a competition's test json), checked as `load_coco` checks them;
    its categories and annotations are not read. No images is a UserError."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise UserError(f"{path}: not a COCO file (no 'images' list)")
    images = _parse_images(path, raw["images"])
    if not images:
        raise UserError(f"{path}: the 'images' list is empty")
    return images


def check_pixel_cap(coco: CocoSet, max_pixels: int) -> None:
    """A one-line UserError for the first image whose json size exceeds `max_pixels` (params
    data.max_image_pixels), before any image is decoded."""
    for image in coco.images:
        if image.height * image.width > max_pixels:
            raise UserError(
                f"{coco.path}: image id {image.id} ({image.file_name}) is {image.height}x{image.width}, "
                f"{image.height * image.width} pixels, over data.max_image_pixels ({max_pixels})"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_categories(path: Path, raw: list) -> dict[int, str]:
    """Category id -> name, in json order; names may repeat, ids may not.

    Annotations refer to categories by id alone, and Roboflow names its id-0 category after the dataset,
    often like a real class.
    """
    if not raw:
        raise UserError(f"{path}: 'categories' is empty")
    if len(raw) > 255:
        raise UserError(f"{path}: {len(raw)} categories; uint8 masks hold at most 255 (plus background)")
    names: dict[int, str] = {}
    for index, cat in enumerate(raw):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise UserError(f"{path}: categories[{index}] needs an integer 'id' and a string 'name': {cat!r}")
        if cat["id"] in names:
            raise UserError(f"{path}: category id {cat['id']} appears twice")
        names[cat["id"]] = cat["name"]
    return names


def _unused_categories(category_names: dict[int, str], annotations: list) -> dict[int, str]:
    """The categories (id -> name) no annotation names.

    An annotation names its category even if it is later skipped as bad, so that mending a polygon never
    changes which categories are unused, and so never shifts class indexes under `unused="drop"`.
    """
    named = {a["category_id"] for a in annotations if isinstance(a, dict) and _is_int(a.get("category_id"))}
    return {cid: name for cid, name in category_names.items() if cid not in named}


def _display_names(path: Path, category_names: dict[int, str], category_ids: list[int]) -> list[str]:
    """Class names for `category_ids`: the json's, with " (id N)" added where two classes share one.

    "background" counts as taken (it is class 0), so a category of that name is told apart too.
    """
    counts = Counter(["background", *(category_names[cid] for cid in category_ids)])
    shown = [
        f"{category_names[cid]} (id {cid})" if counts[category_names[cid]] > 1 else category_names[cid]
        for cid in category_ids
    ]
    taken = {"background"}
    for cid, name in zip(category_ids, shown, strict=True):
        if name in taken:  # only if a json names a category like "Glass (id 3)" next to two "Glass"es
            raise UserError(f"{path}: category id {cid}: class name {name!r} is given twice; rename one")
        taken.add(name)
    return shown


def _classes_from(path: Path, category_names: dict[int, str], train: CocoSet) -> tuple[list[int], list[str]]:
    """`train`'s category ids and display names, after checking this json lists every one of the ids."""
    for cid in train.category_ids:
        if cid not in category_names:
            raise UserError(
                f"{path}: no category id {cid} ({train.category_names[cid]!r} in {train.path}); "
                "it must list every class of the training set"
            )
    return list(train.category_ids), train.classes[1:]


def _parse_images(path: Path, raw: list) -> list[ImageRecord]:
    images: list[ImageRecord] = []
    seen_ids: set[int] = set()
    seen_masks: dict[str, str] = {}
    for index, img in enumerate(raw):
        if not isinstance(img, dict):
            raise UserError(f"{path}: images[{index}] must be an object, got {img!r}")
        fields = (img.get("id"), img.get("file_name"), img.get("height"), img.get("width"))
        image_id, file_name, height, width = fields
        if not (_is_int(image_id) and isinstance(file_name, str) and _is_int(height) and _is_int(width)):
            raise UserError(
                f"{path}: images[{index}] needs integer 'id', 'height', 'width' and a string 'file_name'"
            )
        if height <= 0 or width <= 0:
            raise UserError(f"{path}: image id {image_id} ({file_name}) has size {height}x{width}")
        if image_id in seen_ids:
            raise UserError(f"{path}: image id {image_id} appears twice (second time for {file_name!r})")
        problem = file_name_problem(file_name)
        if problem is not None:
            raise UserError(f"{path}: image id {image_id}: file_name {file_name!r} {problem}")
        # Masks are stored by mask_relpath, so `a.jpg` and `a.png` would collide as well as exact duplicates.
        # Keyed case-folded: `A.jpg` and `a.jpg` are one file on macOS and Windows file systems.
        key = mask_relpath(file_name).casefold()
        if key in seen_masks:
            other = seen_masks[key]
            if other == file_name:
                what = "appears twice"
            elif mask_relpath(other) == mask_relpath(file_name):
                what = f"and {other!r} would share mask file {mask_relpath(other)}"
            else:
                what = f"and {other!r} differ only by case: one file on macOS and Windows file systems"
            raise UserError(f"{path}: image id {image_id}: file_name {file_name!r} {what}")
        seen_ids.add(image_id)
        seen_masks[key] = file_name
        images.append(ImageRecord(id=image_id, file_name=file_name, height=height, width=width))
    return images


def _describe_annotation(ann: Any, index: int) -> str:
    if isinstance(ann, dict) and "id" in ann:
        return f"annotation id {ann['id']!r} (image id {ann.get('image_id')!r})"
    return f"annotations[{index}]"


def _annotation_problem(
    ann: Any, images: dict[int, ImageRecord], category_names: dict[int, str]
) -> tuple[str | None, bool]:
    """(what is wrong with `ann` or None, whether its polygon reaches outside the image)."""
    if not isinstance(ann, dict):
        return f"must be an object, got {ann!r}", False
    if "id" in ann and not _is_int(ann["id"]):
        return f"'id' must be an integer, got {ann['id']!r}", False
    for key in ("image_id", "category_id"):
        if not _is_int(ann.get(key)):
            return f"{key!r} must be an integer, got {ann.get(key)!r}", False
    image = images.get(ann["image_id"])
    if image is None:
        return f"image_id {ann['image_id']!r} is not in 'images'", False
    if ann["category_id"] not in category_names:
        return f"category_id {ann['category_id']!r} is not in 'categories'", False
    if "segmentation" not in ann:
        return "no 'segmentation'", False
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation, image.height, image.width)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, image.height, image.width), False
    kind = type(segmentation).__name__
    return f"'segmentation' must be a list of polygons or an RLE object, got {kind}", False


def _polygon_problem(polygons: list, height: int, width: int) -> tuple[str | None, bool]:
    if not polygons:
        return "'segmentation' is an empty polygon list", False
    outside = False
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in poly
        ):
            return f"polygon {k} must be a flat list of finite numbers [x1, y1, x2, y2, ...]", False
        if len(poly) % 2:
            return f"polygon {k} has an odd number of coordinates ({len(poly)})", False
        # pycocotools would also read a 4-number list as a bounding box, not a polygon.
        if len(poly) < 6:
            return f"polygon {k} has {len(poly) // 2} points; a polygon needs at least 3", False
        xs, ys = poly[0::2], poly[1::2]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        # pycocotools walks the whole outline at 5x resolution: a corrupt far-away vertex costs memory in
        # proportion to its distance (gigabytes at 1e8) and overflows int32 at 4e8, so bound it here.
        margin = max(height, width)
        if x0 < -margin or y0 < -margin or x1 > width + margin or y1 > height + margin:
            return (
                f"polygon {k} reaches ({_far_vertex(xs, ys, height, width)}), more than the image's "
                f"size outside the {height}x{width} image",
                False,
            )
        outside = outside or x0 < 0 or y0 < 0 or x1 > width or y1 > height
    return None, outside


def _far_vertex(xs: list[float], ys: list[float], height: int, width: int) -> str:
    """The vertex farthest outside the image, as "x, y" (for the error message)."""

    def distance(i: int) -> float:
        return max(-xs[i], xs[i] - width, -ys[i], ys[i] - height)

    far = max(range(len(xs)), key=distance)
    return f"{xs[far]:g}, {ys[far]:g}"


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if size != [height, width]:
        return f"RLE size {size!r} differs from the image's [height, width] [{height}, {width}]"
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "RLE counts must be non-negative integers"
        total = sum(counts)
    elif isinstance(counts, str | bytes):
        total = _compressed_rle_total(counts if isinstance(counts, str) else counts.decode("latin-1"))
        if total is None:
            return "compressed RLE counts string is malformed"
    else:
        return f"RLE counts must be a list or a string, got {type(counts).__name__}"
    # pycocotools decodes a short RLE into uninitialised memory without complaint, so check the total here.
    if total != height * width:
        return f"RLE counts cover {total} pixels but the image has {height}x{width} = {height * width}"
    return None


def _compressed_rle_total(counts: str) -> int | None:
    """Sum of the run lengths in a compressed COCO RLE string, or None if it is malformed.

    Mirrors pycocotools' `rleFrString` (6-bit chunks offset by 48, runs after the second stored as deltas
    from the run two back); used only to validate the string, never to decode a mask.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
    return sum(runs)
