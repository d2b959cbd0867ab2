"""Tests for pipeline.inference.infer and the predict stage: probability averaging, TTA, member merging,
sizes, streaming, checkpoints."""

from __future__ import annotations

import inspect
import json
import os
import runpy
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import ttach
import yaml
from conftest import TINY_MODEL, write_params
from PIL import Image
from torch import nn

from pipeline.config import AugmentParams
from pipeline.data.geometry import Geometry
from pipeline.data.loaders import ImageDataset
from pipeline.data.manifest import ImageSet, Manifest, write_manifest
from pipeline.data.records import ImageRecord
from pipeline.ensemble.decision import LabelDecision
from pipeline.errors import UserError
from pipeline.evaluation.submission import iter_submission
from pipeline.inference import infer
from pipeline.models.checkpoints import checkpoint_state, save_checkpoint
from pipeline.models.factory import build_model

CPU = torch.device("cpu")
STAGES = Path(__file__).resolve().parents[1] / "stages"
AUG64 = AugmentParams(size=64)


class ConstantLogits(nn.Module):
    """Returns the same logit vector at every pixel, whatever the image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.logits[None, :, None, None].expand(n, -1, h, w).clone()


class RampLogits(nn.Module):
    """Logits that depend on pixel position (not flip-equivariant): class 1 grows left to right, 2 down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = torch.linspace(-3, 3, w).expand(h, w)
        rows = torch.linspace(-2, 4, h)[:, None].expand(h, w)
        return torch.stack([torch.zeros(h, w), cols, rows])[None].expand(n, -1, -1, -1) + x[:, :1]


