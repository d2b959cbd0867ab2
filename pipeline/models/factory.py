"""Models from a recipe: smp and trashseg architectures, pretrained weights, optimizer parameter groups."""

from __future__ import annotations

import difflib
import inspect
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from segmentation_models_pytorch.base import SegmentationModel
from torch import nn

from pipeline.config import ModelParams
from pipeline.errors import UserError
from pipeline.models import architectures

# Every model.arch (lower-case name -> class): smp's registry plus trashseg's own architectures. Ours
# replaces smp's UnetPlusPlus under its own name (same class name, same weights without deep supervision),
# so checkpoints that record `_model_class: UnetPlusPlus` rebuild with it.
ARCHITECTURES: dict[str, type[SegmentationModel]] = {
    **smp.MODEL_ARCHITECTURES_MAPPING,
    "unetplusplus": architectures.UnetPlusPlus,
    "unet3plus": architectures.UNet3Plus,
}
# Init arguments trashseg sets itself, so model.options may not: where each comes from instead.
_SET_BY_TRASHSEG = {
    "encoder_name": "it is model.encoder",
    "encoder_weights": "it is model.encoder_weights",
    "decoder_channels": "it is model.decoder_channels",
    "classes": "the class count comes from the data",
    "in_channels": "images are RGB (3 channels)",
    "activation": "trashseg's losses and inference take logits",
    "aux_params": "trashseg's losses and inference take the segmentation logits alone",
}
# Heads whose output width is the class count, by name prefix in the state dict: a saved model with
# another class count keeps their fresh initialisation (see load_pretrained).
_CLASS_HEADS = ("segmentation_head.", "side_heads.", "presence_head.")

# Wrappers add these to parameter names: DistributedDataParallel and torch.compile respectively.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# What smp's save_pretrained writes (huggingface_hub's PyTorchModelHubMixin file names).
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
# A Hugging Face hub repo id: owner/name, no leading "." "/" "~" (those are local paths).
# owner/name, optionally pinned to a revision (a commit hash, tag or branch): owner/name@revision.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def build_model(model_params: ModelParams, n_classes: int) -> nn.Module:
    """Create the smp model that outputs `n_classes` logits per pixel (N, n_classes, H, W).

    `model.encoder_weights` is None (random init), a name smp knows for the encoder such as
    "imagenet" (smp downloads it), or a path to a local state-dict file (.pt/.pth or .safetensors)
    that is loaded into `model.encoder`, which works offline. With `model.from_pretrained` the whole
    model comes from an smp `save_pretrained` folder (or hub id) instead: see `load_pretrained`.
    `model.options` are further init arguments of the architecture (e.g. deep_supervision), each
    checked against its signature first.
    """
    if model_params.from_pretrained is not None:
        _check_pretrained_settings(model_params)
        return load_pretrained(model_params.from_pretrained, n_classes)
    arch = model_params.arch
    check_arch(arch, "params: model.arch")
    encoder = model_params.encoder
    check_encoder(encoder)

    weights = model_params.encoder_weights
    local_weights = weights is not None and not _is_named_weights(encoder, weights)
    init: dict[str, Any] = {
        "encoder_name": encoder,
        "encoder_weights": None if local_weights else weights,
        "classes": n_classes,
    }
    if model_params.decoder_channels is not None:
        init["decoder_channels"] = _decoder_channels(arch, model_params.decoder_channels)
    init.update(_options(arch, model_params.options or {}))
    model = _create(arch, init, f"params: model {arch}/{encoder}")
    if local_weights:
        load_encoder_weights(model.encoder, Path(weights), encoder)
    return model


def check_model_params(model_params: ModelParams) -> None:
    """Everything `build_model` would refuse, found without training or downloading: arch, encoder,
    settings the arch rejects, a missing local weights file or pretrained folder (a UserError)."""
    pretrained = model_params.from_pretrained
    if pretrained is not None:
        _check_pretrained_settings(model_params)
        if Path(pretrained).expanduser().exists() or not _HUB_ID.fullmatch(pretrained):
            load_pretrained(pretrained, n_classes=2)  # local: reads config.json and the weights
        return
    weights = model_params.encoder_weights
    local = weights is not None and not _is_named_weights(model_params.encoder, weights)
    if local and not Path(weights).is_file():
        raise UserError(f"{weights}: encoder weights file not found (params: model.encoder_weights)")
    # A random-init build catches every arch/encoder/setting mismatch in about a second, offline.
    build_model(model_params.model_copy(update={"encoder_weights": None}), n_classes=2)


def check_arch(arch: str, where: str) -> None:
    """Refuse an architecture ARCHITECTURES lacks (names are case-insensitive, as in smp.create_model)."""
    if not isinstance(arch, str) or arch.lower() not in ARCHITECTURES:
        valid = ", ".join(cls.__name__ for cls in ARCHITECTURES.values())
        raise UserError(f"{where} '{arch}' is not an architecture trashseg knows (valid: {valid})")


