"""Submission CSVs: write them streaming, validate them row by row, read them back and score them."""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline import metrics
from pipeline.atomic import atomic_path
from pipeline.data import coco, records
from pipeline.data.manifest import ImageSet
from pipeline.data.records import CocoSet
from pipeline.errors import UserError
from pipeline.evaluation import rle

# The header of each format; a submission's format is recognised from its header.
#   rle:   one row per image and non-background class 1..C-1; EncodedPixels is Kaggle RLE (empty = absent).
#   dense: one row per image; PredictionString is the class index of every pixel, row-major.
HEADERS: dict[str, list[str]] = {
    "rle": ["image_id", "class_id", "EncodedPixels"],
    "dense": ["image_id", "PredictionString"],
}

_UNSIGNED = re.compile(r"[0-9]+")


# Characters each byte value takes in a dense row: its digits plus the separating space.
_DENSE_WIDTHS = np.array([len(str(value)) + 1 for value in range(256)])


# ---------------------------------------------------------------------------------------------------------
# Writing


class SubmissionWriter:
    """Stream a submission CSV one image at a time; `path` appears only when the `with` block ends cleanly.

    Usage: `with SubmissionWriter(path, "rle", n_classes) as out: out.write(file_name, mask)`, where
    `mask` is uint8 HxW of class indexes at the submission's size. `order` is the RLE pixel order
    (ignored by "dense", which is always row-major).
    """

    def __init__(self, path: str | Path, fmt: str, n_classes: int, order: str = "column") -> None:
        if fmt not in HEADERS:
            raise ValueError(f"unknown submission format {fmt!r} (valid: {', '.join(HEADERS)})")
        if order not in rle.ORDERS:
            raise ValueError(f"unknown RLE order {order!r} (valid: {', '.join(rle.ORDERS)})")
        if not 2 <= n_classes <= 256:
            raise ValueError(f"n_classes must be in 2..256 (uint8 masks), got {n_classes}")
        self.path = Path(path)
        self.fmt = fmt
        self.n_classes = n_classes
        self.order = order
        self.rows = 0
        self._image_ids: set[str] = set()
        self._stack: contextlib.ExitStack | None = None
        self._writer: Any = None

    def __enter__(self) -> SubmissionWriter:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            handle = stack.enter_context(tmp.open("w", newline="", encoding="utf-8"))
            self._writer = csv.writer(handle, lineterminator="\n")
            self._writer.writerow(HEADERS[self.fmt])
            self._stack = stack.pop_all()  # success: keep the file open past this `with`
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack, self._writer = self._stack, None, None
        if stack is not None:
            # Closes the file, then atomic_path renames it into place, or deletes it if an error is passing.
            stack.__exit__(exc_type, exc, tb)

    def write(self, image_id: str, mask: np.ndarray) -> None:
        """Append the row(s) of one image: C-1 rows for "rle", one for "dense"."""
        if self._writer is None:
            raise RuntimeError("SubmissionWriter.write called outside its `with` block")
        mask = np.asarray(mask)
        if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"{image_id}: mask must be an integer HxW array, got {mask.dtype} {mask.shape}")
        if mask.size and (mask.min() < 0 or mask.max() >= self.n_classes):
            raise ValueError(f"{image_id}: mask values must be class indexes 0..{self.n_classes - 1}")
        if image_id in self._image_ids:
            raise ValueError(f"{image_id}: written twice")
        self._image_ids.add(image_id)
        if self.fmt == "rle":
            for label in range(1, self.n_classes):
                self._writer.writerow([image_id, label, rle.encode(mask == label, self.order)])
                self.rows += 1
        else:
            self._writer.writerow([image_id, _dense_text(mask)])
            self.rows += 1


def write_submission(
    masks: Iterable[tuple[str, np.ndarray]],
    out: Path,
    fmt: str,
    order: str,
    test: ImageSet,
    size: int | None,
) -> int:
    """Write each (file name, mask) of `masks` to the submission `out`; returns the number of rows.

    The CSV is validated against `test` (at `size`) before it replaces `out`: an invalid one is a
    UserError and `out` is left as it was. The predict stage and `predict-bundle` both write through
    here, so the same masks give the same bytes.
    """
    with atomic_path(out) as tmp:
        with SubmissionWriter(tmp, fmt, test.n_classes, order) as writer:
            for file_name, mask in masks:
                writer.write(file_name, mask)
        problems = validate_submission(tmp, test, size)
        if problems:
            raise UserError(f"{out}: invalid submission ({len(problems)} problems), first: {problems[0]}")
    return writer.rows


