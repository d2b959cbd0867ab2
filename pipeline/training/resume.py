"""Resuming a killed training run: the fingerprint of what shapes the weights, resume state, RNG capture."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Recipe
from pipeline.data.images import image_path, instance_map_path, mask_relpath
from pipeline.errors import UserError
from pipeline.models.checkpoints import load_checkpoint

# The pipeline modules (paths under pipeline/) whose code shapes the trained weights. Inference, OOF and
# ensembling modules are left out on purpose: they only shape what is computed from best.pt, which their
# own stages redo. So are parsing and checking (params, the COCO json, the manifest) and messages: what
# they decide reaches the weights through the resolved recipe and the data bytes, which are hashed.
WEIGHT_MODULES = (
    "data/folds.py",
    "data/geometry.py",
    "data/images.py",
    "data/loaders.py",
    "data/pseudo.py",
    "metrics.py",
    "models/architectures.py",
    "models/checkpoints.py",
    "models/factory.py",
    "models/losses.py",
    "training/augment.py",
    "training/copypaste.py",
    "training/dataset.py",
    "training/fold_data.py",
    "training/resume.py",
    "training/runtime.py",
    "training/state.py",
    "training/train.py",
    "training/weightmap.py",
)
# Libraries whose versions shape the weights (augmentation draws, kernels, initialisation). OpenCV is
# installed under one of several distribution names; the one that is not installed reads None.
WEIGHT_LIBRARIES = (
    "albumentations",
    "numpy",
    "opencv-python",
    "opencv-python-headless",
    "pytorch-msssim",
    "scipy",
    "segmentation-models-pytorch",
    "timm",
    "torch",
)


def run_fingerprint(
    recipe: Recipe,
    fold: int,
    world_size: int,
    inputs: Sequence[Path],
    root: Path,
    masks: Path,
    file_names: Sequence[str],
    *,
    average: str,
    extra_files: Sequence[Path] = (),
) -> str:
    """Hash of everything that shapes one (model, fold)'s weights; a resume state with another is stale.

    DVC re-runs a train stage when any of its deps changes, and the model's folder persists, so this is
    what tells a killed run (resume it) from a finished run whose inputs changed (train again): the
    recipe (model, augment, train), the fold, the DDP world size, the `inputs` files (folds.csv, the
    manifest), the bytes of every image and mask (and instance map, with boundary weights or
    copy-paste) the fold reads, `extra_files` (pseudo-labelled images and their labels), the metric's
    `average` (it picks best.pt), a local encoder weights file or pretrained folder, the code in
    WEIGHT_MODULES and the library versions. How the run is carried out (loader workers) and everything
    downstream of best.pt (TTA, submission) are left out.
    """
    data = hashlib.sha256()
    # The boundary weight map reads the instance maps: an edit that only splits an annotation leaves
    # the class mask as it was but changes the weights.
    # Copy-paste cuts its objects by the instance maps too.
    instances = recipe.train.boundary_w0 > 0 or recipe.augment.copy_paste > 0
    for name in file_names:
        paths = [image_path(root, name), masks / mask_relpath(name)]
        if instances:
            paths.append(instance_map_path(masks, name))
        for path in paths:
            data.update(sha256_file(path).encode())
    for path in extra_files:
        data.update(sha256_file(path).encode())
    package = Path(__file__).parents[1]
    relevant = {
        "recipe": recipe.model_dump() | {"name": None},  # renaming a model does not change it
        "fold": fold,
        "average": average,
        "world_size": world_size,
        "inputs": [sha256_file(path) for path in inputs],
        "images_and_masks": data.hexdigest(),
        "weights_files": _weights_files(recipe),
        "code": {name: sha256_file(package / name) for name in WEIGHT_MODULES},
        "libraries": {name: _version(name) for name in WEIGHT_LIBRARIES},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _weights_files(recipe: Recipe) -> dict[str, str | None]:
    """Hashes of the local files a recipe initialises from (an encoder state dict, a pretrained folder)."""
    hashes: dict[str, str | None] = {}
    weights = recipe.model.encoder_weights
    if weights and Path(weights).is_file():
        hashes["encoder_weights"] = sha256_file(Path(weights))
    pretrained = recipe.model.from_pretrained
    folder = Path(pretrained).expanduser() if pretrained else None
    if folder is not None and folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            hashes[f"from_pretrained/{path.relative_to(folder)}"] = sha256_file(path)
    elif pretrained:
        hashes["from_pretrained"] = pretrained  # a hub id: its name (a revision pin belongs in the id)
    return hashes


def read_resume_state(model_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """last.pt if it and best.pt were both written by a run with this fingerprint, else None (start fresh)."""
    last, best = model_dir / "last.pt", model_dir / "best.pt"
    if not (last.is_file() and best.is_file()):
        return None
    try:
        state = load_checkpoint(last)
        best_fingerprint = load_checkpoint(best).get("fingerprint")
    except UserError as exc:  # e.g. written by an older version: retraining beats refusing to run
        print(f"warning: cannot resume ({exc}); starting fresh", flush=True)
        return None
    if state.get("fingerprint") != fingerprint or best_fingerprint != fingerprint:
        return None
    return state


def rng_states() -> dict[str, Any]:
    """Python, NumPy and torch generator states in a form `torch.load(weights_only=True)` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            **numpy_state,
            "state": {
                **numpy_state["state"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            },
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `rng_states` (each epoch also reseeds; this restores the state between epochs)."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes; a missing file is a UserError naming it."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    return digest.hexdigest()
