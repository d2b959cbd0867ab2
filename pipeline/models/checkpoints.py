"""Self-describing checkpoints: written atomically, read safely, rebuilt into the model they describe."""

from __future__ import annotations

import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.config import AugmentParams, ModelParams
from pipeline.data.geometry import geometry_of
from pipeline.errors import UserError
from pipeline.models.factory import (
    build_model,
    first_line,
    model_from_smp_config,
    smp_config,
    state_mismatch,
    strip_wrapper_prefixes,
)

REFIT_FILE = "final.pt"  # a refit model (stage refit@<model>), beside its resume state last.pt


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (tensors and builtins only) with torch.save, atomically; same state, same bytes."""
    # Through a file object: given a path, torch.save names the zip's folder after the (random) temp
    # file, so two identical runs would write different bytes and DVC would record different hashes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU: its zip's CRCs checked first (torch.load does not check them, so
    a file with zeroed pages would load with wrong weights), any pickled object other than tensors and
    builtins refused. Every problem is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    verify_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's unpickler stops at the first global it does not allow, before calling anything;
        # torch words it "Unsupported global: GLOBAL x.y ..." or "... unsupported GLOBAL posix.system ...".
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise UserError(
                f"{path}: refused: the checkpoint holds a pickled Python object ({unsafe.group(1)}), "
                "not only tensors and builtins"
            ) from None
        raise UserError(f"{path}: not a torch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: a checkpoint must be a dict, got {type(state).__name__}")
    return state


def verify_archive(path: Path) -> None:
    """Check that `path` is a whole zip archive (torch.save's format) whose every member matches its
    CRC; a one-line UserError naming the file and the first damage found otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path}: damaged or not a torch checkpoint (not a whole zip: {exc})") from None
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise UserError(f"{path}: damaged checkpoint ({first_line(exc)})") from None
    if damaged is not None:
        raise UserError(f"{path}: damaged checkpoint (member {damaged} fails its CRC check)")


def checkpoint_state(
    model: nn.Module,
    model_params: ModelParams,
    classes: list[str],
    augment: AugmentParams,
    epoch: int,
    score: float,
    fold: int | None,
) -> dict[str, Any]:
    """The self-describing dict that `model_from_checkpoint` rebuilds a model from.

    It records smp's own config of the model, so a `from_pretrained` model rebuilds without its folder
    or the network, and the training augmentation: inference takes the input geometry from it and
    checks that its TTA uses only symmetries the model was trained with.
    """
    state = {
        "model_state": strip_wrapper_prefixes(model.state_dict()),
        "model_params": model_params.model_dump(),
        "classes": list(classes),
        "geometry": geometry_of(augment).to_dict(),
        "augment": augment.model_dump(),
        "epoch": int(epoch),
        "score": float(score),
        "fold": None if fold is None else int(fold),  # None: a refit on every fold
    }
    config = smp_config(model)
    if config is not None:
        state["smp_config"] = config
    return state


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes (its own config, not today's params), loaded, in eval mode.

    Checkpoints without "smp_config" (written before it was recorded) rebuild from their model_params.
    `source` names the file in error messages.
    """
    missing = [key for key in ("model_state", "model_params", "classes") if key not in ckpt]
    if missing:
        raise UserError(f"{source}: not a trashseg checkpoint (missing key '{missing[0]}')")
    n_classes = len(ckpt["classes"])
    if "smp_config" in ckpt:
        # The weights come from the checkpoint; the config never downloads or reads init weights.
        model = model_from_smp_config(dict(ckpt["smp_config"]), n_classes, source)
    else:
        try:
            model_params = ModelParams.model_validate(ckpt["model_params"])
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise UserError(
                f"{source}: model_params do not match this version's ModelParams "
                f"({'.'.join(map(str, problem['loc']))}: {problem['msg']})"
            ) from None
        if model_params.from_pretrained is not None:
            raise UserError(f"{source}: a from_pretrained model's checkpoint needs its 'smp_config'")
        # Never download or read the encoder's init weights again.
        model = build_model(model_params.model_copy(update={"encoder_weights": None}), n_classes)
    state = strip_wrapper_prefixes(ckpt["model_state"])
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(
            f"{source}: {state_mismatch(model.state_dict(), state)} for its model config"
        ) from None
    return model.eval()
