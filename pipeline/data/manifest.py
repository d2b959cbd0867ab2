"""The masks stage's manifest: classes, every image's name and size, the classes each mask holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_json
from pipeline.data.records import CocoSet, ImageRecord
from pipeline.errors import UserError


@dataclass(frozen=True)
class Manifest:
    """What later stages need to know about the data, decided once by the masks stage.

    Split, train, OOF, ensemble, evaluate and predict read this instead of re-parsing and re-validating
    the COCO jsons, so how annotations are read (`data.*`) is a setting of the masks stage alone.
    """

    classes: list[str]  # background first; display names
    category_ids: list[int]  # COCO category id of classes[1:]
    train: list[ImageRecord]
    presence: np.ndarray  # bool (len(train), len(classes)): the classes each training mask holds
    test: list[ImageRecord]
    annotations: dict[str, int]  # used, skipped, clipped, ignored: counts of the training json

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def train_names(self) -> list[str]:
        return [image.file_name for image in self.train]

    def test_set(self) -> ImageSet:
        """The test images with the class count: what a submission is checked against."""
        return ImageSet(self.test, self.n_classes)


@dataclass(frozen=True)
class ImageSet:
    """Images and the number of classes (background included): a submission's target."""

    images: list[ImageRecord]
    n_classes: int


def manifest_of(train: CocoSet, test: CocoSet, presence: np.ndarray) -> Manifest:
    """The manifest of a validated training and test set; presence: bool (len(train.images), C)."""
    return Manifest(
        classes=list(train.classes),
        category_ids=list(train.category_ids),
        train=list(train.images),
        presence=np.asarray(presence, dtype=bool),
        test=list(test.images),
        annotations={
            "used": train.n_annotations,
            "skipped": train.skipped,
            "clipped": train.clipped,
            "ignored": train.ignored,
        },
    )


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """Write `manifest` as JSON (atomically): one entry per image, its present class indexes listed."""
    records = [
        {**_record(image), "classes": np.flatnonzero(row).tolist()}
        for image, row in zip(manifest.train, manifest.presence, strict=True)
    ]
    write_json(
        path,
        {
            "classes": manifest.classes,
            "category_ids": manifest.category_ids,
            "annotations": manifest.annotations,
            "train": records,
            "test": [_record(image) for image in manifest.test],
        },
    )


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest written by `write_manifest`; anything else is a UserError naming the masks stage."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        classes = [str(name) for name in raw["classes"]]
        train = [_image(entry) for entry in raw["train"]]
        presence = np.zeros((len(train), len(classes)), dtype=bool)
        for row, entry in enumerate(raw["train"]):
            present = [int(k) for k in entry["classes"]]
            if any(not 0 <= k < len(classes) for k in present):
                raise ValueError(f"{entry['file_name']}: class index out of range in {present}")
            presence[row, present] = True
        if len(raw["category_ids"]) != len(classes) - 1:
            raise ValueError(f"{len(raw['category_ids'])} category ids for {len(classes) - 1} classes")
        return Manifest(
            classes=classes,
            category_ids=[int(i) for i in raw["category_ids"]],
            train=train,
            presence=presence,
            test=[_image(entry) for entry in raw["test"]],
            annotations={str(k): int(v) for k, v in raw["annotations"].items()},
        )
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found (run the masks stage)") from None
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read the manifest ({exc.strerror}); re-run the masks stage"
        ) from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: not a trashseg manifest ({exc!r}); re-run the masks stage") from None


def _record(image: ImageRecord) -> dict[str, Any]:
    return {"file_name": image.file_name, "id": image.id, "height": image.height, "width": image.width}


def _image(entry: dict[str, Any]) -> ImageRecord:
    return ImageRecord(int(entry["id"]), str(entry["file_name"]), int(entry["height"]), int(entry["width"]))
