"""Kaggle run-length encoding of binary masks: `start length` pairs, 1-indexed, column-major by default."""

from __future__ import annotations

import re

import numpy as np

# "column": pixels numbered top to bottom, then left to right (Kaggle's usual convention, and
# pycocotools'); "row": left to right, then top to bottom.
ORDERS = ("column", "row")

_NON_DIGIT = re.compile(r"[^0-9 \t\r\n]")
_INTEGER = re.compile(r"-?[0-9]+")
_INT64_MAX = np.iinfo(np.int64).max


class RLEError(ValueError):
    """A run-length string that does not describe a mask of the given shape."""


def encode(mask: np.ndarray, order: str = "column") -> str:
    """Run-length encode a binary mask.

    mask: HxW, bool or integers in {0, 1}, any memory layout (C and Fortran order are both read
    without a transposed copy).
    Returns `"start length start length ..."`: 1-indexed starts in pixel `order`, runs sorted and
    separated by at least one background pixel; the empty string when the mask has no foreground.
    """
    _check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects a 2-D HxW mask, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"encode expects a bool or 0/1 integer mask, got dtype {mask.dtype}")
        signed = np.issubdtype(mask.dtype, np.signedinteger)
        if mask.size and (mask.max() > 1 or (signed and mask.min() < 0)):
            raise ValueError(f"encode expects a bool or 0/1 mask, got values in [{mask.min()}, {mask.max()}]")
    runs = _runs(mask, order)
    if runs.size == 0:
        return ""
    # printf-style formatting of the whole list in one call is ~1.7x faster than " ".join(map(str, ...)).
    return ("%d " * runs.size % tuple(runs.tolist()))[:-1]


def decode(text: str, shape: tuple[int, int], order: str = "column") -> np.ndarray:
    """Decode a run-length string into a bool mask of `shape` (H, W).

    Validated by `parse_runs` (raises `RLEError`). For order "column" the result is a transposed
    (Fortran-ordered) view, which costs no copy; `np.ascontiguousarray` it if C order matters.
    """
    _check_order(order)
    height, width = _check_shape(shape)
    begins, ends = parse_runs(text, (height, width))
    # The flat mask alternates background and foreground stretches: gap, run, gap, run, ..., last gap.
    # np.repeat builds it in one C pass, several times faster than a cumsum of +1/-1 markers.
    counts = np.empty(2 * begins.size + 1, dtype=np.int64)
    counts[1::2] = ends - begins
    counts[0:-1:2] = begins - np.concatenate(([0], ends[:-1]))
    counts[-1] = height * width - (ends[-1] if ends.size else 0)
    stretch_values = np.zeros(counts.size, dtype=bool)
    stretch_values[1::2] = True
    flat = np.repeat(stretch_values, counts)
    if order == "row":
        return flat.reshape(height, width)
    return flat.reshape(width, height).T


