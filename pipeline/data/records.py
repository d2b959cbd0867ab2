"""The parsed COCO set's types: images, the validated set, and the rules later stages share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.data.images import image_path

Overlap = Literal["area_desc", "max_class"]
OnBad = Literal["error", "skip"]
Unused = Literal["keep", "drop"]


@dataclass(frozen=True)
class ImageRecord:
    """One entry of the json's `images` list."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass
class CocoSet:
    """A validated COCO json: classes, images and their annotations (raw COCO dicts).

    Classes are identified by category id. Class index 0 is background; the other classes follow the
    json's `categories` order (ids may start anywhere and have gaps), less the unused categories that
    `load_coco(unused="drop")` removes, or are the training set's when it was given as `classes_from`.
    `classes` holds display names: a name two classes share gets its id appended ("Glass (id 3)").
    """

    path: Path
    root: Path
    classes: list[str]
    category_ids: list[int]
    images: list[ImageRecord]
    # Every image id has an entry (an empty list when the image has no objects).
    annotations: dict[int, list[dict[str, Any]]]
    # False when the json has no `annotations` key or an empty list (a competition test set).
    has_annotations: bool
    skipped: int = 0
    clipped: int = 0
    problems: list[str] = field(default_factory=list)
    # Every category of the json, class or not: id -> the json's name, in json order.
    category_names: dict[int, str] = field(default_factory=dict)
    # Categories no annotation of this json names (id -> json name), kept as classes or dropped. Only
    # filled when this json decides the classes; empty when they come from `classes_from`.
    unused: dict[int, str] = field(default_factory=dict)
    # Annotations left out because their category is not a class (one the training set dropped).
    ignored: int = 0
    label_of_category: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.label_of_category = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        if not self.category_names:  # built by hand, not by load_coco: the display names are the json's
            self.category_names = dict(zip(self.category_ids, self.classes[1:], strict=True))

    @property
    def n_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    @property
    def n_annotations(self) -> int:
        return sum(len(anns) for anns in self.annotations.values())

    def label(self, ann: dict[str, Any]) -> int:
        """Class index (1..C-1) of an annotation."""
        return self.label_of_category[ann["category_id"]]

    def image_file(self, image: ImageRecord) -> Path:
        """Where `image` lives on disk: root/file_name."""
        return image_path(self.root, image.file_name)

    def by_file_name(self) -> dict[str, ImageRecord]:
        return {image.file_name: image for image in self.images}

    def summary(self) -> str:
        """One line: image and annotation counts, skipped and clipped annotations."""
        line = (
            f"{self.path}: {len(self.images)} images, {self.n_annotations} annotations, "
            f"{self.skipped} skipped, {self.clipped} clipped to the image"
        )
        if self.ignored:
            line += f", {self.ignored} ignored (category not a class)"
        if self.problems:
            line += f" (first skipped: {self.problems[0]})"
        return line


# Objects showing fewer pixels than this stay out of the bank: slivers the overlap rule leaves of a covered
# object, or annotation specks, are too small to show what the object is, and pasted (scaled up) they
# would teach the model blobs of noise under a class name.
MIN_OBJECT_PIXELS = 16