def _dense_text(mask: np.ndarray) -> str:
    """Class indexes of a mask (values 0..255), flattened row-major, separated by single spaces."""
    flat = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    if not flat.size:
        return ""
    # Each pixel's digits go straight into a byte buffer pre-filled with spaces, so a 512x512 mask takes
    # milliseconds rather than a Python join over 262,144 strings. Ones digits first (every pixel),
    # then tens and hundreds only for the pixels that have them, each one byte further left.
    ends = np.cumsum(_DENSE_WIDTHS[flat])
    text = np.full(int(ends[-1]), ord(" "), dtype=np.uint8)
    values, positions = flat, ends - 2
    while values.size:
        text[positions] = values % 10 + ord("0")
        more = values >= 10
        values, positions = values[more] // 10, positions[more] - 1
    return text[:-1].tobytes().decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class SubmissionReport:
    """What `check_submission` found: the format (None if the header is wrong), data rows, problems."""

    fmt: str | None
    n_rows: int
    problems: list[str] = field(default_factory=list)


def validate_submission(path: str | Path, test: ImageSet | CocoSet, size: int | None) -> list[str]:
    """Problems with a submission for the images of `test`, one line each; an empty list means valid.

    `size` is the mask size the rows must describe: None for each image's own height x width, an int
    for size x size. Row numbers are file lines (the header is row 1). The RLE pixel order does not
    matter here: runs are checked in flattened pixel numbers, which both orders share.
    """
    return check_submission(path, test, size).problems


def check_submission(path: str | Path, test: ImageSet | CocoSet, size: int | None) -> SubmissionReport:
    """`validate_submission` with the detected format and the count of data rows.

    Checks: header, empty file, unknown and missing images (per class for "rle"), duplicate rows,
    field counts, non-integer tokens, and per format: RLE pairs, lengths, order, extent and two classes
    claiming one pixel; dense pixel counts and class ranges. Never raises on a malformed file; a file
    that does not exist raises `UserError`.
    """
    shapes = _target_shapes(test, size)
    report = SubmissionReport(fmt=None, n_rows=0)
    rows = _read_rows(Path(path), field_limit(shapes.values()))
    try:
        first = next(rows, None)
        if first is None:
            report.problems.append(f"empty file; expected the header {_header_choices()}")
            return report
        _, header = first
        report.fmt = next((fmt for fmt, names in HEADERS.items() if header == names), None)
        if report.fmt is None:
            report.problems.append(f"row 1: header {_clip(','.join(header))!r} is not {_header_choices()}")
            return report
        checker = _CHECKERS[report.fmt](shapes, test.n_classes)
        for row, fields in rows:
            report.n_rows += 1
            problem = _text_problem(fields) or checker.check(row, fields)
            if problem is not None:
                report.problems.append(f"row {row}: {problem}")
    except _MalformedCsv as exc:
        report.problems.append(str(exc))
    finally:
        rows.close()
    if report.fmt is not None:
        report.problems.extend(checker.missing(test))
    return report


class _RleChecker:
    """Row checks of the "rle" format, with the state that spans rows (seen pairs, claimed pixels)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], n_classes: int) -> None:
        self.shapes = shapes
        self.n_classes = n_classes
        self.seen: dict[tuple[str, int], int] = {}  # (image_id, class) -> row
        # Per image, each decoded class's runs: (class, row, begins, ends), to find pixels claimed twice.
        self.claimed: dict[str, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}

    def check(self, row: int, fields: list[str]) -> str | None:
        if len(fields) != 3:
            return f"{len(fields)} fields, expected 3 ({','.join(HEADERS['rle'])})"
        image_id, class_text, text = fields
        if image_id not in self.shapes:
            return f"image_id {_clip(image_id)!r} is not an image of the test set"
        if not _UNSIGNED.fullmatch(class_text.strip()):
            return f"image {image_id}: class_id {_clip(class_text)!r} is not an integer"
        label = int(class_text)
        if not 1 <= label < self.n_classes:
            return f"image {image_id}: class_id {label} is out of range 1..{self.n_classes - 1}"
        first = self.seen.setdefault((image_id, label), row)
        if first != row:
            return f"image {image_id} class {label}: duplicate row (first at row {first})"
        try:
            begins, ends = rle.parse_runs(text, self.shapes[image_id])
        except rle.RLEError as exc:
            return f"image {image_id} class {label}: {exc}"
        others = self.claimed.setdefault(image_id, [])
        problem = _double_claim(label, begins, ends, others)
        others.append((label, row, begins, ends))
        return None if problem is None else f"image {image_id}: {problem}"

    def missing(self, test: ImageSet | CocoSet) -> list[str]:
        lines = []
        for image in test.images:
            absent = [k for k in range(1, self.n_classes) if (image.file_name, k) not in self.seen]
            if len(absent) == self.n_classes - 1:
                lines.append(f"image {image.file_name}: missing (no rows)")
            elif absent:
                lines.append(f"image {image.file_name}: no row for class {', '.join(map(str, absent))}")
        return lines


def _double_claim(
    label: int, begins: np.ndarray, ends: np.ndarray, others: list[tuple[int, int, np.ndarray, np.ndarray]]
) -> str | None:
    """The first pixel that runs [begins, ends) share with another class's runs, described; or None."""
    for other, other_row, other_begins, other_ends in others:
        if not other_begins.size:
            continue
        # Runs of one class are sorted and disjoint, so the last other run starting before a run ends
        # is the one reaching furthest: the two overlap iff it ends after the run begins.
        last = np.searchsorted(other_begins, ends, side="left") - 1
        hit = (last >= 0) & (other_ends[np.maximum(last, 0)] > begins)
        if hit.any():
            i = int(np.argmax(hit))
            k = int(np.searchsorted(other_ends, begins[i], side="right"))  # first other run overlapping run i
            pixel = max(int(begins[i]), int(other_begins[k])) + 1
            return f"class {label} claims pixel {pixel}, already claimed by class {other} (row {other_row})"
    return None


