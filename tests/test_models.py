"""Tests for pipeline.models: the smp factory, local encoder weights and safe checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

from pipeline.config import AugmentParams, ModelParams
from pipeline.errors import UserError
from pipeline.models import architectures
from pipeline.models.checkpoints import (
    checkpoint_state,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pipeline.models.factory import (
    build_model,
    model_from_smp_config,
    parameter_groups,
    smp_config,
    strip_wrapper_prefixes,
)

SMALL = ModelParams(
    arch="Unet", encoder="resnet18", encoder_weights=None, decoder_channels=[32, 16, 16, 8, 8]
)

AUG64 = AugmentParams(size=64)


def test_build_model_outputs_one_logit_map_per_class() -> None:
    model = build_model(SMALL, n_classes=5)
    out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 5, 64, 64)


def test_unknown_arch_lists_valid_ones() -> None:
    with pytest.raises(UserError, match=r"model.arch 'Unet3'.*valid: Unet, UnetPlusPlus"):
        build_model(SMALL.model_copy(update=dict(arch="Unet3")), n_classes=3)


def test_unknown_encoder_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"model.encoder 'resnet7'.*resnet18"):
        build_model(SMALL.model_copy(update=dict(encoder="resnet7")), n_classes=3)


@pytest.mark.parametrize("arch", ["FPN", "Segformer"])
def test_decoder_channels_on_an_arch_without_them_is_refused(arch: str) -> None:
    # smp would pass them on to the encoder, which ignores them without a word.
    with pytest.raises(UserError, match=rf"decoder_channels is not a setting of model.arch '{arch}'"):
        build_model(SMALL.model_copy(update=dict(arch=arch)), n_classes=3)


def test_decoder_channels_on_an_arch_with_one_decoder_width_is_refused() -> None:
    # UPerNet's decoder_channels is an int: smp would fail on the list with a TypeError traceback.
    with pytest.raises(UserError, match=r"model.arch 'UPerNet' takes a single decoder width"):
        build_model(SMALL.model_copy(update=dict(arch="UPerNet")), n_classes=3)


@pytest.mark.parametrize("arch", ["Segformer", "upernet"])  # smp's names, in any case
def test_segformer_and_upernet_output_one_logit_map_per_class(arch: str) -> None:
    model = build_model(SMALL.model_copy(update=dict(arch=arch, decoder_channels=None)), n_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_timm_encoder_by_tu_name() -> None:
    model = build_model(SMALL.model_copy(update=dict(encoder="tu-resnet18")), n_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("encoder", "message"),
    [("tu-nonexistent_model", r"not a timm model$"), ("tu-resnet181", r"did you mean tu-resnet18\b")],
)
def test_unknown_timm_encoder_is_a_user_error(encoder: str, message: str) -> None:
    with pytest.raises(UserError, match=rf"params: model.encoder '{encoder}' .*{message}"):
        build_model(SMALL.model_copy(update=dict(encoder=encoder)), n_classes=3)


def test_parameter_groups_put_each_parameter_in_one_group() -> None:
    model = build_model(SMALL, n_classes=3)
    groups = parameter_groups(model, lr=1e-3, encoder_lr=1e-4, weight_decay=0.01)
    assert [g["name"] for g in groups] == [
        "encoder/decay",
        "encoder/no_decay",
        "decoder/decay",
        "decoder/no_decay",
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none left out
    encoder = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        assert group["lr"] == (1e-4 if group["name"].startswith("encoder/") else 1e-3)
        assert all((id(p) in encoder) == group["name"].startswith("encoder/") for p in group["params"])
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.01) for p in group["params"])
        assert group["weight_decay"] in (0.0, 0.01)
    torch.optim.AdamW(groups)  # the format AdamW takes, "name" included


def test_parameter_groups_without_encoder_lr_and_empty_groups() -> None:
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 4, bias=False))  # no 1-d parameters: no no_decay group
    model.add_module("head", torch.nn.Conv2d(4, 2, 1))
    groups = parameter_groups(model, lr=1e-3, encoder_lr=None, weight_decay=0.1)
    assert [(g["name"], len(g["params"]), g["lr"]) for g in groups] == [
        ("encoder/decay", 1, 1e-3),
        ("decoder/decay", 1, 1e-3),
        ("decoder/no_decay", 1, 1e-3),
    ]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_are_loaded(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    donor = build_model(SMALL, n_classes=3).encoder.state_dict()
    # An ImageNet classifier file also holds the head; smp's encoder drops it.
    donor_file = {**donor, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in donor_file.items()}, path)
    else:
        torch.save(donor_file, path)

    torch.manual_seed(2)
    model = build_model(SMALL.model_copy(update=dict(encoder_weights=str(path))), n_classes=3)
    loaded = model.encoder.state_dict()
    assert loaded.keys() == donor.keys()
    for key, tensor in donor.items():
        assert torch.equal(loaded[key], tensor), key
    assert not torch.equal(donor["conv1.weight"], build_model(SMALL, n_classes=3).encoder.conv1.weight)


def test_missing_encoder_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=r"nope.pth: encoder weights file not found"):
        build_model(SMALL.model_copy(update=dict(encoder_weights=str(missing))), n_classes=3)


def test_encoder_weights_for_another_encoder_are_refused(tmp_path: Path) -> None:
    other = build_model(SMALL.model_copy(update=dict(encoder="resnet34")), n_classes=3).encoder.state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save(other, path)
    with pytest.raises(UserError, match=r"resnet34.pth: weights do not match: .*unexpected.*resnet18"):
        build_model(SMALL.model_copy(update=dict(encoder_weights=str(path))), n_classes=3)


def test_checkpoint_round_trip_rebuilds_from_its_own_params(tmp_path: Path) -> None:
    model = build_model(SMALL, n_classes=4).eval()
    state = checkpoint_state(model, SMALL, ["background", "a", "b", "c"], AUG64, epoch=3, score=0.5, fold=1)
    path = tmp_path / "fold1" / "best.pt"
    save_checkpoint(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temporary file left behind

    ckpt = load_checkpoint(path)
    assert (ckpt["epoch"], ckpt["score"], ckpt["fold"], ckpt["geometry"]["size"]) == (3, 0.5, 1, 64)
    rebuilt = model_from_checkpoint(ckpt)
    assert not rebuilt.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_model_from_checkpoint_strips_ddp_and_compile_prefixes() -> None:
    model = build_model(SMALL, n_classes=2)
    state = checkpoint_state(model, SMALL, ["background", "a"], AUG64, epoch=0, score=0.0, fold=0)
    state["model_state"] = {f"module._orig_mod.{k}": v for k, v in state["model_state"].items()}
    rebuilt = model_from_checkpoint(state)
    assert torch.equal(rebuilt.encoder.conv1.weight, model.encoder.conv1.weight)
    compiled = checkpoint_state(torch.compile(model), SMALL, ["background", "a"], AUG64, 0, 0.0, 0)
    assert compiled["smp_config"] == state["smp_config"]  # smp's config of the model inside
    assert strip_wrapper_prefixes({"module.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_checkpoint_without_smp_config_rebuilds_from_its_model_params() -> None:
    # Checkpoints written before smp's config was recorded in them.
    model = build_model(SMALL, n_classes=2).eval()
    state = checkpoint_state(model, SMALL, ["background", "a"], AUG64, epoch=0, score=0.0, fold=0)
    del state["smp_config"]
    rebuilt = model_from_checkpoint(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


UNET3PLUS = ModelParams(
    arch="UNet3Plus",
    encoder="resnet18",
    encoder_weights=None,
    options={"encoder_depth": 4, "cat_channels": 8, "deep_supervision": True, "cgm": True, "cgm_gate": True},
)


def test_unet3plus_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model(UNET3PLUS, n_classes=4).eval()
    with torch.no_grad():  # a presence head that finds class 2 absent, so the eval gate takes part
        model.presence_head[1].bias.copy_(torch.tensor([1.0, 1.0, -50.0, 1.0]))
    state = checkpoint_state(model, UNET3PLUS, ["background", "a", "b", "c"], AUG64, 0, 0.0, 0)
    assert state["smp_config"]["_model_class"] == "UNet3Plus"
    save_checkpoint(tmp_path / "best.pt", state)
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    assert isinstance(rebuilt, architectures.UNet3Plus) and not rebuilt.training
    assert (rebuilt.n_side_outputs, rebuilt.cgm_gate) == (3, True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = rebuilt(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert (out[:, 2] == architectures.ABSENT_LOGIT).all()


def test_smp_unetplusplus_config_rebuilds_as_ours() -> None:
    # Checkpoints written before trashseg had its own UnetPlusPlus record smp's config of smp's class.
    torch.manual_seed(0)
    theirs = smp.UnetPlusPlus("resnet18", encoder_weights=None, classes=3, decoder_channels=[16] * 5).eval()
    rebuilt = model_from_smp_config(smp_config(theirs), n_classes=3, where="best.pt")
    assert type(rebuilt) is architectures.UnetPlusPlus and rebuilt.n_side_outputs == 0
    rebuilt.load_state_dict(theirs.state_dict())  # strict
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), theirs(x))


def test_saved_unet3plus_loads_with_another_class_count(tmp_path: Path) -> None:
    donor = build_model(UNET3PLUS, n_classes=3)
    donor.save_pretrained(tmp_path / "saved")
    model = build_model(ModelParams(from_pretrained=str(tmp_path / "saved")), n_classes=5)
    assert isinstance(model, architectures.UNet3Plus) and model.n_side_outputs == 3
    loaded, saved = model.state_dict(), donor.state_dict()
    fresh = {key for key in saved if loaded[key].shape != saved[key].shape}
    # Every head to the classes keeps its fresh init; everything else is the saved model's.
    assert fresh and all(
        key.startswith(("segmentation_head.", "side_heads.", "presence_head.")) for key in fresh
    )
    assert all(torch.equal(loaded[key], saved[key]) for key in saved if key not in fresh)


class _RunsCode:
    """Unpickling this calls `Path.touch(marker)`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_load_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match=r"evil.pt: refused: the checkpoint holds a pickled Python object"):
        load_checkpoint(path)
    assert not marker.exists()


