"""Kaggle RLE codec: hand-checked strings, round trips, pycocotools cross-checks, and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.evaluation import rle
from pipeline.evaluation.rle import RLEError

# pycocotools' decode trips a numpy 2 deprecation warning in its own code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _pairs_to_coco_counts(text: str, n_pixels: int) -> list[int]:
    """Kaggle `start length` pairs -> COCO uncompressed counts (alternating background/foreground)."""
    values = [int(v) for v in text.split()]
    counts, position = [], 0  # position: 0-indexed pixel after the last run
    for start, length in zip(values[0::2], values[1::2], strict=True):
        counts += [start - 1 - position, length]
        position = start - 1 + length
    tail = n_pixels - position
    return [*counts, tail] if tail else counts  # pycocotools omits a trailing empty background run


def _coco_counts_to_pairs(counts: list[int]) -> str:
    """COCO uncompressed counts -> Kaggle `start length` pairs (zero-length runs dropped)."""
    pairs, position = [], 0
    for i, count in enumerate(counts):
        if i % 2 and count:
            pairs += [position + 1, count]
        position += count
    return " ".join(map(str, pairs))


def _blobby(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A mask of a few filled rectangles, like objects rather than noise."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(0, 4)):
        r0, c0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        mask[r0 : r0 + rng.integers(1, shape[0] + 1), c0 : c0 + rng.integers(1, shape[1] + 1)] = True
    return mask


# --- hand-checked strings ---------------------------------------------------------------------------------


def test_encode_by_hand_both_orders() -> None:
    # 3x4 mask, pixels numbered column-major:   row-major:
    #  1  4  7 10                                1  2  3  4
    #  2  5  8 11                                5  6  7  8
    #  3  6  9 12                                9 10 11 12
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1] = mask[1, 1] = mask[2, 3] = mask[0, 2] = True
    assert rle.encode(mask) == "4 2 7 1 12 1"
    assert rle.encode(mask, "row") == "2 2 6 1 12 1"


def test_runs_continue_across_columns() -> None:
    mask = np.zeros((3, 2), dtype=bool)
    mask[2, 0] = mask[0, 1] = True  # bottom of column 0 then top of column 1: consecutive pixels 3, 4
    assert rle.encode(mask) == "3 2"
    assert rle.encode(mask, "row") == "2 1 5 1"


@pytest.mark.parametrize("order", rle.ORDERS)
def test_edge_masks(order: str) -> None:
    shape = (5, 7)
    empty = np.zeros(shape, dtype=bool)
    full = np.ones(shape, dtype=bool)
    first = empty.copy()
    first[0, 0] = True
    last = empty.copy()
    last[-1, -1] = True
    assert rle.encode(empty, order) == ""
    assert rle.encode(full, order) == "1 35"
    assert rle.encode(first, order) == "1 1"
    assert rle.encode(last, order) == "35 1"
    for mask in (empty, full, first, last):
        assert np.array_equal(rle.decode(rle.encode(mask, order), shape, order), mask)


def test_single_pixel_positions() -> None:
    mask = np.zeros((4, 6), dtype=bool)
    mask[2, 3] = True
    assert rle.encode(mask) == f"{3 * 4 + 2 + 1} 1"
    assert rle.encode(mask, "row") == f"{2 * 6 + 3 + 1} 1"


def test_decode_by_hand() -> None:
    expected = np.array([[0, 1, 0], [0, 1, 1]], dtype=bool)  # column-major pixels 3, 4 and 6
    assert np.array_equal(rle.decode("3 2 6 1", (2, 3)), expected)
    assert np.array_equal(rle.decode("2 1 5 2", (2, 3), "row"), expected)


def test_decode_tolerates_whitespace_and_touching_runs() -> None:
    mask = rle.decode("  1 2\t3 1\n", (2, 2))
    assert np.array_equal(mask, np.array([[1, 1], [1, 0]], dtype=bool))
    assert not rle.decode("", (2, 2)).any()
    assert not rle.decode("   ", (2, 2)).any()


def test_zero_sized_masks() -> None:
    assert rle.encode(np.zeros((0, 5), dtype=bool)) == ""
    assert rle.decode("", (0, 5)).shape == (0, 5)


# --- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", rle.ORDERS)
@pytest.mark.parametrize("seed", range(6))
def test_round_trip_random(order: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        shape = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        mask = rng.random(shape) < rng.random() if rng.random() < 0.5 else _blobby(rng, shape)
        # Every memory layout takes its own path through the encoder.
        for variant in (mask, np.asfortranarray(mask), mask.astype(np.uint8), mask[:, ::-1].copy()[:, ::-1]):
            text = rle.encode(variant, order)
            assert np.array_equal(rle.decode(text, shape, order), mask)


def test_round_trip_non_contiguous_view() -> None:
    rng = np.random.default_rng(1)
    big = rng.random((20, 30)) < 0.4
    view = big[2:15:2, 3:29:3]
    for order in rle.ORDERS:
        assert np.array_equal(rle.decode(rle.encode(view, order), view.shape, order), view)


def test_row_order_is_column_order_of_the_transpose() -> None:
    mask = np.random.default_rng(2).random((6, 9)) < 0.5
    assert rle.encode(mask, "row") == rle.encode(mask.T, "column")


# --- pycocotools cross-checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_encode_matches_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(25):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = _blobby(rng, shape) if seed % 2 else rng.random(shape) < 0.3
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        # Our pairs, turned into COCO counts and compressed by pycocotools, must give its own encoding.
        counts = _pairs_to_coco_counts(rle.encode(mask), mask.size)
        ours = mask_utils.frPyObjects({"counts": counts, "size": list(shape)}, *shape)
        assert ours["counts"] == reference["counts"]


@pytest.mark.parametrize("seed", range(4))
def test_decode_matches_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(25):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        # Random COCO counts (foreground runs >= 1, gaps >= 0) that add up to the pixel count.
        counts, total = [], 0
        while True:
            gap, run = int(rng.integers(0, 30)), int(rng.integers(1, 30))
            if total + gap + run > shape[0] * shape[1]:
                break
            counts += [gap, run]
            total += gap + run
        counts.append(shape[0] * shape[1] - total)
        reference = mask_utils.decode(mask_utils.frPyObjects({"counts": counts, "size": list(shape)}, *shape))
        assert np.array_equal(rle.decode(_coco_counts_to_pairs(counts), shape), reference.astype(bool))


# --- rejections -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 x 1", "token 3 'x' is not an integer"),
        ("1.5 2", "token 1 '1.5' is not an integer"),
        ("1 2 3", "odd number of tokens (3)"),
        ("1 0", "run 1 (start 1) has length 0"),
        ("1 2 5 -1", "run 2 (start 5) has length -1"),
        ("0 2", "run 1 starts at 0"),
        ("-3 2", "run 1 starts at -3"),
        ("5 2 1 2", "run 2 (start 1) begins before run 1 (pixels 5-6)"),
        ("1 5 3 2", "run 2 (start 3) begins inside run 1 (pixels 1-5)"),
        ("10 3", "run 1 (start 10, length 3) runs past the last pixel 11 of a 1x11 mask"),
        ("12 1", "run 1 (start 12, length 1) runs past the last pixel 11"),
        ("1 99999999999999999999999", "token 2 '99999999999999999999999' is too large"),
        ("1 9223372036854775806", "run 1 (start 1, length 9223372036854775806) runs past the last pixel"),
        ("1 1_0", "token 2 '1_0' is not an integer"),
    ],
)
def test_decode_rejects(text: str, message: str) -> None:
    with pytest.raises(RLEError) as info:
        rle.decode(text, (1, 11))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_first_bad_run_is_reported() -> None:
    with pytest.raises(RLEError, match=r"^run 2 starts at 0"):
        rle.decode("1 2 0 1 4 0", (3, 3))


def test_parse_runs_returns_half_open_intervals() -> None:
    begins, ends = rle.parse_runs("2 3 8 1", (3, 3))
    assert begins.tolist() == [1, 7]
    assert ends.tolist() == [4, 8]


def test_parse_integers() -> None:
    assert rle.parse_integers(" 3 0\n12 ").tolist() == [3, 0, 12]
    assert rle.parse_integers("").size == 0
    assert rle.parse_integers("-4 2").tolist() == [-4, 2]
    with pytest.raises(RLEError, match="token 2 '\\+1' is not an integer"):
        rle.parse_integers("1 +1")


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match=r"values in \[0, 2\]"):
        rle.encode(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="dtype float"):
        rle.encode(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="valid: column, row"):
        rle.encode(np.zeros((2, 2), dtype=bool), order="diagonal")