class _DenseChecker:
    """Row checks of the "dense" format."""

    def __init__(self, shapes: dict[str, tuple[int, int]], n_classes: int) -> None:
        self.shapes = shapes
        self.n_classes = n_classes
        self.seen: dict[str, int] = {}  # image_id -> row

    def check(self, row: int, fields: list[str]) -> str | None:
        if len(fields) != 2:
            return f"{len(fields)} fields, expected 2 ({','.join(HEADERS['dense'])})"
        image_id, text = fields
        if image_id not in self.shapes:
            return f"image_id {_clip(image_id)!r} is not an image of the test set"
        first = self.seen.setdefault(image_id, row)
        if first != row:
            return f"image {image_id}: duplicate row (first at row {first})"
        try:
            values = rle.parse_integers(text)
        except rle.RLEError as exc:
            return f"image {image_id}: {exc}"
        height, width = self.shapes[image_id]
        if values.size != height * width:
            return f"image {image_id}: {values.size} values, expected {height * width} ({height}x{width})"
        bad = np.flatnonzero((values < 0) | (values >= self.n_classes))
        if bad.size:
            i = int(bad[0])
            top = self.n_classes - 1
            return f"image {image_id}: value {values[i]} (pixel {i + 1}) is not a class index 0..{top}"
        return None

    def missing(self, test: ImageSet | CocoSet) -> list[str]:
        return [
            f"image {im.file_name}: missing (no row)" for im in test.images if im.file_name not in self.seen
        ]


# Explicit registry: format name -> row checker (same keys as HEADERS).
_CHECKERS: dict[str, type[_RleChecker] | type[_DenseChecker]] = {"rle": _RleChecker, "dense": _DenseChecker}


# ---------------------------------------------------------------------------------------------------------
# Reading and scoring


