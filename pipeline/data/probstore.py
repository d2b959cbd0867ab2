"""Class probabilities stored compactly, one image at a time: a uint8-quantised npz read back lazily.

Storage: one `.npz` (zip, deflate) holding, per image, its probabilities as uint8 (C, h, w), p quantised
to round(255 p), at the resolution the model predicted (before any resize to the image's own size);
readers resize them (bilinear, as predict does). The quantisation error, at most 1/510 per probability,
is far below the gaps the argmax decides. Arrays: `file_names` (str, N), `classes` (str, C), and `p<i>`
for the i-th name.

Written by the oof stages (`oof.write_oof`: one file per (model, fold), at the model's inference
resolution `Geometry.inference_shape`) and by the predict stage (the ensemble's merged test probabilities,
at the resolution `ensemble.merge.merge_probabilities` merges the members at, the largest of their inference
shapes); read by the ensemble and pseudo stages. This module imports no model code, so its readers do not
depend on (and re-run for) inference code.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.errors import UserError

LEVELS = 255  # uint8 quantisation: p -> round(p * LEVELS)


def quantise(probs: torch.Tensor) -> np.ndarray:
    """float (C, h, w) probabilities in [0, 1] -> uint8 (C, h, w), round(255 p)."""
    return (probs.float().clamp(0, 1) * LEVELS).round().to(torch.uint8).cpu().numpy()


def dequantise(stored: np.ndarray) -> torch.Tensor:
    """Inverse of `quantise` (up to its rounding): uint8 (C, h, w) -> float32 (C, h, w)."""
    return torch.from_numpy(stored.astype(np.float32) / LEVELS)


@contextlib.contextmanager
def probabilities_writer(out: Path, classes: Sequence[str]) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """Yield `write(file_name, probs)`, which quantises and stores one image's (C, h, w) probabilities
    (in the order written); `out` appears, atomically, when the block ends without an error. Streams:
    one image in memory at a time."""
    names: list[str] = []
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:

        def write(file_name: str, probs: torch.Tensor) -> None:
            if probs.ndim != 3 or probs.shape[0] != len(classes):
                raise ValueError(
                    f"{file_name}: probabilities must be ({len(classes)}, h, w), got {probs.shape}"
                )
            _write_array(archive, f"p{len(names)}", quantise(probs))
            names.append(file_name)

        yield write
        # Last, so the names need not be known before the images stream through.
        _write_array(archive, "file_names", np.array(names, dtype=str))
        _write_array(archive, "classes", np.array(list(classes), dtype=str))


def write_probabilities(out: Path, classes: Sequence[str], items: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Store every (file_name, (C, h, w) probabilities) of `items` in `out` (`probabilities_writer`);
    returns how many."""
    count = 0
    with probabilities_writer(out, classes) as write:
        for file_name, probs in items:
            write(file_name, probs)
            count += 1
    return count


@dataclass
class StoredProbabilities:
    """A stored probabilities file (`probabilities_writer`), read lazily: one image's array decompressed
    at a time."""

    path: Path
    file_names: list[str]
    classes: list[str]
    _archive: np.lib.npyio.NpzFile
    remedy: str  # what the user should do about a broken file, for the UserErrors of `probabilities`

    def __len__(self) -> int:
        return len(self.file_names)

    def probabilities(self, index: int) -> torch.Tensor:
        """float32 (C, h, w) probabilities of image `index` (in `file_names` order); a missing, corrupt or
        misshapen array is a UserError naming the file and the image."""
        try:
            stored = self._archive[f"p{index}"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(
                f"{self.path}: probabilities of '{self.file_names[index]}' unreadable ({exc}); {self.remedy}"
            ) from None
        if stored.dtype != np.uint8 or stored.ndim != 3 or stored.shape[0] != len(self.classes):
            raise UserError(
                f"{self.path}: probabilities of '{self.file_names[index]}' are {stored.dtype} "
                f"{stored.shape}, not uint8 ({len(self.classes)}, h, w); {self.remedy}"
            )
        return dequantise(stored)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for index, name in enumerate(self.file_names):
            yield name, self.probabilities(index)


def read_probabilities(
    path: Path, what: str = "out-of-fold probabilities", remedy: str = "re-run its oof stage"
) -> StoredProbabilities:
    """Open a file `probabilities_writer` wrote; a missing or foreign file is a UserError naming it, `what`
    it should hold and the `remedy`."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found ({remedy})")
    try:
        archive = np.load(path, allow_pickle=False)
        names, classes = archive["file_names"].tolist(), archive["classes"].tolist()
        if not isinstance(names, list) or not isinstance(classes, list):
            raise ValueError("file_names and classes must be lists")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not {what} ({exc}); {remedy}") from None
    return StoredProbabilities(path, names, classes, archive, remedy)


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    # What np.savez_compressed does, one array at a time, so no fold's arrays are all held in memory.
    with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