def check_encoder(encoder: str) -> None:
    """Refuse an encoder name that is neither smp's nor `tu-<a timm model>`, before smp raises deep inside."""
    if encoder.startswith("tu-"):
        if not timm.is_model(encoder.removeprefix("tu-")):
            close = difflib.get_close_matches(encoder.removeprefix("tu-"), timm.list_models(), n=3)
            hint = f" (did you mean {', '.join('tu-' + name for name in close)}?)" if close else ""
            raise UserError(f"params: model.encoder '{encoder}' is not a timm model{hint}")
    elif encoder not in smp.encoders.encoders:
        valid = ", ".join(smp.encoders.get_encoder_names())
        raise UserError(
            f"params: model.encoder '{encoder}' is not an smp encoder (valid: {valid}, or tu-<timm model>)"
        )


def _decoder_channels(arch: str, channels: list[int]) -> list[int]:
    """`model.decoder_channels` (one width per decoder stage) for an arch that takes such a list."""
    parameter = inspect.signature(ARCHITECTURES[arch.lower()]).parameters.get("decoder_channels")
    # smp forwards unknown keyword arguments to the encoder, which drops them silently.
    if parameter is None:
        raise UserError(f"params: model.decoder_channels is not a setting of model.arch '{arch}'")
    # DeepLabV3(Plus), PAN and UPerNet take one width; smp would fail on a list with a TypeError.
    if isinstance(parameter.default, int):
        raise UserError(
            f"params: model.decoder_channels is a list of stage widths, but model.arch '{arch}' "
            f"takes a single decoder width (default {parameter.default}): leave it null"
        )
    return list(channels)


def _check_pretrained_settings(model_params: ModelParams) -> None:
    """Refuse settings that a `model.from_pretrained` model's config.json fixes instead."""
    given = {
        "encoder_weights": model_params.encoder_weights is not None,
        "decoder_channels": model_params.decoder_channels is not None,
        "options": bool(model_params.options),
    }
    for key, is_set in given.items():
        if is_set:
            raise UserError(
                f"params: model.{key} does not apply with model.from_pretrained (its config.json "
                "fixes the model and its weights initialise it): "
                + ("leave it empty" if key == "options" else "leave it null")
            )


def _options(arch: str, options: dict[str, Any]) -> dict[str, Any]:
    """`model.options`, checked against the architecture's init arguments before anything is built."""
    parameters = inspect.signature(ARCHITECTURES[arch.lower()]).parameters
    settable = [
        name
        for name, parameter in parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and name not in _SET_BY_TRASHSEG
    ]
    for key in options:
        if key in _SET_BY_TRASHSEG:
            raise UserError(
                f"params: model.options.{key} is set by trashseg ({_SET_BY_TRASHSEG[key]}): remove it"
            )
        # smp forwards unknown keyword arguments to the encoder, which drops them silently.
        if key not in settable:
            raise UserError(
                f"params: model.options.{key} is not a setting of model.arch '{arch}' "
                f"(its settings: {', '.join(settable)})"
            )
    return dict(options)


def _create(arch: str, init: dict[str, Any], where: str) -> nn.Module:
    """ARCHITECTURES[arch](**init), with settings the architecture, smp or timm reject turned into a
    one-line UserError."""
    try:
        return ARCHITECTURES[arch.lower()](**init)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        # e.g. a decoder_channels list whose length is not the encoder depth, or a timm model
        # without the feature maps smp needs
        raise UserError(f"{where} rejects these settings ({first_line(exc)})") from None


