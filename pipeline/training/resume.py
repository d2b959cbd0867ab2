"""Resuming a killed training run: the fingerprint of what shapes the weights, resume state, RNG capture."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ModelParams, Recipe
from pipeline.data.images import image_path, instance_map_path, mask_relpath
from pipeline.digest import sha256_file
from pipeline.errors import UserError
from pipeline.models.checkpoints import load_checkpoint
from pipeline.models.factory import pretrained_files

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
    "training/topk.py",
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
    fold: int | None,
    world_size: int,
    inputs: Sequence[Path],
    root: Path,
    masks: Path,
    file_names: Sequence[str],
    *,
    average: str,
    execution: Mapping[str, Any],
    extra_files: Sequence[Path] = (),
) -> str:
    """Hash of everything that shapes one (model, fold)'s weights; a resume state with another is stale.

    DVC re-runs a train stage when any of its deps changes, and the model's folder persists, so this is
    what tells a killed run (resume it) from a finished run whose inputs changed (train again): the
    recipe (model, augment, train), the fold, the DDP world size, `execution` (device type, autocast
    precision, memory format: a CPU float32 run is not continued as a GPU bf16 one), the `inputs` files
    (folds.csv, the manifest), the bytes of every image and mask (and instance map, with boundary
    weights or copy-paste) the fold reads, `extra_files` (pseudo-labelled images and their labels),
    the metric's `average` (it picks best.pt), a local encoder weights file or pretrained folder, the
    code in WEIGHT_MODULES and the library versions. How the run is carried out (loader workers) and
    everything downstream of best.pt (TTA, submission) are left out.
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
        "execution": dict(execution),
        "inputs": [sha256_file(path) for path in inputs],
        "images_and_masks": data.hexdigest(),
        "weights_files": weights_files(recipe.model),
        "code": {name: sha256_file(package / name) for name in WEIGHT_MODULES},
        "libraries": {name: _version(name) for name in WEIGHT_LIBRARIES},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def weights_files(model: ModelParams) -> dict[str, str | None]:
    """Hashes of the files a model initialises from: a local encoder state dict, a pretrained folder's
    files, or the files a hub id resolves to."""
    hashes: dict[str, str | None] = {}
    weights = model.encoder_weights
    if weights and Path(weights).is_file():
        hashes["encoder_weights"] = sha256_file(Path(weights))
    pretrained = model.from_pretrained
    folder = Path(pretrained).expanduser() if pretrained else None
    if folder is not None and folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            hashes[f"from_pretrained/{path.relative_to(folder)}"] = sha256_file(path)
    elif pretrained:
        # A hub id: the files it resolves to now (from the cache once fetched). Unpinned, the hub may
        # serve new weights on a re-run; their hashes then differ, and the run starts fresh instead of
        # resuming a state the old weights began.
        hashes["from_pretrained"] = pretrained
        for path in pretrained_files(pretrained):
            hashes[f"from_pretrained/{path.name}"] = sha256_file(path)
    return hashes


def read_resume_state(model_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """last.pt if a run with this fingerprint wrote it and best.pt agrees with it, else None (start fresh).

    last.pt is written before best.pt and names the epoch best.pt must hold ("best_epoch"; None before
    the first validation, which `train.val_every` > 1 puts off). A kill between the two writes leaves
    best.pt one improvement behind; last.pt's own weights are then that epoch's, and the returned state
    says so ("rewrite_best"): the caller writes best.pt from them. A damaged or mismatched file means a
    fresh start, said in one line; a fingerprint of other inputs or code means one silently.
    """
    last, best = model_dir / "last.pt", model_dir / "best.pt"
    if not last.is_file():
        return None
    try:
        state = load_checkpoint(last)
    except UserError as exc:
        print(f"{exc}; starting this fold fresh", flush=True)
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    best_epoch = state.get("best_epoch")
    state["rewrite_best"] = False
    if best_epoch is None:  # no validation yet: there is no best.pt to agree with
        return state
    try:
        saved = load_checkpoint(best) if best.is_file() else None
    except UserError as exc:
        saved, problem = None, str(exc)
    else:
        problem = f"{best}: missing"
    if saved is not None and saved.get("fingerprint") == fingerprint and saved.get("epoch") == best_epoch:
        return state
    if best_epoch == state["epoch"]:
        state["rewrite_best"] = True
        return state
    if saved is not None:
        problem = f"{best}: holds epoch {saved.get('epoch')}, last.pt names epoch {best_epoch}"
    print(f"{problem}; starting this fold fresh", flush=True)
    return None


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