class ChannelLogits(nn.Module):
    """Pointwise, hence flip- and rotation-equivariant: class c's logit is 4 * (input channel c)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        return 4 * x


def _ensemble(
    models: list[nn.Module], weights: list[float], images: torch.Tensor, tta: str, scales: tuple = (1.0,)
) -> torch.Tensor:
    members = [ttach.SegmentationTTAWrapper(infer.SoftmaxOutput(m), infer.build_tta(tta)) for m in models]
    return infer.ensemble_probabilities(members, weights, images, list(scales))


def _write_images(root: Path, sizes: list[tuple[int, int]]) -> list[ImageRecord]:
    """RGB images with a red left half and a blue right half, one per (height, width)."""
    records = []
    for i, (h, w) in enumerate(sizes):
        image = np.zeros((h, w, 3), np.uint8)
        image[:, : w // 2, 0] = 255
        image[:, w // 2 :, 2] = 255
        name = f"img/{i:03d}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
        records.append(ImageRecord(id=i, file_name=name, height=h, width=w))
    return records


def test_folds_average_softmaxes_not_logits() -> None:
    a, b = [4.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    images = torch.zeros(2, 3, 32, 32)
    got = _ensemble([ConstantLogits(a), ConstantLogits(b)], [0.5, 0.5], images, "none")
    expected = (torch.tensor(a).softmax(0) + torch.tensor(b).softmax(0)) / 2
    of_mean_logits = ((torch.tensor(a) + torch.tensor(b)) / 2).softmax(0)
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got[1, :, 5, 7], expected)
    assert not torch.allclose(got[1, :, 5, 7], of_mean_logits, atol=1e-3)


def test_tta_averages_softmaxes_of_deaugmented_outputs() -> None:
    model = RampLogits()
    images = torch.randn(1, 3, 32, 64)
    got = _ensemble([model], [1.0], images, "flips")
    softmaxes, logits = [], []
    for dims in ([], [3], [2], [2, 3]):  # identity, hflip, vflip, both
        out = model(images.flip(dims) if dims else images)
        out = out.flip(dims) if dims else out
        logits.append(out)
        softmaxes.append(out.softmax(1))
    torch.testing.assert_close(got, torch.stack(softmaxes).mean(0))
    assert not torch.allclose(got, torch.stack(logits).mean(0).softmax(1), atol=1e-3)


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_on_an_equivariant_model_changes_nothing(tta: str) -> None:
    images = torch.randn(2, 3, 32, 32)
    plain = _ensemble([ChannelLogits()], [1.0], images, "none")
    model = ChannelLogits()
    augmented = _ensemble([model], [1.0], images, tta)
    assert model.calls == len(infer.build_tta(tta))  # it really ran 4 or 8 passes
    torch.testing.assert_close(augmented, plain)


def test_a_member_s_fold_models_are_averaged_equally(tmp_path: Path) -> None:
    logits = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]
    dataset = ImageDataset(tmp_path, _write_images(tmp_path, [(32, 32)]), Geometry("squash", 32))
    models = [ConstantLogits(row) for row in logits]
    ((_, probs),) = infer.predict_probabilities(models, None, dataset, "none", [1.0], 1, 0, CPU)
    expected = torch.stack([torch.tensor(row).softmax(0) for row in logits]).mean(0)
    torch.testing.assert_close(probs[:, 3, 5], expected)


def _member(name: str, logits: list[list[float]], size: int) -> infer.Member:
    models = [ConstantLogits(row) for row in logits]
    augment = AugmentParams(size=size).model_dump()
    folds = infer.Ensemble(
        models, ["background", "can", "bottle"], Geometry("squash", size), [augment] * len(models)
    )
    return infer.Member(name, folds, "none")


def test_predict_members_merges_members_of_different_geometry_with_per_class_weights(tmp_path: Path) -> None:
    small = _member("small", [[1.0, 0.0, 2.0]], 32)
    big = _member("big", [[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]], 64)
    weights = torch.tensor([[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])  # (M, C)
    images = _write_images(tmp_path, [(40, 72), (64, 64), (50, 30)])
    out = list(infer.predict_members([small, big], weights, tmp_path, images, [1.0], 2, 0, CPU))
    assert [index for index, _ in out] == [0, 1, 2]
    p_small = torch.tensor([1.0, 0.0, 2.0]).softmax(0)
    p_big = (torch.tensor([0.0, 2.0, 0.0]).softmax(0) + torch.tensor([3.0, 0.0, 0.0]).softmax(0)) / 2
    expected = weights[0] * p_small + weights[1] * p_big
    for _, probs in out:
        assert probs.shape == (3, 64, 64)  # the larger member's inference shape
        torch.testing.assert_close(probs[:, 0, 0], expected)
        torch.testing.assert_close(probs[:, 63, 17], expected)


def test_unknown_tta_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="none, hflip, vflip, flips, d4"):
        infer.build_tta("rot")


@pytest.mark.parametrize(
    ("trained", "expected"),
    [
        ({"hflip": 0.5, "vflip": 0.0, "rot90": 0.0}, "hflip"),
        ({"hflip": 0.5, "vflip": 0.5, "rot90": 0.0}, "flips"),
        ({"hflip": 0.5, "vflip": 0.0, "rot90": 0.5}, "d4"),
        ({"hflip": 0.0, "vflip": 0.5, "rot90": 0.0}, "vflip"),
        ({"hflip": 0.0, "vflip": 0.0, "rot90": 0.5}, "none"),
    ],
)
def test_auto_tta_is_what_training_used(trained: dict, expected: str) -> None:
    assert infer.resolve_tta("auto", [trained]) == expected


def test_auto_tta_takes_what_every_model_was_trained_with() -> None:
    both = {"hflip": 0.5, "vflip": 0.5, "rot90": 0.0}
    horizontal = {"hflip": 0.5, "vflip": 0.0, "rot90": 0.0}
    assert infer.resolve_tta("auto", [both, both]) == "flips"
    assert infer.resolve_tta("auto", [both, horizontal]) == "hflip"


def test_tta_the_model_never_trained_with_is_refused_naming_both_keys() -> None:
    horizontal = {"hflip": 0.5, "vflip": 0.0, "rot90": 0.0}
    assert infer.resolve_tta("hflip", [horizontal]) == "hflip"
    assert infer.resolve_tta("none", [horizontal]) == "none"
    with pytest.raises(UserError, match=r"predict.tta 'flips' .* augment.vflip = 0.0"):
        infer.resolve_tta("flips", [horizontal])
    with pytest.raises(UserError, match=r"predict.tta 'd4' .* augment.rot90 = 0.0"):
        infer.resolve_tta("d4", [horizontal])


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [(512, 0.75, 384), (512, 1.25, 640), (256, 0.1, 32), (96, 0.5, 64), (100, 1.0, 96)],
)
def test_scaled_size_is_the_nearest_multiple_of_32(size: int, scale: float, expected: int) -> None:
    assert infer.scaled_size(size, scale) == expected


def test_multiscale_feeds_multiples_of_32_and_returns_the_input_size() -> None:
    model = ChannelLogits()
    images = torch.randn(2, 3, 64, 64)
    probs = _ensemble([model], [1.0], images, "none", scales=[0.7, 1.0, 1.6])
    assert [s[-2:] for s in model.shapes] == [(32, 32), (64, 64), (96, 96)]
    assert probs.shape == (2, 3, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 64))  # still a probability per pixel


def _masks(
    models: list[torch.nn.Module], dataset: ImageDataset, out_size: int | None, tta: str, batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 mask at `out_size` or the image's own size) per image: what the predict stage writes."""
    for index, probs in infer.predict_probabilities(models, None, dataset, tta, [1.0], batch_size, 0, CPU):
        yield index, infer.probabilities_to_mask(probs, infer.output_shape(dataset.images[index], out_size))