def parse_runs(text: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a run-length string for a mask of `shape` (H, W); return its runs as int64 arrays
    (begins, ends): 0-indexed, half-open [begin, end) positions in the flattened pixel order.

    Whitespace of any amount separates tokens; an empty or blank string has no runs. Runs may touch
    but must be sorted and must not overlap. Raises `RLEError` naming the first problem: a token that
    is not an integer, an odd token count, a start below 1, a length below 1, a run past the last
    pixel, or runs out of order.
    """
    height, width = _check_shape(shape)
    values = parse_integers(text)
    if values.size % 2:
        raise RLEError(f"odd number of tokens ({values.size}); expected `start length` pairs")
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, height, width)
    begins = starts - 1
    return begins, begins + lengths


def parse_integers(text: str) -> np.ndarray:
    """The whitespace-separated integer tokens of `text` as int64 (1-D, empty for a blank string).

    Tokens are plain decimal integers (`-?[0-9]+`); anything else, or a value beyond int64, raises
    `RLEError` naming the token (numbered from 1).
    """
    text = text.strip()
    if not text:  # np.fromstring would read a blank string as [0]
        return np.zeros(0, dtype=np.int64)
    # Fast path: only digits and whitespace, parsed in C. A '-' can only begin a negative number
    # (never a valid start, length or class), so it takes the slow path with the other odd cases.
    if not _NON_DIGIT.search(text):
        values = np.fromstring(text, dtype=np.int64, sep=" ")
        if values.max() < _INT64_MAX:  # the C parser saturates on overflow instead of failing
            return values
    parsed = []
    for i, token in enumerate(text.split(), start=1):
        if not _INTEGER.fullmatch(token):
            raise RLEError(f"token {i} {_clip(token)!r} is not an integer")
        value = int(token)
        if abs(value) >= _INT64_MAX:
            raise RLEError(f"token {i} {_clip(token)!r} is too large")
        parsed.append(value)
    return np.array(parsed, dtype=np.int64)


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown RLE order {order!r} (valid: {', '.join(ORDERS)})")


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"expected a non-negative (H, W) shape, got {shape}")
    return int(shape[0]), int(shape[1])


def _runs(mask: np.ndarray, order: str) -> np.ndarray:
    """Interleaved (1-indexed start, length) of the foreground runs of `mask` in pixel `order`."""
    # `sequence` is the mask laid out so that its C-order flattening is the pixel order wanted.
    sequence = mask if order == "row" else mask.T
    if not (sequence.flags.c_contiguous or sequence.T.flags.c_contiguous):
        sequence = np.ascontiguousarray(sequence)
    if sequence.flags.c_contiguous:
        bounds = _bounds_flat(sequence.reshape(-1))
    else:
        bounds = _bounds_column_major(sequence.T)
    bounds[1::2] -= bounds[0::2]
    bounds[0::2] += 1
    return bounds


def _bounds_flat(flat: np.ndarray) -> np.ndarray:
    """0-indexed [begin, end) of each foreground run of a 1-D array, interleaved."""
    bounds = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat.size and flat[0]:
        bounds = np.concatenate(([0], bounds))
    if flat.size and flat[-1]:
        bounds = np.concatenate((bounds, [flat.size]))
    return bounds


def _bounds_column_major(array: np.ndarray) -> np.ndarray:
    """`_bounds_flat` of a C-ordered HxW array's column-major flattening, without transposing it.

    Transposing a whole mask costs more than the rest of encoding. Run boundaries are few, though:
    find them in place (a pixel differs from the one above it, or a column's top pixel differs
    from the previous column's bottom one) and sort their column-major indexes instead.
    """
    height, width = array.shape
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    changed = np.empty((height, width), dtype=bool)
    np.not_equal(array[1:], array[:-1], out=changed[1:])
    np.not_equal(array[0, 1:], array[-1, :-1], out=changed[0, 1:])
    changed[0, 0] = array[0, 0]
    row, col = np.divmod(np.flatnonzero(changed), width)
    bounds = col * height + row
    bounds.sort()
    if array[-1, -1]:
        bounds = np.concatenate((bounds, [array.size]))
    return bounds


def _check_runs(starts: np.ndarray, lengths: np.ndarray, height: int, width: int) -> None:
    """Raise RLEError describing the first invalid run (numbered from 1), if any."""
    n_pixels = height * width
    # Clipping keeps start + length from overflowing int64 on absurd values; it changes no valid run.
    last = np.clip(starts, 0, n_pixels + 1) + np.clip(lengths, 0, n_pixels + 1) - 1
    invalid = (starts < 1) | (lengths < 1) | (last > n_pixels)
    invalid[1:] |= starts[1:] <= last[:-1]
    bad = np.flatnonzero(invalid)
    if not bad.size:
        return
    i = int(bad[0])
    start, length = int(starts[i]), int(lengths[i])
    if start < 1:
        raise RLEError(f"run {i + 1} starts at {start}; starts are 1-indexed (>= 1)")
    if length < 1:
        raise RLEError(f"run {i + 1} (start {start}) has length {length}; lengths must be >= 1")
    if last[i] > n_pixels:
        raise RLEError(
            f"run {i + 1} (start {start}, length {length}) runs past the last pixel "
            f"{n_pixels} of a {height}x{width} mask"
        )
    where = "before" if start < starts[i - 1] else "inside"
    raise RLEError(
        f"run {i + 1} (start {start}) begins {where} run {i} (pixels {starts[i - 1]}-{last[i - 1]}); "
        "runs must be sorted and must not overlap"
    )


def _clip(token: str, limit: int = 30) -> str:
    return token if len(token) <= limit else token[:limit] + "..."
