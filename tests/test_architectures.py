"""Tests for pipeline.models.architectures (U-Net 3+, U-Net++ with deep supervision) and registry entries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from pipeline.config import ModelParams
from pipeline.errors import UserError
from pipeline.models.architectures import ABSENT_LOGIT, UNet3Plus, UnetPlusPlus, gate_absent_classes
from pipeline.models.factory import build_model, check_model_params

ROOT = Path(__file__).resolve().parents[1]
N, C, SIZE = 2, 3, 64  # batch, classes, input size: tiny, so the whole file runs in seconds
UNET3PLUS = ModelParams(arch="UNet3Plus", encoder="resnet18", encoder_weights=None)


def unet3plus(depth: int = 4, **options: bool | int) -> UNet3Plus:
    torch.manual_seed(0)
    return UNet3Plus("resnet18", encoder_depth=depth, classes=C, cat_channels=16, **options)


def batch() -> torch.Tensor:
    return torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("depth", [4, 5])
def test_unet3plus_outputs_in_eval_and_train_mode(depth: int) -> None:
    x = batch()
    model = unet3plus(depth, deep_supervision=True, cgm=True)
    assert (
        model.n_side_outputs == depth - 1
    )  # every decoder map but the main one, and the deepest encoder map
    out = model.train()(x)
    assert set(out) == {"logits", "side", "presence"}
    assert out["logits"].shape == (N, C, SIZE, SIZE)
    assert [tuple(side.shape) for side in out["side"]] == [(N, C, SIZE, SIZE)] * (depth - 1)
    assert out["presence"].shape == (N, C)
    with torch.no_grad():
        assert model.eval()(x).shape == (N, C, SIZE, SIZE)  # eval: the logits tensor alone

    plain = unet3plus(depth)
    assert plain.n_side_outputs == 0
    assert plain.train()(x).shape == (N, C, SIZE, SIZE)  # neither option: a tensor in train mode too
    cgm_only = unet3plus(depth, cgm=True).train()(x)
    assert cgm_only["side"] == [] and cgm_only["presence"].shape == (N, C)
    assert set(unet3plus(depth, deep_supervision=True).train()(x)) == {"logits", "side"}


def test_unet3plus_at_encoder_depth_3_and_input_size_check() -> None:
    model = unet3plus(3, deep_supervision=True).train()
    out = model(torch.randn(N, 3, 40, 40))  # divisible by 2**3, not by 2**5
    assert out["logits"].shape == (N, C, 40, 40) and len(out["side"]) == model.n_side_outputs == 2
    with pytest.raises(RuntimeError, match=r"divisible by 8"):  # smp's check_input_shape
        model(torch.randn(N, 3, 36, 36))


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = unet3plus(4, deep_supervision=True, cgm=True).train()
    out = model(batch())
    target = torch.randint(0, C, (N, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    loss = sum(F.cross_entropy(logits, target) for logits in [out["logits"], *out["side"]])
    loss = loss + F.binary_cross_entropy_with_logits(out["presence"], torch.ones(N, C))
    loss.backward()
    unused = []
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad, name
        if parameter.grad is None:
            unused.append(name)
        else:
            assert torch.isfinite(parameter.grad).all(), name
    # At depth 4 smp's ResNet encoder keeps its deepest stage (so ImageNet weights load) but never runs it.
    assert unused and all(name.startswith("encoder.layer4.") for name in unused)


@pytest.mark.parametrize("depth", [4, 5])
def test_torch_compile_gives_the_eager_output(depth: int) -> None:
    """backend="aot_eager": CPU inductor took 30-50 s a compile here, this takes a few seconds; it still
    traces the whole model (dynamo graph capture and AOT autograd), gate included."""
    model = unet3plus(depth, deep_supervision=True, cgm=True, cgm_gate=True).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_cgm_gate_sets_absent_foreground_classes_in_eval_only() -> None:
    model = unet3plus(4, cgm=True, cgm_gate=True)
    conv = model.presence_head[1]
    with torch.no_grad():  # presence logits = the bias: background and class 2 "absent", class 1 present
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-5.0, 5.0, -5.0]))
    x = batch()
    with torch.no_grad():
        gated = model.eval()(x)
        model.cgm_gate = False
        ungated = model(x)
    assert (gated[:, 2] == ABSENT_LOGIT).all()
    torch.testing.assert_close(gated[:, :2], ungated[:, :2])  # background is never gated
    assert (ungated[:, 2] > ABSENT_LOGIT / 10).all()

    model.cgm_gate = True
    out = model.train()(x)  # training outputs are never gated: the presence head learns through BCE
    assert (out["logits"] > ABSENT_LOGIT / 10).all()
    torch.testing.assert_close(out["presence"], torch.tensor([[-5.0, 5.0, -5.0]] * N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cgm_gate_value_is_finite_in_half_precision(dtype: torch.dtype) -> None:
    logits = torch.zeros(1, 3, 2, 2, dtype=dtype)
    gated = gate_absent_classes(logits, torch.tensor([[-1.0, -1.0, 1.0]], dtype=dtype))
    assert torch.isfinite(gated).all() and (gated[:, 1] < -9000).all()
    assert (gated[:, [0, 2]] == 0).all()


def test_cgm_gate_needs_cgm() -> None:
    with pytest.raises(UserError, match=r"rejects these settings \(cgm_gate needs cgm"):
        build_model(UNET3PLUS.model_copy(update=dict(options={"cgm_gate": True})), n_classes=C)


def _unetplusplus_pair(depth: int = 5) -> tuple[smp.UnetPlusPlus, UnetPlusPlus]:
    init = {"encoder_name": "resnet18", "encoder_depth": depth, "encoder_weights": None, "classes": C}
    init["decoder_channels"] = [16, 16, 8, 8, 8][:depth]
    torch.manual_seed(0)
    theirs = smp.UnetPlusPlus(**init)
    ours = UnetPlusPlus(**init, deep_supervision=True)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert unexpected == [] and all(key.startswith("side_heads.") for key in missing)
    return theirs, ours


def test_unetplusplus_without_deep_supervision_has_smp_weights() -> None:
    theirs, _ = _unetplusplus_pair()
    ours = UnetPlusPlus("resnet18", encoder_weights=None, classes=C, decoder_channels=[16, 16, 8, 8, 8])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict: old checkpoints load
    assert ours.n_side_outputs == 0
    x = batch()
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))


def test_unetplusplus_deep_supervision_matches_smp() -> None:
    theirs, ours = _unetplusplus_pair()
    assert ours.n_side_outputs == 3
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    # smp's x_{d}_3 (d = 3, 2, 1) are the paper's X^{0,1}, X^{0,2}, X^{0,3}: capture them in smp's decoder.
    nodes = {}
    for d in (3, 2, 1):
        theirs.decoder.blocks[f"x_{d}_3"].register_forward_hook(
            lambda _m, _i, output, d=d: nodes.__setitem__(d, output)
        )
    expected = theirs.train()(x)
    out = ours.train()(x)
    assert set(out) == {"logits", "side"}
    torch.testing.assert_close(out["logits"], expected)
    assert len(out["side"]) == 3
    for head, side, d in zip(ours.side_heads, out["side"], (3, 2, 1), strict=True):
        assert side.shape == (N, C, SIZE, SIZE)
        upsampled = F.interpolate(head(nodes[d]), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        torch.testing.assert_close(side, upsampled)


def test_unetplusplus_side_outputs_at_depth_3() -> None:
    _, ours = _unetplusplus_pair(depth=3)
    out = ours.train()(batch())
    assert ours.n_side_outputs == 1 and [s.shape for s in out["side"]] == [(N, C, SIZE, SIZE)]


def test_unknown_arch_names_unet3plus_among_the_valid() -> None:
    with pytest.raises(
        UserError, match=r"model.arch 'UNet4Plus' is not an architecture .*UnetPlusPlus.*UNet3Plus"
    ):
        build_model(UNET3PLUS.model_copy(update=dict(arch="UNet4Plus")), n_classes=C)


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        (
            "UNet3Plus",
            {"deep_supervison": True},
            r"params: model.options.deep_supervison is not a setting of model.arch 'UNet3Plus' "
            r"\(its settings: encoder_depth, cat_channels, deep_supervision, cgm, cgm_gate\)$",
        ),
        # smp would hand an unknown keyword to the encoder, which drops it without a word.
        (
            "Unet",
            {"deep_supervision": True},
            r"model.options.deep_supervision is not a setting of model.arch 'Unet'",
        ),
        ("unetplusplus", {"classes": 4}, r"model.options.classes is set by trashseg \(the class count"),
        (
            "UNet3Plus",
            {"encoder_name": "resnet34"},
            r"model.options.encoder_name is set by trashseg \(it is model.",
        ),
        ("Unet", {"activation": "sigmoid"}, r"model.options.activation is set by trashseg"),
        (
            "UNet3Plus",
            {"cat_channels": 0},
            r"UNet3Plus/resnet18 rejects these settings \(cat_channels must be",
        ),
    ],
)
def test_bad_options_are_one_line_user_errors(arch: str, options: dict, message: str) -> None:
    params = UNET3PLUS.model_copy(update=dict(arch=arch, options=options))
    for check in (lambda: build_model(params, n_classes=C), lambda: check_model_params(params)):
        with pytest.raises(UserError, match=message) as caught:
            check()
        assert "\n" not in str(caught.value)


def test_options_reach_the_model() -> None:
    options = {"encoder_depth": 4, "cat_channels": 8, "deep_supervision": True, "cgm": True, "cgm_gate": True}
    model = build_model(UNET3PLUS.model_copy(update=dict(options=options)), n_classes=C)
    assert isinstance(model, UNet3Plus) and model.n_side_outputs == 3 and model.cgm_gate
    assert model.decoder.out_channels[0] == 8 * 4
    ours = build_model(
        UNET3PLUS.model_copy(update=dict(arch="UnetPlusPlus", options={"deep_supervision": True})),
        n_classes=C,
    )
    assert isinstance(ours, UnetPlusPlus) and ours.n_side_outputs == 3


def test_unet3plus_takes_timm_encoders_and_local_encoder_weights(tmp_path: Path) -> None:
    """Encoders come through smp as for every other architecture: `tu-` names, and a local state dict."""
    small = {"cat_channels": 8}
    timm_model = build_model(UNET3PLUS.model_copy(update=dict(encoder="tu-resnet10t", options=small)), C)
    assert timm_model.eval()(batch()).shape == (N, C, SIZE, SIZE)
    torch.manual_seed(3)
    weights = smp.encoders.get_encoder("resnet18", weights=None).state_dict()
    torch.save(weights, tmp_path / "resnet18.pth")
    local = UNET3PLUS.model_copy(update=dict(encoder_weights=str(tmp_path / "resnet18.pth"), options=small))
    loaded = build_model(local, C).encoder.state_dict()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)


def test_options_with_from_pretrained_are_refused(tmp_path: Path) -> None:
    params = ModelParams(from_pretrained=str(tmp_path), options={"deep_supervision": True})
    for check in (lambda: build_model(params, n_classes=C), lambda: check_model_params(params)):
        with pytest.raises(
            UserError, match=r"params: model.options does not apply with model.from_pretrained"
        ):
            check()


@pytest.mark.bench
def test_benchmark_runs_at_toy_size() -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--size", "64", "--batch-size", "1", "--repeats", "1", "--encoder", "resnet18", "--threads", "1"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "architectures.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"UNet3Plus / Unet forward\+backward: [\d.]+x", run.stdout), run.stdout