@pytest.mark.parametrize("out_size", [48, None])
def test_predicted_masks_have_the_output_sizes(tmp_path: Path, out_size: int | None) -> None:
    sizes = [(40, 72), (96, 64), (33, 33)]  # native sizes, non-square
    records = _write_images(tmp_path, sizes)
    dataset = ImageDataset(tmp_path, records, Geometry("squash", 32))
    out = list(_masks([ChannelLogits()], dataset, out_size, "flips", 2))
    assert [index for index, _ in out] == [0, 1, 2]
    for (_, mask), (h, w) in zip(out, sizes, strict=True):
        expected_h, expected_w = (out_size, out_size) if out_size else (h, w)
        assert mask.dtype == np.uint8
        assert mask.shape == (expected_h, expected_w)
        # red left half -> class 0, blue right half -> class 2, wherever the output grid is
        assert (mask[:, : expected_w // 3] == 0).all()
        assert (mask[:, -expected_w // 3 :] == 2).all()


def test_prediction_is_a_generator_that_runs_one_batch_at_a_time(tmp_path: Path) -> None:
    dataset = ImageDataset(tmp_path, _write_images(tmp_path, [(32, 32)] * 8), Geometry("squash", 32))
    model = ChannelLogits()
    stream = _masks([model], dataset, None, "none", 2)
    assert model.calls == 0
    next(stream)
    assert model.calls == 1
    assert not torch.is_inference_mode_enabled()  # the suspended generator must not leak its context
    next(stream)
    assert model.calls == 1  # the second image came from the same batch
    next(stream)
    assert model.calls == 2


def test_load_ensemble_rebuilds_models_and_checks_classes(tmp_path: Path) -> None:
    params = TINY_MODEL
    classes = ["background", "can", "bottle"]
    torch.manual_seed(0)
    model = build_model(params, len(classes)).eval()
    for fold in (0, 1):
        save_checkpoint(
            tmp_path / f"f{fold}.pt", checkpoint_state(model, params, classes, AUG64, 1, 0.5, fold)
        )
    ensemble = infer.load_ensemble([tmp_path / "f0.pt", tmp_path / "f1.pt"])
    models = ensemble.models
    assert (ensemble.classes, ensemble.geometry, len(models)) == (classes, Geometry("squash", 64), 2)
    assert ensemble.augments == [AUG64.model_dump()] * 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), model(x))

    other = checkpoint_state(build_model(params, 3), params, ["background", "can", "paper"], AUG64, 1, 0.5, 2)
    save_checkpoint(tmp_path / "f2.pt", other)
    with pytest.raises(UserError, match=r"f2\.pt: classes .* differ"):
        infer.load_ensemble([tmp_path / "f0.pt", tmp_path / "f2.pt"])


# Predicts `n` 64 px images with a pointwise model, resizing probabilities to 256 px, and prints the RSS
# before predicting and the process's peak RSS. Keeping every batch's probabilities would cost
# 11 classes x 256 x 256 x 4 bytes = 2.9 MB per image, so 24 extra images would add ~70 MB to the peak.
# A low mmap threshold makes glibc hand large freed blocks back at once, so RSS follows live memory
# instead of heap fragmentation (which otherwise adds +-8 MB of noise to these peaks).
_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "NO_ALBUMENTATIONS_UPDATE": "1"}
_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np, psutil, torch
    from PIL import Image
    from pipeline.inference import infer
    from pipeline.data.records import ImageRecord
    from pipeline.data.loaders import ImageDataset
    from pipeline.data.geometry import Geometry

    root, n = Path(sys.argv[1]), int(sys.argv[2])
    records = [ImageRecord(i, f"{i % 8}.png", 64, 64) for i in range(n)]
    model = torch.nn.Conv2d(3, 11, 1)
    dataset = ImageDataset(root, records, Geometry("squash", 64))
    before = psutil.Process().memory_info().rss
    stream = infer.predict_probabilities([model], None, dataset, "flips", [1.0], 4, 0, torch.device("cpu"))
    for index, probs in stream:
        infer.probabilities_to_mask(probs, infer.output_shape(records[index], 256))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"before": before, "peak": peak}))
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    growth = {}
    for n in (8, 32):
        run = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(n)],
            env={**os.environ, **_PROBE_ENV},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        rss = json.loads(run.stdout)
        growth[n] = rss["peak"] - rss["before"]
    mb = 2**20
    assert growth[32] < 1.3 * growth[8], {n: f"{g / mb:.1f} MB" for n, g in growth.items()}
    assert growth[32] - growth[8] < 10 * mb


