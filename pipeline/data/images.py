"""Image and mask files: where they live; reading images; masks, instance maps and the object bank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_path, write_text
from pipeline.errors import UserError


def image_path(root: str | Path, file_name: str) -> Path:
    """root/file_name, refusing a `file_name` that is absolute or climbs out of `root` with `..`."""
    problem = file_name_problem(file_name)
    if problem is not None:
        raise UserError(f"{root}: file_name {file_name!r} {problem}")
    return Path(root) / file_name


def mask_relpath(file_name: str) -> str:
    """Relative path of an image's mask file: `batch_01_vt/0002.jpg` -> `batch_01_vt/0002.png`."""
    return str(PurePosixPath(file_name).with_suffix(".png"))


# Mask value of pixels that no loss and no score counts: pseudo-labels below the teacher's threshold.
IGNORE_INDEX = 255


# Subfolder of the masks folder holding the instance maps, at the same relative paths as the masks.
INSTANCES_DIR = "instances"
# Instance maps are 16-bit PNGs: 0 is "no object", so an image holds at most this many annotations.
MAX_INSTANCES = 65535


def instance_map_path(masks_dir: str | Path, file_name: str) -> Path:
    """Where the masks stage writes an image's instance map: masks_dir/instances/mask_relpath(file_name)."""
    return Path(masks_dir) / INSTANCES_DIR / mask_relpath(file_name)


# The masks folder's list of every annotated object (`ObjectRecord`), the sources of copy-paste.
OBJECTS_FILE = "objects.json"


def objects_path(masks_dir: str | Path) -> Path:
    """Where the masks stage writes the object bank: masks_dir/objects.json."""
    return Path(masks_dir) / OBJECTS_FILE


@dataclass(frozen=True)
class ObjectRecord:
    """One annotated object of a training image, as much of it as its instance map shows."""

    file_name: str  # the image (and so its instance map, `instance_map_path`)
    instance: int  # its value in the instance map (1-based)
    label: int  # class index (1..C-1; 0 is background)
    bbox: tuple[int, int, int, int]  # x, y, w, h of its visible pixels
    area: int  # number of visible pixels


def write_objects(path: str | Path, objects: list[ObjectRecord], min_pixels: int) -> None:
    """Write the object bank as JSON, atomically: `min_pixels` (objects with fewer visible pixels were
    left out) and `objects`, one {file_name, instance, class, bbox, area} per line."""
    lines = [json.dumps(_object_json(o), separators=(",", ":")) for o in objects]
    body = ",\n".join(lines)
    write_text(path, f'{{"min_pixels": {int(min_pixels)}, "objects": [\n{body}\n]}}\n')


def read_objects(path: str | Path) -> list[ObjectRecord]:
    """Read a bank written by `write_objects`; a one-line `UserError` if it is missing or malformed."""
    path = Path(path)
    hint = "re-run the masks stage"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: object bank not found ({hint})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: object bank is not valid JSON ({exc}); {hint}") from None
    raw = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise UserError(f"{path}: object bank has no 'objects' list ({hint})")
    objects = []
    for index, entry in enumerate(raw):
        record = _object_record(entry)
        if record is None:
            raise UserError(f"{path}: objects[{index}] is malformed: {entry!r} ({hint})")
        objects.append(record)
    return objects


def _object_json(o: ObjectRecord) -> dict[str, Any]:
    return {
        "file_name": o.file_name,
        "instance": o.instance,
        "class": o.label,
        "bbox": list(o.bbox),
        "area": o.area,
    }


def _object_record(entry: Any) -> ObjectRecord | None:
    """The record of one bank entry, or None if a field is missing or out of range."""
    if not isinstance(entry, dict):
        return None
    file_name, instance, label, bbox, area = (
        entry.get(key) for key in ("file_name", "instance", "class", "bbox", "area")
    )
    ints = [instance, label, area, *(bbox if isinstance(bbox, list) else [])]
    if not (
        isinstance(file_name, str)
        and file_name_problem(file_name) is None
        and isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
        and 1 <= instance <= MAX_INSTANCES
        and 1 <= label <= 255
        and bbox[0] >= 0
        and bbox[1] >= 0
        and bbox[2] >= 1
        and bbox[3] >= 1
        and 1 <= area <= bbox[2] * bbox[3]
    ):
        return None
    return ObjectRecord(file_name, instance, label, (bbox[0], bbox[1], bbox[2], bbox[3]), area)