class _CallsSystem:
    """Unpickling this would call os.system: torch words its refusal differently from other globals."""

    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def test_load_checkpoint_refuses_a_system_call_by_name(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _CallsSystem()}, path)
    with pytest.raises(UserError, match=r"evil.pt: refused: .* pickled Python object \(posix.system\)"):
        load_checkpoint(path)


def test_a_hub_encoder_in_a_checkpoint_is_refused_rather_than_fetched() -> None:
    config = {"_model_class": "Unet", "encoder_name": "tu-hf-hub:timm/resnet18.a1_in1k", "in_channels": 3}
    with pytest.raises(UserError, match=r"best\.pt: encoder tu-hf-hub:timm/resnet18\.a1_in1k is fetched"):
        model_from_smp_config(config, 3, "best.pt")


def _saved_checkpoint(path: Path) -> bytes:
    state = checkpoint_state(build_model(SMALL, n_classes=3), SMALL, ["bg", "a", "b"], AUG64, 0, 0.0, 0)
    save_checkpoint(path, state)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["zeroed pages", "cut", "garbage after the header"])
def test_load_checkpoint_finds_damage_torch_load_would_miss(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "last.pt"
    good = _saved_checkpoint(path)
    if damage == "zeroed pages":  # what a power cut leaves: 64 KiB of zeros inside a tensor's data
        middle = len(good) // 2
        path.write_bytes(good[:middle] + bytes(65536) + good[middle + 65536 :])
    elif damage == "cut":
        path.write_bytes(good[: len(good) // 3])
    else:
        path.write_bytes(good[:64] + os.urandom(4096))
    with pytest.raises(UserError, match=r"last.pt: damaged") as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)


def test_zeroed_pages_would_load_silently_without_the_check(tmp_path: Path) -> None:
    # Why the CRC check exists: torch.load itself reads the damaged file without a word.
    path = tmp_path / "last.pt"
    good = _saved_checkpoint(path)
    middle = len(good) // 2
    path.write_bytes(good[:middle] + bytes(65536) + good[middle + 65536 :])
    torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "checkpoint not found"),
        (b"", "damaged or not a torch checkpoint"),
        (b"not a zip file at all", "damaged or not a torch checkpoint"),
        (b"PK\x05\x06" + bytes(18), "not a torch checkpoint"),  # an empty zip: whole, no torch file in it
    ],
)
def test_load_checkpoint_bad_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=rf"bad.pt: {message}"):
        load_checkpoint(path)


def test_checkpoint_from_another_model_is_a_user_error() -> None:
    state = checkpoint_state(build_model(SMALL, n_classes=3), SMALL, ["bg", "a", "b"], AUG64, 0, 0.0, 0)
    state["classes"] = ["bg", "a"]  # the head now has one channel too many for the class list
    with pytest.raises(UserError, match=r"best.pt: weights do not match: 'segmentation_head.0.weight'"):
        model_from_checkpoint(state, source="best.pt")


def test_the_same_checkpoint_state_writes_the_same_bytes(tmp_path: Path) -> None:
    # DVC hashes checkpoints: an identical re-run (or a parallel one) must record the same md5.
    state = {"model_state": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
    save_checkpoint(tmp_path / "a.pt", state)
    save_checkpoint(tmp_path / "b.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(load_checkpoint(tmp_path / "b.pt")["model_state"]["w"], state["model_state"]["w"])
