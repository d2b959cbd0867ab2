"""Class probabilities stored compactly, one image at a time: held-out predictions of one (model, fold).

Storage: one `.npz` (zip, deflate) per (model, fold) holding, per held-out image, its probabilities as
uint8 (C, h, w), p quantised to round(255 p), at the model's inference resolution (h, w) =
`Geometry.inference_shape` of the image: what the model predicted, before any resize to the image's own
size. Ensembling and scoring resize them (bilinear, as predict does) to each image's own size. The
quantisation error, at most 1/510 per probability, is far below the gaps the argmax decides.

The predict stage stores the ensemble's merged test probabilities in the same format
(`probabilities_writer`): per image at the resolution `infer.merge_probabilities` merges the members at,
the largest of the members' inference shapes (the same for every member when they share a geometry).

Arrays: `file_names` (str, N), `classes` (str, C), and `p<i>` for the i-th name.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.coco import ImageRecord
from pipeline.config import PredictParams
from pipeline.dataset import ImageDataset
from pipeline.errors import UserError
from pipeline.geometry import Geometry
from pipeline.infer import predict_probabilities, resolve_tta, window_overlap_of
from pipeline.models import load_checkpoint, model_from_checkpoint

LEVELS = 255  # uint8 quantisation: p -> round(p * LEVELS)


def quantise(probs: torch.Tensor) -> np.ndarray:
    """float (C, h, w) probabilities in [0, 1] -> uint8 (C, h, w), round(255 p)."""
    return (probs.float().clamp(0, 1) * LEVELS).round().to(torch.uint8).cpu().numpy()


def dequantise(stored: np.ndarray) -> torch.Tensor:
    """Inverse of `quantise` (up to its rounding): uint8 (C, h, w) -> float32 (C, h, w)."""
    return torch.from_numpy(stored.astype(np.float32) / LEVELS)


def held_out(images: Sequence[ImageRecord], fold_of: dict[str, int], fold: int) -> list[ImageRecord]:
    """The images of `fold`, in manifest order."""
    return [image for image in images if fold_of[image.file_name] == fold]


def write_oof(
    checkpoint: Path,
    images: Sequence[ImageRecord],
    root: Path,
    predict: PredictParams,
    device: torch.device,
    out: Path,
) -> str:
    """Predict `images` (the fold's held-out images) with best.pt at `checkpoint` and the TTA that
    `predict.tta` resolves to for its training augmentation (in sliding windows when
    `predict.sliding_window`); write their quantised probabilities to `out` (atomically, streaming: one
    image in memory at a time). Returns the TTA used."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, source=str(checkpoint))
    for key in ("geometry", "augment"):
        if key not in ckpt:
            raise UserError(f"{checkpoint}: checkpoint has no '{key}' (re-run its train stage)")
    tta = resolve_tta(predict.tta, [ckpt["augment"]])
    dataset = ImageDataset(root, images, Geometry.from_dict(ckpt["geometry"]))
    probabilities = predict_probabilities(
        [model],
        None,
        dataset,
        tta,
        predict.scales,
        predict.batch_size,
        predict.num_workers,
        device,
        predict.amp,
        window_overlap_of(predict),
    )
    progress = tqdm(probabilities, f"out-of-fold {checkpoint.parent.name}", total=len(images))
    write_probabilities(out, ckpt["classes"], ((images[index].file_name, probs) for index, probs in progress))
    return tta


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
class OofProbabilities:
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


def read_oof(
    path: Path, what: str = "out-of-fold probabilities", remedy: str = "re-run its oof stage"
) -> OofProbabilities:
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
    return OofProbabilities(path, names, classes, archive, remedy)


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    # What np.savez_compressed does, one array at a time, so no fold's arrays are all held in memory.
    with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