# What `images_in_folder` takes for an image: the formats competitions ship test images in.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def images_in_folder(folder: Path) -> list[tuple[str, int, int]]:
    """(file name relative to `folder`, height, width) of every image file under `folder`, sorted by
    name; sizes come from the headers (nothing is decoded). No images is a UserError."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                found.append((path.relative_to(folder).as_posix(), img.height, img.width))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{path}: not a readable image ({exc})") from None
    if not found:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return found


def read_image(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 HxWx3; `UserError` if missing, empty, corrupt or the wrong size.

    EXIF orientation is deliberately ignored: annotations are in the stored pixel grid.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:  # reads the header only
            # A file that claims another size than its json is refused before it is decoded: a 68-byte
            # PNG can claim 20000 x 20000 pixels (1.2 GB decoded).
            if expected_hw is not None and (img.height, img.width) != tuple(expected_hw):
                raise UserError(
                    f"{path}: image is {img.height}x{img.width} (HxW) but the json says "
                    f"{expected_hw[0]}x{expected_hw[1]}"
                )
            img.load()  # decode now, so a truncated file fails here rather than later in a worker
            array = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused, too many pixels to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: truncated or corrupt image ({exc})") from None
    return array


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a uint8 HxW class-index mask as a grayscale PNG, atomically."""
    _write_png(path, mask, np.uint8, "mask")


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask written by `write_mask` (uint8 HxW of class indexes); with `expected_hw`, the size of
    its image, a mask of another size is a UserError (a stale masks folder)."""
    mask = _read_png(path, np.uint8, ("L",), "mask", "is the masks stage up to date?")
    _check_size(path, mask, "mask", expected_hw, "image")
    return mask


def write_instance_map(path: str | Path, instances: np.ndarray) -> None:
    """Write a uint16 HxW instance map (0 = no object, k = the image's k-th annotation) as a 16-bit PNG."""
    _write_png(path, instances, np.uint16, "instance map")


def read_instance_map(
    path: str | Path, expected_hw: tuple[int, ...] | None = None, against: str = "image"
) -> np.ndarray:
    """Read an instance map written by `write_instance_map` (uint16 HxW); with `expected_hw`, the size of
    its `against` (image or mask), a map of another size is a UserError (a stale masks folder)."""
    modes = ("I;16", "I;16B", "I;16L")
    instances = _read_png(path, np.uint16, modes, "instance map", "re-run the masks stage")
    _check_size(path, instances, "instance map", expected_hw, against)
    return instances


def _check_size(
    path: str | Path, array: np.ndarray, what: str, expected_hw: tuple[int, ...] | None, against: str
) -> None:
    if expected_hw is not None and array.shape != tuple(expected_hw):
        raise UserError(
            f"{path}: {what} is {array.shape[0]}x{array.shape[1]} but its {against} is "
            f"{expected_hw[0]}x{expected_hw[1]} (re-run the masks stage)"
        )


def _write_png(path: str | Path, array: np.ndarray, dtype: type, what: str) -> None:
    if array.ndim != 2 or array.dtype != dtype:
        raise ValueError(f"{what} must be {np.dtype(dtype).name} HxW, got {array.dtype} {array.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _read_png(path: str | Path, dtype: type, modes: tuple[str, ...], what: str, hint: str) -> np.ndarray:
    """A single-channel PNG of one of `modes` as a writable `dtype` array; a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found ({hint})")
    bits = 8 * np.dtype(dtype).itemsize
    try:
        with Image.open(path) as img:
            if img.mode not in modes:
                raise UserError(
                    f"{path}: {what} must be a {bits}-bit grayscale PNG, got mode {img.mode} ({hint})"
                )
            return np.asarray(img).astype(dtype)  # native byte order, writable
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({exc}); {hint}") from None


def file_name_problem(file_name: str) -> str | None:
    """What is wrong with a COCO `file_name` as a path under the data root, or None."""
    if not file_name:
        return "is empty"
    posix = file_name.replace("\\", "/")
    if posix.split("/")[-1] in ("", ".", ".."):
        return "names a folder, not a file"
    if PurePosixPath(file_name).is_absolute() or PureWindowsPath(file_name).anchor:
        return "is absolute; it must be relative to the data root"
    if ".." in PurePosixPath(posix).parts:
        return "climbs out of the data root with '..'"
    return None