def iter_submission(
    path: str | Path, test: ImageSet | CocoSet, size: int | None, order: str = "column"
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (image_id, uint8 HxW mask) for each image of a submission, in the order its rows complete.

    Trusts a file that `validate_submission` passed; on anything it cannot read it raises `UserError`.
    An "rle" image is yielded once all its C-1 class rows have been read (held until then).
    """
    path = Path(path)
    shapes = _target_shapes(test, size)
    n_classes = test.n_classes
    pending: dict[str, tuple[np.ndarray, int]] = {}  # rle image_id -> (mask so far, rows read)
    rows = _read_rows(path, field_limit(shapes.values()))
    try:
        _, header = next(rows, (1, []))
        fmt = next((fmt for fmt, names in HEADERS.items() if header == names), None)
        if fmt is None:
            raise UserError(f"{path}: row 1: header is not {_header_choices()}")
        for row, fields in rows:
            try:
                if fmt == "dense":
                    image_id, text = fields
                    mask = rle.parse_integers(text).astype(np.uint8).reshape(shapes[image_id])
                    yield image_id, mask
                    continue
                image_id, label, text = fields
                mask, seen = pending.pop(image_id, None) or (np.zeros(shapes[image_id], np.uint8), 0)
                mask[rle.decode(text, shapes[image_id], order)] = int(label)
                if seen + 1 == n_classes - 1:
                    yield image_id, mask
                else:
                    pending[image_id] = (mask, seen + 1)
            except (ValueError, KeyError) as exc:  # RLEError is a ValueError; so is a wrong field count
                raise UserError(f"{path}: row {row}: unreadable ({exc}); run `validate` first") from None
    except _MalformedCsv as exc:
        raise UserError(f"{path}: {exc}") from None
    finally:
        rows.close()
    if pending:
        raise UserError(f"{path}: image {next(iter(pending))} has rows for only some classes")


def score_submission(
    path: str | Path,
    truth: CocoSet,
    size: int | None,
    overlap: records.Overlap,
    order: str = "column",
    average: metrics.Average = "dataset",
) -> dict[str, Any]:
    """mIoU of a submission against COCO ground truth, by `average` ("dataset" or "image", see metrics).

    The truth is rasterized exactly as for training (`coco.rasterize` with `overlap`), resized to the
    submission's size with nearest-neighbour, and one confusion matrix is kept per image (N x C x C
    counts: small), so either average comes from the same counts.
    Returns {"miou": float, "iou": {class name: float, NaN where absent from truth and prediction},
    "average": average}. Raises `UserError` naming the file and its first problem if the submission is
    invalid, or if every annotation of the truth was skipped as bad or ignored as not a class (an
    all-background truth would score nonsense).
    """
    metrics.checked_average(average)
    left_out = truth.skipped + truth.ignored
    if truth.n_annotations == 0 and left_out > 0:
        why = "skipped as bad" + (" or ignored (category not a class)" if truth.ignored else "")
        raise UserError(f"{truth.path}: all {left_out} annotations were {why}; nothing to score against")
    problems = validate_submission(path, truth, size)
    if problems:
        raise UserError(f"{path}: invalid submission ({len(problems)} problems); first: {problems[0]}")
    images = truth.by_file_name()
    n_classes = truth.n_classes
    cms = np.zeros((len(images), n_classes, n_classes), dtype=np.int64)
    predictions = iter_submission(path, truth, size, order)
    for i, (image_id, pred) in enumerate(tqdm(predictions, total=len(images), desc="score", unit="image")):
        target = coco.rasterize(truth, images[image_id], overlap)
        if target.shape != pred.shape:
            # The nearest rule that augment.build_resize applies to training masks.
            target = cv2.resize(target, (pred.shape[1], pred.shape[0]), interpolation=cv2.INTER_NEAREST)
        cms[i] = metrics.confusion_matrix(target, pred, n_classes)
    iou = metrics.class_ious(cms, average)
    return {
        "miou": metrics.score(cms, average),
        "iou": dict(zip(truth.classes, iou.tolist(), strict=True)),
        "average": average,
    }


# ---------------------------------------------------------------------------------------------------------
# CSV plumbing


class _MalformedCsv(Exception):
    """The csv module gave up on the file (message names the row)."""


def _read_rows(path: Path, limit: int) -> Iterator[tuple[int, list[str]]]:
    """(row number, fields) of each non-blank CSV record; the header is row 1.

    A field longer than `limit` characters stops the read with one problem before it is held whole
    (a 64 MiB line would otherwise cost many times its size in memory before any shape check).
    Undecodable bytes become U+FFFD (flagged per row by `_text_problem`) rather than stopping the read.
    """
    if not path.is_file():
        raise UserError(f"{path}: submission file not found")
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle, _csv_field_limit(limit):
        reader = csv.reader(handle)
        row = 0
        try:
            for fields in reader:
                start, row = row + 1, reader.line_num
                if fields:
                    yield start, fields
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise _MalformedCsv(
                    f"row {row + 1}: a field longer than any valid row of these images can hold "
                    f"({limit} characters); the rest was not read"
                ) from None
            raise _MalformedCsv(f"row {row + 1}: malformed CSV ({exc}); the rest was not read") from None


def field_limit(shapes: Iterable[tuple[int, int]]) -> int:
    """The longest field a valid row can have for masks of these shapes: a dense row of 3-digit class
    indexes, or an RLE of single-pixel runs (each "start length " pair at most twice the digits of
    H x W, plus spaces). A dense 512 x 512 row is ~0.5 MB, beyond the csv module's default limit."""
    pixels = max((height * width for height, width in shapes), default=1)
    pair = 2 * (len(str(pixels)) + 1)
    return max(4 * pixels, (pixels // 2 + 1) * pair, 131072)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _text_problem(fields: list[str]) -> str | None:
    if any("\ufffd" in f for f in fields):
        return "not UTF-8 text (undecodable bytes)"
    return None


def _target_shapes(test: ImageSet | CocoSet, size: int | None) -> dict[str, tuple[int, int]]:
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None (native), got {size}")
    return {im.file_name: (im.height, im.width) if size is None else (size, size) for im in test.images}


def _header_choices() -> str:
    return " or ".join(f"{','.join(names)!r} ({fmt})" for fmt, names in HEADERS.items())


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