CLASSES = ["background", "can", "bottle"]
MEMBERS = {  # trained with both flips, so the stage may run flips TTA; one squashes, one crops
    "unet": AugmentParams(size=32, vflip=0.5),
    "crop": AugmentParams(size=32, vflip=0.5, resize="crop"),
}


def _stage_project(
    tmp_path: Path, weights: list[list[float]], tta: str = "flips", decision: dict | None = None
) -> list[ImageRecord]:
    """Two members of two fold checkpoints each, the ensemble's weights, the manifest of a 3-image
    test set and params.yaml (predict.tta = `tta`), laid out as dvc.yaml does. Returns the test images."""
    torch.manual_seed(0)
    for name, augment in MEMBERS.items():
        for fold in (0, 1):
            model = build_model(TINY_MODEL, len(CLASSES))
            state = checkpoint_state(model, TINY_MODEL, CLASSES, augment, 1, 0.5, fold)
            save_checkpoint(tmp_path / f"models/{name}/fold{fold}/best.pt", state)
    fitted = {"members": list(MEMBERS), "folds": [0, 1], "classes": CLASSES, "weights": weights}
    fitted["decision"] = decision or {"class_scales": None, "postprocess": {}}
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble/weights.json").write_text(json.dumps(fitted))
    records = _write_images(tmp_path / "data", [(40, 72), (64, 64), (50, 30)])
    manifest = Manifest(CLASSES, [1, 2], [], np.zeros((0, 3), dtype=bool), records, {"used": 0})
    write_manifest(tmp_path / "data/manifest.json", manifest)
    config = {
        "split": {"n_splits": 2},
        "ensemble": {"folds": [0, 1]},
        "predict": {"tta": tta, "batch_size": 2, "num_workers": 0},
        "submission": {"format": "rle", "size": None},
    }
    write_params(tmp_path / "params.yaml", config)
    return records


