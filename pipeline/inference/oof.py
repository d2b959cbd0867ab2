"""Held-out predictions of one (model, fold): class probabilities with the configured TTA, stored compactly
(`probstore`'s format, at the model's inference resolution `Geometry.inference_shape` of each image)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.config import PredictParams
from pipeline.data.geometry import Geometry
from pipeline.data.loaders import ImageDataset
from pipeline.data.probstore import write_probabilities
from pipeline.data.records import ImageRecord
from pipeline.errors import UserError
from pipeline.inference.infer import predict_probabilities, resolve_tta, window_overlap_of
from pipeline.models.checkpoints import load_checkpoint, model_from_checkpoint


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