def load_pretrained(source: str, n_classes: int) -> nn.Module:
    """The smp model saved in `source` (params: model.from_pretrained), with `n_classes` outputs.

    `source` is a folder written by smp's `save_pretrained`, or a Hugging Face hub id (owner/name) that
    is not a local path. The architecture and encoder come from its config.json and its weights
    initialise every layer; when the saved model has another number of classes, the head keeps a
    fresh initialisation, as `smp.from_pretrained(source, classes=n, strict=False)` does.
    """
    config_file, weights_file = pretrained_files(source)
    where = f"{source} (params: model.from_pretrained)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where}: cannot read its {_CONFIG_FILE} ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: its {_CONFIG_FILE} is not a JSON object")
    model = model_from_smp_config(config, n_classes, where)
    try:
        saved = load_safetensors(weights_file, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{where}: cannot read its {_WEIGHTS_FILE} ({first_line(exc)})") from None
    # model_from_smp_config leaves out a saved classification head (aux_params).
    state = {key: value for key, value in saved.items() if not key.startswith("classification_head.")}
    expected = model.state_dict()
    # Another class count changes only the heads' convs to the classes: those keep their fresh init.
    for key, tensor in expected.items():
        if key.startswith(_CLASS_HEADS) and key in state and state[key].shape != tensor.shape:
            state[key] = tensor
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{where}: {state_mismatch(expected, state)} for its config.json") from None
    return model


def pretrained_files(source: str) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a local save_pretrained folder, or fetched for a hub id
    (`owner/name`, or `owner/name@revision` to pin a commit, tag or branch)."""
    folder = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(source)
    if folder.exists() or looks_local:
        if not folder.is_dir():
            what = "not a folder" if folder.exists() else "folder not found"
            raise UserError(f"{source}: {what} (params: model.from_pretrained)")
        files = folder / _CONFIG_FILE, folder / _WEIGHTS_FILE
        for file in files:
            if not file.is_file():
                raise UserError(
                    f"{source}: no {file.name}, not a folder written by smp's save_pretrained "
                    "(params: model.from_pretrained)"
                )
        return files
    try:
        # Cached after the first run; HF_HUB_OFFLINE=1 then reads the cache without the network.
        repo_id, _, revision = source.partition("@")
        config_file = hf_hub_download(repo_id, _CONFIG_FILE, revision=revision or None)
        weights_file = hf_hub_download(repo_id, _WEIGHTS_FILE, revision=revision or None)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise UserError(
            f"{source}: no such local folder, and cannot fetch it from the Hugging Face hub "
            f"({first_line(exc)}) (params: model.from_pretrained)"
        ) from None
    return Path(config_file), Path(weights_file)


def model_from_smp_config(config: dict[str, Any], n_classes: int, where: str) -> nn.Module:
    """A randomly initialised smp model from the config smp's save_pretrained writes.

    `config` is the `_model_class` plus the model's init arguments. The model outputs `n_classes`
    logits: trashseg's losses and inference take logits, so a saved activation or classification head
    (aux_params) is not rebuilt, and weights are never downloaded: they come from the caller.
    """
    arch = config.get("_model_class")
    check_arch(arch, f"{where}: config's _model_class")
    init = {key: value for key, value in config.items() if not key.startswith("_")}
    if init.get("in_channels", 3) != 3:
        raise UserError(f"{where}: the model takes {init['in_channels']} input channels; images are RGB (3)")
    encoder = str(init.get("encoder_name", ""))
    if encoder.startswith("tu-hf-hub:"):
        # timm fetches a hub encoder's config from the network even without its weights: rebuilding one
        # would download at load time (and fail offline, as on Kaggle).
        raise UserError(
            f"{where}: encoder {encoder} is fetched from the Hugging Face hub to be rebuilt; refused "
            "(a checkpoint must rebuild offline)"
        )
    init.update(encoder_weights=None, classes=n_classes)
    # trashseg's own architectures have neither an activation nor smp's classification head to turn off.
    accepted = inspect.signature(ARCHITECTURES[arch.lower()]).parameters
    init.update({key: None for key in ("activation", "aux_params") if key in accepted})
    return _create(arch, init, f"{where}: model {arch}/{init.get('encoder_name')}")


def smp_config(model: nn.Module) -> dict[str, Any] | None:
    """What `model_from_smp_config` rebuilds `model` from (the config.json save_pretrained writes), or None
    for a model that is not an smp SegmentationModel."""
    while not isinstance(model, SegmentationModel):
        # DistributedDataParallel keeps the model in .module, torch.compile in ._orig_mod.
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    # smp's HubMixin records the init arguments (defaults included) when the model is created.
    return {"_model_class": type(model).__name__, **model.config}


def parameter_groups(
    model: nn.Module, lr: float, encoder_lr: float | None, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups: `model.encoder` at `encoder_lr` (None: `lr`), everything else at `lr`.

    Within each part, weight decay applies to weights (ndim >= 2) only: decaying biases and norm scales
    just fights the normalisation. Every parameter is in exactly one group; empty groups are left out.
    Each group is {"name": "encoder/decay" etc. (for logging), "params", "lr", "weight_decay"}.
    """
    in_encoder = {id(p) for p in model.get_submodule("encoder").parameters()}
    groups: dict[str, dict[str, Any]] = {}
    for part, part_lr in (("encoder", lr if encoder_lr is None else encoder_lr), ("decoder", lr)):
        for kind, decay in (("decay", weight_decay), ("no_decay", 0.0)):
            groups[f"{part}/{kind}"] = {
                "name": f"{part}/{kind}",
                "params": [],
                "lr": part_lr,
                "weight_decay": decay,
            }
    for parameter in model.parameters():  # each shared parameter once
        part = "encoder" if id(parameter) in in_encoder else "decoder"
        kind = "decay" if parameter.ndim >= 2 else "no_decay"
        groups[f"{part}/{kind}"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


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
        raise UserError(f"{path}: cannot read encoder weights ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: encoder weights must be a state dict (parameter name -> tensor)")
    state = strip_wrapper_prefixes(state)
    expected = encoder.state_dict()
    try:
        encoder.load_state_dict(dict(state))  # smp's override pops head keys from the dict it is given
    except RuntimeError:
        raise UserError(f"{path}: {state_mismatch(expected, state)} for encoder '{encoder_name}'") from None


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the name prefixes DDP ("module.") and torch.compile ("_orig_mod.") add, in any nesting."""
    clean = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
