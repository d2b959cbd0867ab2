"""Tests for model.from_pretrained: whole smp models saved with save_pretrained, loaded offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

import pipeline.models.factory
from pipeline.config import AugmentParams, ModelParams
from pipeline.errors import UserError
from pipeline.models.checkpoints import (
    checkpoint_state,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pipeline.models.factory import build_model, check_model_params
from pipeline.training.resume import weights_files

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _saved(folder: Path, **kwargs: object) -> torch.nn.Module:
    """A small smp model saved the way smp documents it: model.save_pretrained(folder)."""
    torch.manual_seed(3)
    init = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3, "decoder_channels": [16] * 5}
    model = smp.create_model("Unet", **{**init, **kwargs}).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "saved"
    return folder, _saved(folder)


def _from(folder: Path | str) -> ModelParams:
    # arch, encoder: today's defaults (Unet, resnet34), which the saved config must override.
    return ModelParams(from_pretrained=str(folder))


def test_from_pretrained_loads_the_saved_model(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, donor = saved
    model = build_model(_from(folder), n_classes=3).eval()
    assert model.state_dict().keys() == donor.state_dict().keys()
    for key, tensor in donor.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    with torch.no_grad():
        torch.testing.assert_close(model(X), donor(X), rtol=0, atol=0)


def test_another_class_count_gets_a_fresh_head(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, donor = saved
    model = build_model(_from(folder), n_classes=5).eval()
    with torch.no_grad():
        assert model(X).shape == (2, 5, 64, 64)
    loaded, saved_state = model.state_dict(), donor.state_dict()
    head = {k for k in saved_state if loaded[k].shape != saved_state[k].shape}
    assert head == {"segmentation_head.0.weight", "segmentation_head.0.bias"}
    assert all(torch.equal(loaded[k], saved_state[k]) for k in saved_state if k not in head)


def test_saved_activation_and_classification_head_are_not_rebuilt(tmp_path: Path) -> None:
    # Losses and inference take logits of the segmentation head only.
    donor = _saved(tmp_path / "m", activation="sigmoid", aux_params={"classes": 2})
    model = build_model(_from(tmp_path / "m"), n_classes=3).eval()
    with torch.no_grad():
        logits = model(X)
        masks, _labels = donor(X)
    torch.testing.assert_close(torch.sigmoid(logits), masks)


@pytest.mark.parametrize("name", ["nope", "./nope", "~/trashseg-no-such-folder/unet"])
def test_missing_folder_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    source = str(tmp_path / name) if name == "nope" else name
    with pytest.raises(
        UserError, match=rf"{re.escape(source)}: folder not found \(params: model.from_pretrained\)"
    ):
        build_model(_from(source), n_classes=3)


def test_folder_without_smp_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match=r"empty: no config.json, not a folder written by smp's save_pretrained"
    ):
        build_model(_from(tmp_path / "empty"), n_classes=3)


def test_weights_that_do_not_match_the_config_are_refused(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "encoder_name": "resnet34"}))
    with pytest.raises(UserError, match=r"model.from_pretrained\): weights do not match: .* missing"):
        build_model(_from(folder), n_classes=3)


def test_settings_the_saved_config_fixes_are_refused(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = saved
    params = ModelParams(from_pretrained=str(folder), decoder_channels=[8] * 5)
    with pytest.raises(UserError, match=r"model.decoder_channels does not apply with model.from_pretrained"):
        build_model(params, n_classes=3)


def test_a_hub_id_is_fetched_through_the_hub(
    saved: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, donor = saved
    fetched = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None) -> str:  # the network
        fetched.append((repo_id, filename, revision))
        return str(folder / filename)

    monkeypatch.setattr(pipeline.models.factory, "hf_hub_download", fake_download)
    model = build_model(_from("smp-hub/tiny-unet"), n_classes=3).eval()
    assert fetched == [("smp-hub/tiny-unet", f, None) for f in ("config.json", "model.safetensors")]
    fetched.clear()
    check_model_params(_from("smp-hub/tiny-unet@3f2a9c1"))  # pinned to a commit
    build_model(_from("smp-hub/tiny-unet@v1.0"), n_classes=3)  # or a tag
    assert fetched == [("smp-hub/tiny-unet", f, "v1.0") for f in ("config.json", "model.safetensors")]
    with torch.no_grad():
        torch.testing.assert_close(model(X), donor(X), rtol=0, atol=0)

    def offline(repo_id: str, filename: str, revision: str | None = None) -> str:
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not in the cache")

    monkeypatch.setattr(pipeline.models.factory, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"smp-hub/tiny-unet: no such local folder, and cannot fetch it"):
        build_model(_from("smp-hub/tiny-unet"), n_classes=3)


def test_the_resume_fingerprint_holds_the_hashes_of_what_a_hub_id_resolves_to(
    saved: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder, _ = saved
    served = tmp_path / "served"  # what the hub serves for the unpinned id today
    shutil.copytree(folder, served)

    def download(repo_id: str, filename: str, revision: str | None = None) -> str:
        return str(served / filename)

    monkeypatch.setattr(pipeline.models.factory, "hf_hub_download", download)
    before = weights_files(_from("smp-hub/tiny-unet"))
    assert set(before) == {
        "from_pretrained",
        "from_pretrained/config.json",
        "from_pretrained/model.safetensors",
    }
    weights = served / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # new weights behind the same id
    after = weights_files(_from("smp-hub/tiny-unet"))
    assert after["from_pretrained/model.safetensors"] != before["from_pretrained/model.safetensors"]


def test_checkpoint_rebuilds_without_the_folder(tmp_path: Path, saved: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = saved
    classes = ["background", "a", "b", "c"]
    model = build_model(_from(folder), n_classes=len(classes)).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, checkpoint_state(model, _from(folder), classes, AugmentParams(size=64), 1, 0.5, 0))
    shutil.rmtree(folder)

    rebuilt = model_from_checkpoint(load_checkpoint(path), source=str(path))
    assert type(rebuilt) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), model(X), rtol=0, atol=0)
