"""Image and mask files: where they live, reading images, writing and reading class-index mask PNGs."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.atomic import atomic_path
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
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here rather than later in a worker
            array = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: truncated or corrupt image ({exc})") from None
    if expected_hw is not None and array.shape[:2] != tuple(expected_hw):
        h, w = array.shape[:2]
        raise UserError(f"{path}: image is {h}x{w} (HxW) but the json says {expected_hw[0]}x{expected_hw[1]}")
    return array


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a uint8 HxW class-index mask as a grayscale PNG, atomically."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 HxW, got {mask.dtype} {mask.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask written by `write_mask` (uint8 HxW of class indexes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: mask file not found (is the masks stage up to date?)")
    try:
        with Image.open(path) as img:
            if img.mode != "L":
                raise UserError(f"{path}: mask must be an 8-bit grayscale PNG, got mode {img.mode}")
            return np.asarray(img).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable mask ({exc})") from None


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
