"""segmentation-models-pytorch model factory and self-describing checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.config import AugmentParams, ModelParams
from pipeline.errors import UserError
from pipeline.geometry import geometry_of

# smp's own registry (lower-case name -> class); we check against it to give a one-line error.
ARCHITECTURES: dict[str, type[nn.Module]] = smp.MODEL_ARCHITECTURES_MAPPING

# Wrappers add these to parameter names: DistributedDataParallel and torch.compile respectively.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build_model(model_params: ModelParams, n_classes: int) -> nn.Module:
    """Create the smp model that outputs `n_classes` logits per pixel (N, n_classes, H, W).

    `model.encoder_weights` is None (random init), a name smp knows for the encoder such as
    "imagenet" (smp downloads it), or a path to a local state-dict file (.pt/.pth or .safetensors)
    that is loaded into `model.encoder`, which works offline.
    """
    arch = model_params.arch
    if arch.lower() not in ARCHITECTURES:
        valid = ", ".join(cls.__name__ for cls in ARCHITECTURES.values())
        raise UserError(f"params: model.arch '{arch}' is not an smp architecture (valid: {valid})")
    encoder = model_params.encoder
    if not encoder.startswith("tu-") and encoder not in smp.encoders.encoders:
        valid = ", ".join(smp.encoders.get_encoder_names())
        raise UserError(
            f"params: model.encoder '{encoder}' is not an smp encoder (valid: {valid}, or tu-<timm model>)"
        )

    weights = model_params.encoder_weights
    local_weights = weights is not None and not _is_named_weights(encoder, weights)
    kwargs: dict[str, Any] = {}
    if model_params.decoder_channels is not None:
        # smp forwards unknown keyword arguments to the encoder, which drops them silently.
        if "decoder_channels" not in inspect.signature(ARCHITECTURES[arch.lower()]).parameters:
            raise UserError(f"params: model.decoder_channels is not a setting of model.arch '{arch}'")
        kwargs["decoder_channels"] = list(model_params.decoder_channels)
    try:
        model = smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=None if local_weights else weights,
            classes=n_classes,
            **kwargs,
        )
    except (TypeError, ValueError) as exc:
        # e.g. a decoder_channels list whose length is not the encoder depth
        raise UserError(f"params: model {arch}/{encoder} rejects these settings ({exc})") from None
    if local_weights:
        load_encoder_weights(model.encoder, Path(weights), encoder)
    return model


def _is_named_weights(encoder: str, weights: str) -> bool:
    """True when `weights` names pretrained weights smp can fetch for `encoder` (not a file path)."""
    if encoder.startswith("tu-"):
        return weights == "imagenet"  # timm picks the pretrained tag from the encoder name itself
    return weights in smp.encoders.encoders[encoder]["pretrained_settings"]


def load_encoder_weights(encoder: nn.Module, path: Path, encoder_name: str) -> None:
    """Load a local state dict into `encoder`; classifier-head keys are dropped by smp's encoders."""
    if not path.is_file():
        raise UserError(f"{path}: encoder weights file not found (params: model.encoder_weights)")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: cannot read encoder weights ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: encoder weights must be a state dict (parameter name -> tensor)")
    state = strip_wrapper_prefixes(state)
    expected = encoder.state_dict()
    try:
        encoder.load_state_dict(dict(state))  # smp's override pops head keys from the dict it is given
    except RuntimeError:
        raise UserError(f"{path}: {_mismatch(expected, state)} for encoder '{encoder_name}'") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (tensors and builtins only) with torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU, refusing any pickled object other than tensors and builtins."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's unpickler stops at the first global it does not allow, before calling anything.
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise UserError(
                f"{path}: refused: the checkpoint holds a pickled Python object ({unsafe.group(1)}), "
                "not only tensors and builtins"
            ) from None
        raise UserError(f"{path}: not a torch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: a checkpoint must be a dict, got {type(state).__name__}")
    return state


def checkpoint_state(
    model: nn.Module,
    model_params: ModelParams,
    classes: list[str],
    augment: AugmentParams,
    epoch: int,
    score: float,
    fold: int,
) -> dict[str, Any]:
    """The self-describing dict that `model_from_checkpoint` rebuilds a model from.

    It records the training augmentation: inference takes the input geometry from it and checks that
    its TTA uses only symmetries the model was trained with.
    """
    return {
        "model_state": strip_wrapper_prefixes(model.state_dict()),
        "model_params": dataclasses.asdict(model_params),
        "classes": list(classes),
        "geometry": geometry_of(augment).to_dict(),
        "augment": dataclasses.asdict(augment),
        "epoch": int(epoch),
        "score": float(score),
        "fold": int(fold),
    }


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes (its own params, not today's) and load it, in eval mode.

    `source` names the file in error messages.
    """
    missing = [key for key in ("model_state", "model_params", "classes") if key not in ckpt]
    if missing:
        raise UserError(f"{source}: not a trashseg checkpoint (missing key '{missing[0]}')")
    try:
        model_params = ModelParams(**ckpt["model_params"])
    except TypeError as exc:
        raise UserError(f"{source}: model_params do not match this version's ModelParams ({exc})") from None
    # The weights come from the checkpoint; never download or read the encoder's init weights again.
    model_params = dataclasses.replace(model_params, encoder_weights=None)
    model = build_model(model_params, n_classes=len(ckpt["classes"]))
    state = strip_wrapper_prefixes(ckpt["model_state"])
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{source}: {_mismatch(model.state_dict(), state)} for its model_params") from None
    return model.eval()


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the name prefixes DDP ("module.") and torch.compile ("_orig_mod.") add, in any nesting."""
    clean = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def _mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Describe how a state dict differs from a module's: missing keys, extra keys or tensor shapes."""
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. '{extra[0]}')")
        return "weights do not match: " + ", ".join(parts) + " keys"
    wrong = next((k for k in expected if expected[k].shape != given[k].shape), None)
    if wrong is None:
        return "weights do not load"
    return (
        f"weights do not match: '{wrong}' has shape {tuple(given[wrong].shape)}, "
        f"expected {tuple(expected[wrong].shape)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
