"""Held-out predictions of one (model, fold): class probabilities with the configured TTA, stored compactly.

Storage: one `.npz` (zip, deflate) per (model, fold) holding, per held-out image, its probabilities as
uint8 (C, h, w), p quantised to round(255 p), at the model's inference resolution (h, w) =
`Geometry.inference_shape` of the image: what the model predicted, before any resize to the image's own
size. Ensembling and scoring resize them (bilinear, as predict does) to each image's own size. The
quantisation error, at most 1/510 per probability, is far below the gaps the argmax decides.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
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
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        _write_array(archive, "file_names", np.array([image.file_name for image in images], dtype=str))
        _write_array(archive, "classes", np.array(list(ckpt["classes"]), dtype=str))
        for index, probs in tqdm(probabilities, f"out-of-fold {checkpoint.parent.name}", total=len(images)):
            _write_array(archive, f"p{index}", quantise(probs))
    return tta


@dataclass
class OofProbabilities:
    """A stored (model, fold) of `write_oof`, read lazily: one image's array decompressed at a time."""

    path: Path
    file_names: list[str]
    classes: list[str]
    _archive: np.lib.npyio.NpzFile

    def __len__(self) -> int:
        return len(self.file_names)

    def probabilities(self, index: int) -> torch.Tensor:
        """float32 (C, h, w) probabilities of image `index` (in `file_names` order)."""
        return dequantise(self._archive[f"p{index}"])

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for index, name in enumerate(self.file_names):
            yield name, self.probabilities(index)


def read_oof(path: Path) -> OofProbabilities:
    """Open a file `write_oof` wrote; a missing or foreign file is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path}: out-of-fold probabilities not found (run its oof stage)")
    try:
        archive = np.load(path, allow_pickle=False)
        names, classes = archive["file_names"].tolist(), archive["classes"].tolist()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not out-of-fold probabilities ({exc}); re-run its oof stage") from None
    return OofProbabilities(path, names, classes, archive)


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    # What np.savez_compressed does, one array at a time, so no fold's arrays are all held in memory.
    with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