def _run_predict(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run stages/predict.py as its command line would, but in this process (torch is imported once)."""
    args = ["--models", "models", "--weights", "ensemble/weights.json", "--root", "data"]
    args += ["--manifest", "data/manifest.json", "--out", "sub/s.csv", "--probabilities", "sub/test.npz"]
    args += ["--refits", "refits"]
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["predict.py", *args])
    runpy.run_path(str(STAGES / "predict.py"), run_name="__main__")


def _last_error(capsys: pytest.CaptureFixture[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run_predict(cwd, monkeypatch)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_predict_stage_writes_a_valid_submission_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stage_project(tmp_path, [[0.5] * 3, [0.5] * 3], tta="hflip")
    _run_predict(tmp_path, monkeypatch)
    lines = (tmp_path / "sub/s.csv").read_text().splitlines()
    assert lines[0] == "image_id,class_id,EncodedPixels"
    assert len(lines) == 1 + 3 * 2  # one row per image and non-background class

    (tmp_path / "sub/s.csv").unlink()
    (tmp_path / "models/crop/fold1/best.pt").unlink()
    last = _last_error(capsys, tmp_path, monkeypatch)
    assert last.startswith("error: models/crop/fold1/best.pt: checkpoint of ensemble member 'crop' not found")
    assert not (tmp_path / "sub/s.csv").exists()


def test_predict_stage_follows_the_fitted_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # All weight on `crop`: the submission is what that member's two folds predict alone.
    records = _stage_project(tmp_path, [[0.0] * 3, [1.0] * 3], tta="none")
    _run_predict(tmp_path, monkeypatch)
    written = dict(iter_submission(tmp_path / "sub/s.csv", ImageSet(records, 3), None))
    folds = infer.load_ensemble([tmp_path / f"models/crop/fold{k}/best.pt" for k in (0, 1)])
    dataset = ImageDataset(tmp_path / "data", records, folds.geometry)
    alone = _masks(folds.models, dataset, None, "none", 2)
    for index, mask in alone:
        np.testing.assert_array_equal(written[records[index].file_name], mask)


def test_predict_stage_labels_by_the_fitted_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Class 1 scaled up 8 times, then class 2's components of at most 2 % of an image removed.
    raw = {
        "class_scales": dict(zip(CLASSES, [1.0, 8.0, 1.0], strict=True)),
        "postprocess": {CLASSES[2]: {"max_fraction": 0.02, "largest_only": False}},
    }
    records = _stage_project(tmp_path, [[0.5] * 3, [0.5] * 3], tta="none", decision=raw)
    real, merged = infer.predict_members, {}

    def spy(*args, **kwargs):
        for index, probs in real(*args, **kwargs):
            merged[index] = probs.clone()
            yield index, probs

    monkeypatch.setattr(infer, "predict_members", spy)
    _run_predict(tmp_path, monkeypatch)
    written = dict(iter_submission(tmp_path / "sub/s.csv", ImageSet(records, 3), None))
    decision = LabelDecision.from_json(raw, CLASSES)
    assert decision.rules and decision.class_scales == [1.0, 8.0, 1.0]
    for index, probs in merged.items():
        record = records[index]
        expected = decision.labels(probs, (record.height, record.width))
        np.testing.assert_array_equal(written[record.file_name], expected)
    shapes = {i: (records[i].height, records[i].width) for i in merged}
    plain = sum((infer.probabilities_to_mask(p, shapes[i]) == 1).sum() for i, p in merged.items())
    assert plain < sum((written[records[i].file_name] == 1).sum() for i in merged)  # the scale did act


def test_predict_stage_predicts_in_sliding_windows_when_switched_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _stage_project(tmp_path, [[0.5] * 3, [0.5] * 3], tta="none")
    config = yaml.safe_load((tmp_path / "params.yaml").read_text())
    config["predict"].update(sliding_window=True, window_overlap=0.25)
    write_params(tmp_path / "params.yaml", config)
    real, overlaps = infer.predict_members, []

    def spy(*args, **kwargs):
        overlaps.append(inspect.signature(real).bind(*args, **kwargs).arguments["window_overlap"])
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "predict_members", spy)
    _run_predict(tmp_path, monkeypatch)
    assert overlaps == [0.25]
    written = dict(iter_submission(tmp_path / "sub/s.csv", ImageSet(records, 3), None))
    assert len(written) == len(records)


def test_predict_stage_refuses_tta_the_models_never_trained_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stage_project(tmp_path, [[0.5] * 3, [0.5] * 3])
    horizontal_only = AugmentParams(size=32, hflip=0.5, vflip=0.0)
    state = checkpoint_state(build_model(TINY_MODEL, 3), TINY_MODEL, CLASSES, horizontal_only, 1, 0.5, 1)
    save_checkpoint(tmp_path / "models/unet/fold1/best.pt", state)
    last = _last_error(capsys, tmp_path, monkeypatch)
    assert "predict.tta 'flips'" in last and "augment.vflip = 0.0" in last
    assert not (tmp_path / "sub/s.csv").exists()


def test_predict_stage_refuses_models_of_other_classes_than_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    records = _stage_project(tmp_path, [[0.5] * 3, [0.5] * 3])
    other = Manifest(["background", "can", "paper"], [1, 2], [], np.zeros((0, 3), dtype=bool), records, {})
    write_manifest(tmp_path / "data/manifest.json", other)
    # The fitted weights were fitted for the models' classes, not the data's: refused first.
    last = _last_error(capsys, tmp_path, monkeypatch)
    assert last == (
        "error: ensemble/weights.json: fitted for other classes or members than the data's "
        "(re-run the ensemble stage)"
    )
    # Weights that match the data but checkpoints that do not: the checkpoint is named.
    fitted = json.loads((tmp_path / "ensemble/weights.json").read_text())
    (tmp_path / "ensemble/weights.json").write_text(json.dumps({**fitted, "classes": other.classes}))
    last = _last_error(capsys, tmp_path, monkeypatch)
    assert last.startswith("error: models/unet/fold0/best.pt: classes ") and "differ from the data's" in last
    assert not (tmp_path / "sub/s.csv").exists()
