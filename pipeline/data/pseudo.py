"""Pseudo-labels of the test images from a frozen teacher's probabilities: confident argmax, else ignored."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_dir, write_json
from pipeline.data.geometry import confident_argmax
from pipeline.data.images import IGNORE_INDEX, mask_relpath, write_mask
from pipeline.data.probstore import StoredProbabilities
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError

# The teacher folder's file (`python -m pipeline teacher` writes it) and the pseudo-label folder's layout.
TEACHER_FILE = "test.npz"
PSEUDO_JSON = "pseudo.json"
MASKS_DIR = "masks"
# What to do about a missing, foreign or mismatched teacher.
REFREEZE = "run dvc repro, then python -m pipeline teacher"


@dataclass(frozen=True)
class PseudoSet:
    """The pseudo stage's output, for training: test images with masks of confident teacher labels."""

    masks_dir: Path  # masks at mask_relpath(file_name): uint8, IGNORE_INDEX where the teacher was unsure
    threshold: float | None  # None: pseudo-labels were off (no images)
    classes: list[str]
    images: list[ImageRecord]
    presence: np.ndarray  # bool (len(images), len(classes)): the classes each mask's kept pixels hold
    labelled: np.ndarray  # float (len(images),): the fraction of each mask's pixels not ignored

    def mask_path(self, image: ImageRecord) -> Path:
        return self.masks_dir / mask_relpath(image.file_name)


def pseudo_mask(probs: torch.Tensor, size: tuple[int, int], threshold: float) -> np.ndarray:
    """uint8 (H, W) pseudo-label mask: the argmax of `probs` (C, h, w) resized to `size`, IGNORE_INDEX
    where its probability is below `threshold`."""
    labels, confidence = confident_argmax(probs, size)
    labels[confidence < threshold] = IGNORE_INDEX
    return labels.cpu().numpy()


def teacher_file(teacher_dir: Path) -> Path:
    """The frozen teacher's probabilities file in `teacher_dir`; a UserError if it is missing."""
    path = teacher_dir / TEACHER_FILE
    if not path.is_file():
        raise UserError(f"pseudo.enabled is true but {path} is missing: {REFREEZE}")
    return path


def check_teacher(
    teacher: StoredProbabilities, images: Sequence[ImageRecord], classes: Sequence[str], source: str
) -> None:
    """A UserError unless `teacher` holds exactly the test `images` (in any order: `write_pseudo` looks
    them up by name) and the `classes` of the manifest `source`."""
    if teacher.classes != list(classes):
        raise UserError(
            f"{teacher.path}: classes {teacher.classes} differ from {source}'s {list(classes)}; {REFREEZE}"
        )
    names = [image.file_name for image in images]
    missing = sorted(set(names) - set(teacher.file_names))
    extra = sorted(set(teacher.file_names) - set(names))
    if missing:
        problem = f"lacks its test image '{missing[0]}'{_more(missing)}"
    elif extra:
        problem = f"holds '{extra[0]}'{_more(extra)}, not one of its test images"
    elif len(teacher.file_names) != len(names):
        problem = "holds some test image twice"
    else:
        return
    raise UserError(f"{teacher.path}: {problem} ({source}); {REFREEZE}")


def _more(names: Sequence[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def write_pseudo(
    out: Path,
    teacher: StoredProbabilities,
    images: Sequence[ImageRecord],
    classes: Sequence[str],
    threshold: float,
    source: str,
) -> np.ndarray:
    """Write the pseudo-labels of the test `images` (with `classes`, of the manifest `source`) from
    `teacher` to the folder `out`, atomically: masks/<mask_relpath> and pseudo.json. A teacher of other
    images or classes is a UserError (`check_teacher`). Returns the kept pixels per class (int64 (C,))."""
    check_teacher(teacher, images, classes, source)
    index_of = {name: index for index, name in enumerate(teacher.file_names)}
    pixels = np.zeros(len(classes), dtype=np.int64)
    entries = []
    with atomic_dir(out) as tmp:
        for image in images:
            probs = teacher.probabilities(index_of[image.file_name])
            mask = pseudo_mask(probs, (image.height, image.width), threshold)
            write_mask(tmp / MASKS_DIR / mask_relpath(image.file_name), mask)
            counts = np.bincount(mask[mask != IGNORE_INDEX], minlength=len(classes))
            pixels += counts
            entries.append(_entry(image, counts > 0, int(counts.sum()) / mask.size))
        write_json(tmp / PSEUDO_JSON, {"threshold": threshold, "classes": list(classes), "images": entries})
    return pixels


def write_empty(out: Path, classes: Sequence[str]) -> None:
    """Write the folder `out` holding only a pseudo.json without images (pseudo-labels off), atomically;
    its bytes depend on `classes` alone, so the stages that read it need not re-run."""
    with atomic_dir(out) as tmp:
        write_json(tmp / PSEUDO_JSON, {"threshold": None, "classes": list(classes), "images": []})


def read_pseudo(out: Path) -> PseudoSet:
    """Read the pseudo stage's folder `out`; a missing or foreign pseudo.json is a UserError naming it."""
    path = out / PSEUDO_JSON
    try:
        raw = json.loads(path.read_text())
        threshold = None if raw["threshold"] is None else float(raw["threshold"])
        classes = [str(name) for name in raw["classes"]]
        images = [
            ImageRecord(int(e["id"]), str(e["file_name"]), int(e["height"]), int(e["width"]))
            for e in raw["images"]
        ]
        presence = np.zeros((len(images), len(classes)), dtype=bool)
        for row, entry in enumerate(raw["images"]):
            if len(entry["presence"]) != len(classes):
                raise ValueError(f"{entry['file_name']}: presence needs {len(classes)} entries")
            presence[row] = [bool(v) for v in entry["presence"]]
        labelled = np.array([float(e["labelled"]) for e in raw["images"]], dtype=np.float64)
    except FileNotFoundError:
        raise UserError(f"{path}: pseudo-labels not found (run the pseudo stage)") from None
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read the pseudo-labels ({exc.strerror}); re-run the pseudo stage"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not pseudo-labels ({exc!r}); re-run the pseudo stage") from None
    return PseudoSet(out / MASKS_DIR, threshold, classes, images, presence, labelled)


def summary(pseudo: PseudoSet, pixels: np.ndarray) -> str:
    """One line: images, mean labelled fraction, kept pixels per class (`write_pseudo`'s count)."""
    if not pseudo.images:
        return "no test images to pseudo-label"
    per_class = ", ".join(
        f"{name} {count}" for name, count in zip(pseudo.classes, pixels.tolist(), strict=True)
    )
    return (
        f"{len(pseudo.images)} pseudo-labelled test images at threshold {pseudo.threshold}: "
        f"{pseudo.labelled.mean():.1%} of pixels labelled on average; pixels per class: {per_class}"
    )


def _entry(image: ImageRecord, presence: np.ndarray, labelled: float) -> dict[str, Any]:
    return {
        "file_name": image.file_name,
        "id": image.id,
        "height": image.height,
        "width": image.width,
        "presence": presence.tolist(),
        "labelled": labelled,
    }
