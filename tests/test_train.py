"""Tests for pipeline.training.train, stages/train.py and the oof stage after it: a real tiny run, learning,
resume after a kill, DDP."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY, killed_after_the_first_save, tiny_overlay

from pipeline.config import (
    Params,
    PredictParams,
    Recipe,
    RuntimeParams,
    TrainParams,
    params_from_overlay,
    params_to_dict,
)
from pipeline.data import coco
from pipeline.data.folds import held_out_mask
from pipeline.data.geometry import Geometry, resize_argmax
from pipeline.data.images import IGNORE_INDEX, mask_relpath, read_mask, write_mask
from pipeline.data.loaders import ImageDataset, InferenceBatch, build_inference_loader
from pipeline.data.manifest import read_manifest
from pipeline.data.probstore import read_probabilities
from pipeline.errors import UserError
from pipeline.inference.oof import write_oof
from pipeline.metrics import confusion_matrix, mean_iou
from pipeline.models.checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from pipeline.models.losses import TrainingObjective, build_loss
from pipeline.training import runtime as runtime_module
from pipeline.training import train as train_module
from pipeline.training.fold_data import FoldPaths, build_loaders, check_train_params, load_fold_data
from pipeline.training.resume import run_fingerprint
from pipeline.training.runtime import (
    NodeSpec,
    Runtime,
    cpu_has_native_bf16,
    resolve_nodes,
    seed_everything,
    setup_runtime,
)
from pipeline.training.state import build_train_state, lr_factor
from pipeline.training.topk import TOP_DIR, average_states, top_k_path, updated_top_k
from pipeline.training.train import evaluate, fit, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = TINY["demo"]["n_train"]
MODEL = "unet"  # the one recipe of the tiny config; _params puts its train overrides in models.unet.train

# The tiny config with rare-class oversampling, three folds (4 images each), fp32 and no TTA.
TRAIN = {
    "augment": {"oversample": True, "vflip": 0.0},
    "train": {"lr": 0.003, "amp": False},
    "runtime": {"nproc": 1},
    "ensemble": {"folds": [0, 1, 2]},
    "split": {"n_splits": 3},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _paths(data: Path, out: Path, fold: int = 0) -> FoldPaths:
    return FoldPaths(
        root=data / "demo",
        manifest=data / "manifest.json",
        masks=data / "masks",
        folds=data / "folds.csv",
        model_dir=out / f"models/{MODEL}/fold{fold}",
        metrics=out / f"metrics/{MODEL}/fold{fold}.json",
        live=out / f"dvclive/{MODEL}/fold{fold}",
    )


def _params(runtime: dict | None = None, **train: object) -> Params:
    """The tiny config, `train` overriding the recipe's train settings and `runtime` the runtime section."""
    raw = tiny_overlay(TRAIN, {"runtime": runtime or {}, "models": {MODEL: {"train": dict(train)}}})
    return params_from_overlay(raw)


def _recipe(**train: object) -> Recipe:
    return _params(**train).recipe(MODEL)


def _stage_args(data: Path, out: Path, params_file: Path, fold: int = 0) -> list[str]:
    paths = _paths(data, out, fold)
    return [
        "stages/train.py", "--model", MODEL, "--fold", str(fold), "--root", str(paths.root),
        "--manifest", str(paths.manifest), "--masks", str(paths.masks), "--folds", str(paths.folds),
        "--model-dir", str(paths.model_dir), "--metrics", str(paths.metrics), "--live", str(paths.live),
        "--params", str(params_file),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params_to_dict(params)))
    return path


def _cpu(recipe: Recipe) -> Runtime:
    return setup_runtime(recipe.train, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FoldPaths, dict]:
    """One real 1-epoch CPU run of fold 0: (its paths, what fit returned)."""
    recipe = _recipe()
    paths = _paths(dataset, tmp_path_factory.mktemp("run"))
    return paths, fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")


def _held_out(dataset: Path, fold: int = 0) -> list[coco.ImageRecord]:
    manifest = read_manifest(dataset / "manifest.json")
    fold_of = dict(pd.read_csv(dataset / "folds.csv").itertuples(index=False))
    out = held_out_mask(manifest.train_names(), fold_of, fold)
    return [image for image, held in zip(manifest.train, out, strict=True) if held]


def test_tiny_run_writes_every_output(dataset: Path, tiny_run: tuple[FoldPaths, dict]) -> None:
    paths, result = tiny_run
    best = load_checkpoint(paths.model_dir / "best.pt")
    assert best["classes"][0] == "background" and len(best["classes"]) == 11
    assert (best["epoch"], best["fold"], best["geometry"]["size"], best["recipe"]) == (0, 0, 64, MODEL)
    assert set(best["iou"]) == set(best["classes"])  # per-class IoUs live in best.pt, not the metrics file
    assert load_checkpoint(paths.model_dir / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in paths.model_dir.iterdir()) == ["best.pt", "last.pt"]

    written = json.loads(paths.metrics.read_text())
    assert set(written) == {"miou"}  # the headline only: `dvc metrics show` stays readable
    assert written["miou"] == pytest.approx(best["score"]) == pytest.approx(result["miou"])
    assert 0.0 <= written["miou"] <= 1.0
    assert result == {"miou": best["score"], "epoch": 0}

    curves = {p.stem: pd.read_csv(p, sep="\t") for p in (paths.live / "plots" / "metrics").glob("*.tsv")}
    assert set(curves) == {"train_loss", "val_miou", "lr"}
    assert curves["val_miou"]["val_miou"].tolist() == pytest.approx([written["miou"]])
    logged = yaml.safe_load((paths.live / "params.yaml").read_text())
    assert set(logged["elastic_p_by_class"]) == set(best["classes"][1:])


def test_oof_stage_stores_the_held_out_probabilities_validation_scored(
    dataset: Path, tiny_run: tuple[FoldPaths, dict], tmp_path: Path
) -> None:
    paths, _ = tiny_run
    params_file = _write_params(tmp_path / "params.yaml", _params())
    out = tmp_path / "oof" / MODEL / "fold0.npz"
    run = subprocess.run(
        [sys.executable, "stages/oof.py", "--checkpoint", str(paths.model_dir / "best.pt"), "--fold", "0",
         "--root", str(paths.root), "--manifest", str(paths.manifest), "--folds", str(paths.folds),
         "--out", str(out), "--params", str(params_file)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "4 held-out images, TTA none" in run.stdout
    assert [p.name for p in out.parent.iterdir()] == ["fold0.npz"]  # no staging file left behind

    best = load_checkpoint(paths.model_dir / "best.pt")
    images = _held_out(dataset)
    oof = read_probabilities(out)
    assert oof.file_names == [image.file_name for image in images]  # the fold's images, in manifest order
    assert oof.classes == best["classes"]

    # What is stored is the model's probabilities at its inference shape, up to the uint8 rounding, so
    # its argmax is the model's wherever the top two classes are more than the rounding apart; and the
    # model's argmax at each image's own size scores what validation scored.
    model = model_from_checkpoint(best).eval()
    geometry = Geometry.from_dict(best["geometry"])
    loader = build_inference_loader(ImageDataset(paths.root, images, geometry, masks_dir=paths.masks), 4, 0)
    rounding = 0.5 / 255 + 1e-6
    cm = np.zeros((11, 11), dtype=np.int64)
    for batch in loader:
        with torch.no_grad():
            probs = model(batch.images).softmax(dim=1)
        for position, (index, (h, w), mask) in enumerate(
            zip(batch.indexes, batch.shapes, batch.masks, strict=True)
        ):
            image, expected, stored = images[index], probs[position, :, :h, :w], oof.probabilities(index)
            assert stored.dtype == torch.float32
            assert stored.shape == (11, *geometry.inference_shape(image.height, image.width)) == (11, 64, 64)
            torch.testing.assert_close(stored, expected, rtol=0, atol=rounding)
            top_two = expected.topk(2, dim=0).values
            close = top_two[0] - top_two[1] <= 2 * rounding
            assert torch.all((stored.argmax(dim=0) == expected.argmax(dim=0)) | close)
            pred = resize_argmax(expected, (image.height, image.width)).numpy()
            cm += confusion_matrix(mask.numpy(), pred, 11)
    assert cm.sum() == len(images) * 64 * 64
    assert mean_iou(cm) == pytest.approx(best["score"])


def test_a_tta_the_training_never_saw_is_refused_before_predicting(
    dataset: Path, tiny_run: tuple[FoldPaths, dict], tmp_path: Path
) -> None:
    # Training no longer reads predict.tta; the oof stage, the first to use it, refuses before any output.
    paths, _ = tiny_run
    best = paths.model_dir / "best.pt"
    assert load_checkpoint(best)["augment"]["vflip"] == 0.0
    predict = PredictParams(tta="flips", batch_size=4, num_workers=0)
    out = tmp_path / "fold0.npz"
    with pytest.raises(UserError, match=r"predict.tta 'flips' .* augment.vflip = 0.0"):
        write_oof(best, _held_out(dataset), paths.root, predict, torch.device("cpu"), out)
    assert not list(tmp_path.iterdir())


def test_finished_run_only_rewrites_its_outputs(
    tiny_run: tuple[FoldPaths, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done, first = tiny_run
    shutil.copytree(done.model_dir, tmp_path / "models")
    paths = dataclasses.replace(
        done, model_dir=tmp_path / "models", metrics=tmp_path / "m.json", live=tmp_path / "live"
    )
    runtime = _cpu(_recipe())
    best_before = (paths.model_dir / "best.pt").stat().st_mtime_ns
    assert fit(_recipe(), 0, 0, paths, runtime, average="dataset") == first
    out = capsys.readouterr().out
    assert f"{MODEL} fold 0: all 1 epochs done; rewriting the outputs from best.pt" in out
    assert (paths.model_dir / "best.pt").stat().st_mtime_ns == best_before  # nothing retrained
    assert json.loads(paths.metrics.read_text()) == {"miou": pytest.approx(first["miou"])}
    assert len(pd.read_csv(paths.live / "plots/metrics/val_miou.tsv", sep="\t")) == 1  # curve replayed

    # How the run is carried out (loader workers: runtime.num_workers) is not what it learns.
    assert fit(_recipe(), 1, 0, paths, runtime, average="dataset") == first
    assert "all 1 epochs done" in capsys.readouterr().out
    assert (paths.model_dir / "best.pt").stat().st_mtime_ns == best_before

    fit(
        _recipe(lr=0.001), 0, 0, paths, runtime, average="dataset"
    )  # other settings: the old state is stale, train again
    assert (paths.model_dir / "best.pt").stat().st_mtime_ns != best_before


def test_finished_run_trains_again_when_a_mask_changes(
    tiny_run: tuple[FoldPaths, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # DVC re-runs the stage when a dep changes and the fold's folder persists: the run must not take
    # the old weights for finished just because the settings are the same.
    done, _ = tiny_run
    shutil.copytree(done.model_dir, tmp_path / "models")
    shutil.copytree(done.masks, tmp_path / "masks")
    paths = dataclasses.replace(
        done, model_dir=tmp_path / "models", masks=tmp_path / "masks", metrics=tmp_path / "m.json",
        live=tmp_path / "live",
    )  # fmt: skip
    runtime = _cpu(_recipe())
    fit(_recipe(), 0, 0, paths, runtime, average="dataset")  # same bytes in another folder: still finished
    assert "all 1 epochs done" in capsys.readouterr().out
    changed = sorted(paths.masks.rglob("*.png"))[0]
    mask = read_mask(changed)
    mask[:4, :4] = 1 - mask[:4, :4].clip(0, 1)
    write_mask(changed, mask)
    fit(_recipe(), 0, 0, paths, runtime, average="dataset")
    out = capsys.readouterr().out
    assert "all 1 epochs done" not in out and f"{MODEL} fold 0 epoch 1/1: train loss" in out


def _same_checkpoints(a_dir: Path, b_dir: Path) -> None:
    """best.pt and last.pt of two runs agree: epochs, scores, history and every weight bit for bit."""
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(a_dir / name), load_checkpoint(b_dir / name)
        for key in ("epoch", "score", "iou", "history", "best_score", "best_epoch", "best_iou"):
            assert a.get(key) == b.get(key), (name, key)
        for key in a["model_state"]:
            torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=0, msg=key)


def test_a_kill_between_last_and_best_leaves_a_run_that_ends_as_an_uninterrupted_one(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first validation always writes best.pt: kill the run just before that write, after last.pt.
    recipe = _recipe(epochs=2, max_batches=1)
    killed, straight = _paths(dataset, tmp_path / "killed"), _paths(dataset, tmp_path / "straight")

    def killed_before_best(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "write_best", killed_before_best)
        with pytest.raises(KeyboardInterrupt):
            fit(recipe, 0, 0, killed, _cpu(recipe), average="dataset")
    assert sorted(p.name for p in killed.model_dir.iterdir()) == ["last.pt"]
    assert load_checkpoint(killed.model_dir / "last.pt")["best_epoch"] == 0

    fit(recipe, 0, 0, killed, _cpu(recipe), average="dataset")
    out = capsys.readouterr().out
    assert f"{MODEL} fold 0: best.pt rewritten from last.pt (epoch 1)" in out
    assert f"resuming {MODEL} fold 0 from epoch 2/2" in out
    fit(recipe, 0, 0, straight, _cpu(recipe), average="dataset")
    _same_checkpoints(killed.model_dir, straight.model_dir)


def test_a_run_killed_before_its_first_validation_resumes(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # train.val_every 2: epoch 1 writes last.pt and no best.pt; a kill then must not mean a fresh start.
    recipe = _recipe(epochs=2, val_every=2, max_batches=1)
    paths = _paths(dataset, tmp_path / "killed")
    saves: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", killed_after_the_first_save(saves))
        with pytest.raises(KeyboardInterrupt):
            fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    assert saves == ["last.pt"] and load_checkpoint(paths.model_dir / "last.pt")["best_epoch"] is None
    fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    assert f"resuming {MODEL} fold 0 from epoch 2/2" in capsys.readouterr().out
    straight = _paths(dataset, tmp_path / "straight")
    fit(recipe, 0, 0, straight, _cpu(recipe), average="dataset")
    _same_checkpoints(paths.model_dir, straight.model_dir)


def test_a_damaged_last_checkpoint_means_a_fresh_start_said_in_one_line(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(epochs=2, max_batches=1)
    paths = _paths(dataset, tmp_path)
    fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    first = load_checkpoint(paths.model_dir / "best.pt")
    path = paths.model_dir / "last.pt"
    data = path.read_bytes()
    middle = len(data) // 2  # zeroed pages, as a power cut leaves them: torch.load alone would not notice
    path.write_bytes(data[:middle] + bytes(65536) + data[middle + 65536 :])
    capsys.readouterr()

    fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "starting this fold fresh" in line]
    assert line.startswith(f"{path}: damaged checkpoint")
    assert f"{MODEL} fold 0 epoch 1/2:" in out  # trained again from the start
    again = load_checkpoint(paths.model_dir / "best.pt")
    for key in first["model_state"]:  # the same run, redone: the same weights
        torch.testing.assert_close(again["model_state"][key], first["model_state"][key], rtol=0, atol=0)


def test_fingerprint_is_what_shapes_the_weights(dataset: Path) -> None:
    names = read_manifest(dataset / "manifest.json").train_names()
    inputs = [dataset / "folds.csv", dataset / "manifest.json"]

    cpu_fp32 = Runtime(torch.device("cpu")).execution()

    def fingerprint(recipe: Recipe, fold: int = 0, world_size: int = 1, execution: dict = cpu_fp32) -> str:
        root, masks = dataset / "demo", dataset / "masks"
        return run_fingerprint(
            recipe, fold, world_size, inputs, root, masks, names, average="dataset", execution=execution
        )

    base = fingerprint(_recipe())
    assert fingerprint(_recipe().model_copy(update=dict(name="renamed"))) == base
    # Runtime, ensemble and predict settings are no part of a recipe: they change neither it nor its
    # fingerprint (DVC does not re-run the train stages for them either).
    raw = tiny_overlay(TRAIN, {"models": {MODEL: {}}})
    raw["runtime"] = {"nproc": 1, "num_workers": 3}
    raw["ensemble"] = {"folds": [0, 1], "grid_step": 0.5, "per_class": True}
    raw["predict"] = {"tta": "hflip", "batch_size": 1, "num_workers": 2, "amp": False}
    assert fingerprint(params_from_overlay(raw).recipe(MODEL)) == base
    assert fingerprint(_recipe(lr=0.001)) != base
    assert fingerprint(_recipe(), fold=1) != base
    assert fingerprint(_recipe(), world_size=2) != base
    # A CPU float32 run is not continued on a GPU in bf16, nor in another memory format.
    gpu_bf16 = Runtime(torch.device("cuda", 0), amp_dtype=torch.bfloat16).execution()
    assert gpu_bf16 == {"device": "cuda", "amp": "bfloat16", "channels_last": False}
    assert fingerprint(_recipe(), execution=gpu_bf16) != base
    assert fingerprint(_recipe(), execution={**cpu_fp32, "channels_last": True}) != base
    other_model = params_from_overlay(
        {**raw, "models": {MODEL: {"model": {"arch": "FPN", "decoder_channels": None}}}}
    )
    assert fingerprint(other_model.recipe(MODEL)) != base


# The GPU's precision branches run on CPU too: autocast, channels_last and the fp16 GradScaler with
# unscale-then-clip are the same code, only the kernels differ.
PRECISIONS = {
    "float32": Runtime(torch.device("cpu")),
    "bf16, channels_last": Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True),
    # fp16's loss scaling without fp16 kernels, which are 25x slower than float32 on CPU.
    "loss scaling": Runtime(torch.device("cpu"), use_scaler=True),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_one_epoch_learns_a_fixed_batch(precision: str) -> None:
    """Overfitting one batch through the real loop: the loss must halve, or the loop does not learn."""
    runtime = PRECISIONS[precision]
    torch.manual_seed(0)
    recipe = _recipe(lr=3e-3, warmup_epochs=0.0, grad_clip=1.0, accumulate=2)
    state = build_train_state(
        recipe.model, recipe.train, n_classes=3, runtime=runtime, total_steps=10**6, resume=None
    )
    if runtime.channels_last:
        assert state.raw.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[:, 16:40, 8:30] = 1
    masks[1, 40:, 40:] = 2
    loss_fn = build_loss({"ce": 1.0, "dice": 1.0})
    losses = [
        train_one_epoch(state, [(images, masks)] * 2, loss_fn, runtime, recipe.train, f"epoch {epoch}")
        for epoch in range(12)  # 2 batches, accumulated into 1 optimizer step per epoch
    ]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert min(losses[-5:]) < 0.5 * losses[0], losses
    assert state.scheduler.last_epoch == 12  # one scheduler step per optimizer step
    if runtime.use_scaler:
        assert state.scaler.is_enabled() and state.scaler.get_scale() > 0


@pytest.mark.slow
def test_compiled_model_trains_evaluates_and_checkpoints_plain_weights() -> None:
    """train.compile on CPU (inductor): the loop runs the compiled model, checkpoints read the plain one."""
    recipe = _recipe(compile=True, warmup_epochs=0.0)
    runtime = PRECISIONS["float32"]
    state = build_train_state(
        recipe.model, recipe.train, n_classes=3, runtime=runtime, total_steps=10, resume=None
    )
    assert state.net is not state.raw and state.model is state.net
    before = {k: v.clone() for k, v in state.raw.state_dict().items()}
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loss = train_one_epoch(
        state, [(images, masks)], build_loss({"ce": 1.0}), runtime, recipe.train, "compiled"
    )
    assert math.isfinite(loss)
    after = state.raw.state_dict()
    assert set(after) == set(before)  # no "_orig_mod." prefixes in what checkpoints store
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step reached the plain model
    batch = InferenceBatch(images, [0, 1], [(32, 32), (32, 32)], list(masks.to(torch.uint8)))
    cm = evaluate(state.net, [batch], 3, runtime)
    assert cm.sum() == masks.numel()


def test_ema_follows_every_optimizer_step_of_the_raw_weights() -> None:
    # torch's EMA: the first update copies the weights, each later one is d * ema + (1 - d) * weights.
    decay = 0.75
    recipe = _recipe(ema=decay, lr=0.05, warmup_epochs=0.0, grad_clip=None)
    runtime = _cpu(recipe)
    seed_everything(0)
    state = build_train_state(recipe.model, recipe.train, 3, runtime, total_steps=4, resume=None)
    loss_fn = TrainingObjective(build_loss({"ce": 1.0}))
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    snapshots = []
    for step in range(3):
        train_one_epoch(state, [(images, masks)], loss_fn, runtime, recipe.train, f"step {step}")
        snapshots.append({k: v.detach().clone() for k, v in state.raw.state_dict().items()})
    name = next(k for k, v in snapshots[0].items() if v.is_floating_point() and "weight" in k)
    expected = snapshots[0][name]
    for snapshot in snapshots[1:]:
        expected = decay * expected + (1 - decay) * snapshot[name]
    assert not torch.equal(snapshots[1][name], snapshots[2][name])  # the raw weights moved
    torch.testing.assert_close(state.ema.module.state_dict()[name], expected)
    assert state.evaluated is state.ema.module and state.kept is state.ema.module


def test_best_checkpoint_holds_the_ema_weights_when_ema_is_on(dataset: Path, tmp_path: Path) -> None:
    recipe = _recipe(ema=0.5)
    paths = _paths(dataset, tmp_path)
    fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")  # 1 epoch: best.pt is the last epoch's
    best, last = load_checkpoint(paths.model_dir / "best.pt"), load_checkpoint(paths.model_dir / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["ema_state"].items() if k.startswith("module.")}
    assert set(averaged) == set(best["model_state"])
    for key, value in best["model_state"].items():
        torch.testing.assert_close(value, averaged[key], rtol=0, atol=0, msg=key)
    assert any(
        not torch.equal(value, last["model_state"][key])
        for key, value in best["model_state"].items()
        if value.is_floating_point()
    )  # not the raw weights
    # Validation scored the EMA weights: rescoring best.pt on the held-out fold gives its score.
    images = _held_out(dataset)
    val = ImageDataset(paths.root, images, Geometry.from_dict(best["geometry"]), masks_dir=paths.masks)
    cms = evaluate(model_from_checkpoint(best), build_inference_loader(val, 4, 0), 11, _cpu(recipe))
    assert mean_iou(cms.sum(axis=0)) == pytest.approx(best["score"])


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_constant_schedule_keeps_the_base_lr_after_warmup() -> None:
    factors = [lr_factor(step, warmup_steps=2, total_steps=10, cosine=False) for step in range(11)]
    assert factors == [0.5] + [1.0] * 10


def test_cpu_runtime_is_single_process_float32() -> None:
    runtime = _cpu(_recipe(amp=True, channels_last=True))
    assert (runtime.rank, runtime.world_size, runtime.is_main, runtime.distributed) == (0, 1, True, False)
    assert runtime.amp_dtype is None and not runtime.use_scaler and not runtime.channels_last
    with runtime.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cpu_bf16_trains_in_bf16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: True)
    runtime = _cpu(_recipe(cpu_bf16=True))
    assert runtime.amp_dtype == torch.bfloat16 and runtime.channels_last and not runtime.use_scaler
    with runtime.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16

    monkeypatch.setattr(runtime_module, "cpu_has_native_bf16", lambda: False)
    runtime = _cpu(_recipe(cpu_bf16=True))
    assert runtime.amp_dtype is None and not runtime.channels_last
    assert "no native bf16" in capsys.readouterr().err


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_native_bf16("flags\t: fpu avx512f avx512_bf16 avx512vl\n")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags\t: fpu avx2 avx512f avx512bw\n")


def test_seed_everything_replays_every_generator() -> None:
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first


def test_val_every_validates_every_nth_and_the_last_epoch(dataset: Path, tmp_path: Path) -> None:
    recipe = _recipe(epochs=3, val_every=2, max_batches=1)
    paths = _paths(dataset, tmp_path)
    result = fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    history = load_checkpoint(paths.model_dir / "last.pt")["history"]
    assert ["val_miou" in record for record in history] == [False, True, True]
    assert result["epoch"] in (1, 2)  # the best checkpoint comes from a validated epoch
    assert result["miou"] == max(history[1]["val_miou"], history[2]["val_miou"])


def test_bad_class_weights_and_folds_are_user_errors(dataset: Path, tmp_path: Path) -> None:
    runtime = _cpu(_recipe())
    with pytest.raises(
        UserError, match=rf"params: models\.{MODEL}: train\.class_weights has 2 weights for 11 "
    ):
        fit(_recipe(class_weights=[1.0, 2.0]), 0, 0, _paths(dataset, tmp_path), runtime, average="dataset")
    bad = tmp_path / "folds.csv"
    bad.write_text("image_id,fold\nimages/train_0000.jpg,0\n")
    with pytest.raises(UserError, match=r"folds.csv: does not match .*manifest.json"):
        fit(
            _recipe(),
            0,
            0,
            dataclasses.replace(_paths(dataset, tmp_path), folds=bad),
            runtime,
            average="dataset",
        )
    assert not (tmp_path / "models").exists()  # refused before anything was written


def test_resume_after_kill_matches_an_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    # With EMA on: its average must survive the kill too (last.pt's "ema_state").
    params = _params(epochs=4, ema=0.9)
    params_file = _write_params(tmp_path / "params.yaml", params)
    killed = tmp_path / "killed"
    last = _paths(dataset, killed).model_dir / "last.pt"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, *_stage_args(dataset, killed, params_file)],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    # Each epoch replaces last.pt by a rename, so a second inode means epoch >= 1 is saved.
    inodes: set[int] = set()
    deadline = time.monotonic() + 300
    while len(inodes) < 2:
        assert proc.poll() is None, (
            f"finished before it could be killed:\n{(tmp_path / 'killed.log').read_text()}"
        )
        assert time.monotonic() < deadline, "no epoch finished in time"
        with contextlib.suppress(FileNotFoundError):
            inodes.add(last.stat().st_ino)
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    done = load_checkpoint(last)["epoch"]
    assert done < 3, "the run got to its end before the kill"

    # The resumed run may use other loader workers: runtime settings are not part of the resume state.
    resume_params = _params(runtime={"num_workers": 1}, epochs=4, ema=0.9)
    resume_file = _write_params(tmp_path / "resume.yaml", resume_params)
    rerun = subprocess.run(
        [sys.executable, *_stage_args(dataset, killed, resume_file)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming {MODEL} fold 0 from epoch {done + 2}/4" in rerun.stdout
    assert "epoch 1/4:" not in rerun.stdout  # it did not start over

    straight = tmp_path / "straight"
    recipe = params.recipe(MODEL)
    fit(recipe, 0, 0, _paths(dataset, straight), _cpu(recipe), average="dataset")
    resumed_metrics = json.loads(_paths(dataset, killed).metrics.read_text())
    assert resumed_metrics == json.loads(_paths(dataset, straight).metrics.read_text())
    for name in ("best.pt", "last.pt"):
        a = load_checkpoint(_paths(dataset, killed).model_dir / name)
        b = load_checkpoint(_paths(dataset, straight).model_dir / name)
        for key in ("epoch", "score", "iou", "history", "best_score"):
            assert a.get(key) == b.get(key), (name, key)
        for key in a["model_state"]:  # bit for bit on CPU
            torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=0, msg=key)
        if name == "last.pt":
            for key in a["ema_state"]:
                torch.testing.assert_close(a["ema_state"][key], b["ema_state"][key], rtol=0, atol=0, msg=key)
    curve = pd.read_csv(_paths(dataset, killed).live / "plots/metrics/val_miou.tsv", sep="\t")
    assert curve["step"].tolist() == [0, 1, 2, 3]


def _run_stage(dataset: Path, out: Path, params_file: Path) -> subprocess.CompletedProcess[str]:
    """The train stage's script as DVC runs it, asserted to succeed."""
    run = subprocess.run(
        [sys.executable, *_stage_args(dataset, out, params_file)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_ddp_on_cpu_writes_one_set_of_outputs(dataset: Path, tmp_path: Path) -> None:
    # With train.average_top_k: every rank takes part in validating the average best.pt becomes.
    params = _params(runtime={"nproc": 2}, epochs=2, average_top_k=2)
    params_file = _write_params(tmp_path / "params.yaml", params)
    out = tmp_path / "ddp"
    # runtime.nproc: 2, so the stage starts its two workers under torchrun itself.
    run = _run_stage(dataset, out, params_file)
    assert run.stdout.count("best val mIoU") == 1  # only rank 0 reports
    paths = _paths(dataset, out)
    assert sorted(p.name for p in paths.model_dir.iterdir()) == ["best.pt", "last.pt", TOP_DIR]
    metrics = json.loads(paths.metrics.read_text())
    assert set(metrics) == {"miou"} and 0.0 <= metrics["miou"] <= 1.0 and np.isfinite(metrics["miou"])
    assert pd.read_csv(paths.live / "plots/metrics/train_loss.tsv", sep="\t")["step"].tolist() == [0, 1]

    # Each rank validated its own shard of the held-out fold; summed, they score every image once: a
    # single process scoring best.pt on the whole fold gets the same mIoU.
    best = load_checkpoint(paths.model_dir / "best.pt")
    assert best["recipe"] == MODEL and best["score"] == metrics["miou"]
    assert sorted(a["epoch"] for a in best["averaged"]) == [0, 1]
    images = _held_out(dataset)
    val = ImageDataset(paths.root, images, Geometry.from_dict(best["geometry"]), masks_dir=paths.masks)
    cm = evaluate(model_from_checkpoint(best), build_inference_loader(val, 2, 0), 11, PRECISIONS["float32"])
    assert cm.sum() == len(images) * 64 * 64
    # Every rank validates with rank 0's BatchNorm statistics, the ones best.pt stores.
    assert mean_iou(cm.sum(axis=0)) == pytest.approx(metrics["miou"])


def _free_port() -> int:
    """A port nothing listens on now (the OS picks it; a race with another program is possible but rare)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_env(node_rank: int) -> dict[str, str]:
    """_env() as the launcher on node `node_rank` sees it, with no node settings inherited from a real job."""
    env = {k: v for k, v in _env().items() if k not in ("SLURM_NODEID", "TRASHSEG_RDZV_ENDPOINT")}
    return dict(env, TRASHSEG_NODE_RANK=str(node_rank))


@contextlib.contextmanager
def _started(commands: list[list[str]], envs: list[dict[str, str]], logs: list[Path]) -> Iterator[list]:
    """The commands running at once, each writing its `logs` file; any still running at exit is stopped."""
    with contextlib.ExitStack() as stack:
        procs = []
        for command, env, log in zip(commands, envs, logs, strict=True):
            out = stack.enter_context(log.open("w"))
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        try:
            yield procs
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()  # the launcher forwards SIGTERM to torchrun and its workers
                    proc.wait()


NODES = RuntimeParams(nnodes=2, rdzv_endpoint="node0.cluster:29500")


def test_resolve_nodes_reads_the_params_endpoint_and_this_nodes_rank() -> None:
    assert resolve_nodes(RuntimeParams(), {"TRASHSEG_NODE_RANK": "1"}) is None  # one node: standalone
    assert resolve_nodes(NODES, {"TRASHSEG_NODE_RANK": "1"}) == NodeSpec(2, 1, "node0.cluster", 29500)


def test_resolve_nodes_prefers_the_environment_and_falls_back_to_slurm() -> None:
    env = {"TRASHSEG_RDZV_ENDPOINT": "10.0.0.7:1234", "TRASHSEG_NODE_RANK": "0", "SLURM_NODEID": "1"}
    assert resolve_nodes(NODES, env) == NodeSpec(2, 0, "10.0.0.7", 1234)
    assert resolve_nodes(NODES, {"SLURM_NODEID": "1"}) == NodeSpec(2, 1, "node0.cluster", 29500)
    ipv6 = {"TRASHSEG_RDZV_ENDPOINT": "[fd00::7]:29400", "SLURM_NODEID": "2"}
    assert resolve_nodes(RuntimeParams(nnodes=3), ipv6) == NodeSpec(3, 2, "[fd00::7]", 29400)


@pytest.mark.parametrize(
    ("runtime", "environ", "message"),
    [
        (
            RuntimeParams(nnodes=2),
            {"TRASHSEG_NODE_RANK": "0"},
            "params: runtime.nnodes is 2 but no rendezvous endpoint: set runtime.rdzv_endpoint "
            "(host:port of node 0) or TRASHSEG_RDZV_ENDPOINT",
        ),
        (NODES, {}, "params: runtime.nnodes is 2 but this node's rank is unknown: set TRASHSEG_NODE_RANK"),
        (NODES, {"TRASHSEG_NODE_RANK": "2"}, "environment: TRASHSEG_NODE_RANK is 2 but runtime.nnodes is 2"),
        (NODES, {"SLURM_NODEID": "-1"}, "environment: SLURM_NODEID is -1 but runtime.nnodes is 2"),
        (
            NODES,
            {"TRASHSEG_NODE_RANK": "one"},
            "environment: TRASHSEG_NODE_RANK must be an integer, got 'one'",
        ),
        (
            NODES,
            {"TRASHSEG_NODE_RANK": "0", "TRASHSEG_RDZV_ENDPOINT": "node0"},
            "environment: TRASHSEG_RDZV_ENDPOINT must be host:port of node 0 (port 1-65535), got 'node0'",
        ),
    ],
)
def test_resolve_nodes_refuses_a_missing_or_bad_setting_in_one_line(
    runtime: RuntimeParams, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(UserError) as info:
        resolve_nodes(runtime, environ)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "endpoint", ["node0", "node0:", ":29500", "node0:http", "node0:0", "node0:65536", "::1:29500", "a b:1"]
)
def test_a_bad_rdzv_endpoint_is_refused_when_params_load(endpoint: str) -> None:
    with pytest.raises(UserError) as info:
        params_from_overlay({"runtime": {"nnodes": 2, "rdzv_endpoint": endpoint}})
    expected = f"params: 'runtime.rdzv_endpoint' must be host:port of node 0 (port 1-65535), got {endpoint!r}"
    assert str(info.value) == expected


def test_cpu_threads_share_this_nodes_cores_among_its_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Node 0 of 2, with 2 of the 4 processes: it splits its own 8 cores in 2, less a core per loader worker.
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("pipeline.training.runtime.cpu_cores", lambda: 8)
    monkeypatch.setattr(
        "pipeline.training.runtime.dist.is_initialized", lambda: True
    )  # no process group to join
    try:
        runtime = setup_runtime(TrainParams(), num_workers=1, device="cpu")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)
    assert (runtime.rank, runtime.local_rank, runtime.world_size, runtime.is_main) == (1, 1, 4, False)


def test_launcher_on_two_nodes_gives_node_0_the_first_global_ranks(tmp_path: Path) -> None:
    # Node 1 starts first: static rendezvous ranks the workers by node rank, not by who joins first.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, pathlib, sys\n"
        "name = f\"node{os.environ['TRASHSEG_NODE_RANK']}-local{os.environ['LOCAL_RANK']}.txt\"\n"
        "seen = ' '.join(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE'))\n"
        "(pathlib.Path(sys.argv[1]) / name).write_text(seen)\n"
    )
    port = _free_port()
    launcher = (
        "import sys; from pipeline.training.runtime import NodeSpec, launch_workers; "
        "node = int(sys.argv[1]); "
        f"sys.exit(launch_workers(2, sys.argv[2:], NodeSpec(2, node, '127.0.0.1', {port})))"
    )
    commands = [[sys.executable, "-c", launcher, str(node), str(worker), str(tmp_path)] for node in (1, 0)]
    logs = [tmp_path / f"node{node}.log" for node in (1, 0)]
    with _started(commands[:1], [_node_env(1)], logs[:1]) as first:
        time.sleep(2)
        with _started(commands[1:], [_node_env(0)], logs[1:]) as second:
            codes = [proc.wait(timeout=120) for proc in first + second]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    # "RANK WORLD_SIZE LOCAL_WORLD_SIZE" as each worker saw them.
    seen = {path.stem: path.read_text() for path in tmp_path.glob("node*-local*.txt")}
    assert seen == {
        f"node{node}-local{local}": f"{2 * node + local} 4 2" for node in (0, 1) for local in (0, 1)
    }


@pytest.mark.slow
def test_two_nodes_on_localhost_train_like_one_node_of_two_processes(dataset: Path, tmp_path: Path) -> None:
    # Two "nodes" of one process each, on this machine, writing to one folder as nodes on a shared
    # filesystem would: each runs the same stage command; only node 0 (global rank 0) writes.
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes_file = _write_params(
        tmp_path / "nodes.yaml", _params(runtime={"nnodes": 2, "rdzv_endpoint": endpoint})
    )
    out = tmp_path / "nodes"
    command = [sys.executable, *_stage_args(dataset, out, nodes_file)]
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    with _started([command, command], [_node_env(0), _node_env(1)], logs) as procs:
        codes = [proc.wait(timeout=300) for proc in procs]
    node0, node1 = (log.read_text() for log in logs)
    assert codes == [0, 0], node0[-3000:] + node1[-3000:]
    assert node0.count("best val mIoU") == 1 and "best val mIoU" not in node1
    paths = _paths(dataset, out)
    assert sorted(p.name for p in paths.model_dir.iterdir()) == ["best.pt", "last.pt"]
    metrics = json.loads(paths.metrics.read_text())
    assert set(metrics) == {"miou"}

    one_node_file = _write_params(tmp_path / "one_node.yaml", _params(runtime={"nproc": 2}))
    single = tmp_path / "one_node"
    _run_stage(dataset, single, one_node_file)
    # The same world of 2 ranks, the same shards and seeds: on CPU the runs agree to the last bit.
    assert metrics == json.loads(_paths(dataset, single).metrics.read_text())
    a = load_checkpoint(paths.model_dir / "best.pt")["model_state"]
    b = load_checkpoint(_paths(dataset, single).model_dir / "best.pt")["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_stage_reports_a_bad_folds_file_in_one_line(dataset: Path, tmp_path: Path, nproc: int) -> None:
    params_file = _write_params(tmp_path / "params.yaml", _params(runtime={"nproc": nproc}))
    folds = tmp_path / "folds.csv"
    folds.write_text("image_id,fold\nnot/an/image.jpg,0\n")
    args = _stage_args(dataset, tmp_path / "out", params_file)
    args[args.index("--folds") + 1] = str(folds)
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "folds.csv: does not match" in errors[0], run.stderr


def test_train_stage_names_the_defined_models_for_an_unknown_one(dataset: Path, tmp_path: Path) -> None:
    params_file = _write_params(tmp_path / "params.yaml", _params())
    args = _stage_args(dataset, tmp_path / "out", params_file)
    args[args.index("--model") + 1] = "resnet"
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"no model recipe 'resnet' in 'models' (defined: {MODEL})" in errors[0]
    assert not (tmp_path / "out").exists()


def test_sigterm_to_the_launcher_stops_its_workers(tmp_path: Path) -> None:
    # A scheduler or `kill` signals the stage's process only: torchrun and its workers must stop with it.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, pathlib, sys, time\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "(out / f'started{os.environ[\"RANK\"]}').touch()\n"
        "time.sleep(6)\n"
        "(out / f'survived{os.environ[\"RANK\"]}').touch()\n"
    )
    launcher = (
        "import sys; from pipeline.training.runtime import launch_workers; "
        "sys.exit(launch_workers(2, sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(worker), str(tmp_path)], cwd=ROOT, env=_env()
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("started*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    time.sleep(8)  # past the workers' sleep: a survivor would have written its file by now
    assert not list(tmp_path.glob("survived*"))


def _u3p_params(**train: object) -> Params:
    """The tiny config with one U-Net 3+ recipe: deep supervision and a gated CGM, 8-wide decoder stages."""
    raw = tiny_overlay(TRAIN)
    options = {"deep_supervision": True, "cgm": True, "cgm_gate": True, "cat_channels": 8}
    model = {"arch": "UNet3Plus", "decoder_channels": None, "options": options}
    raw["models"] = {MODEL: {"model": model, "train": dict(train)}}
    return params_from_overlay(raw)


def test_unet3plus_with_side_outputs_cgm_and_boundary_weights_trains_and_rebuilds(
    dataset: Path, tmp_path: Path
) -> None:
    """A real fit: the loss sees every side output, the presence head and the boundary weight maps; best.pt
    rebuilds the gated U-Net 3+ that inference runs (one logits tensor in eval mode)."""
    recipe = _u3p_params(max_batches=2, boundary_w0=5.0, boundary_class_balance=True).recipe(MODEL)
    seen: list[tuple[object, object]] = []
    forward = TrainingObjective.forward

    def spy(self: TrainingObjective, output: object, target: torch.Tensor, weights: object = None) -> object:
        seen.append((output, weights))
        return forward(self, output, target, weights)

    paths = _paths(dataset, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingObjective, "forward", spy)
        result = fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    assert len(seen) == 2 and math.isfinite(result["miou"])
    output, weights = seen[0]
    assert isinstance(output, dict) and set(output) == {"logits", "side", "presence"}
    assert len(output["side"]) == 4 and output["presence"].shape == (4, 11)  # depth 5: 4 below the top
    assert isinstance(weights, torch.Tensor) and weights.shape == (4, 64, 64) and weights.max() > 1
    ckpt = load_checkpoint(paths.model_dir / "best.pt")
    model = model_from_checkpoint(ckpt, "best.pt")
    assert type(model).__name__ == "UNet3Plus" and ckpt["smp_config"]["cgm_gate"] is True
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 11, 64, 64)


def test_boundary_weights_without_a_pixel_loss_and_wrong_side_weights_are_refused(
    dataset: Path, tmp_path: Path
) -> None:
    runtime = _cpu(_recipe())
    with pytest.raises(UserError, match=r"boundary weight map .* the pixels of ce, which train.losses"):
        fit(
            _recipe(boundary_w0=5.0, losses={"dice": 1.0}),
            0,
            0,
            _paths(dataset, tmp_path),
            runtime,
            average="dataset",
        )
    recipe = _u3p_params(side_weights=[1.0, 0.5]).recipe(MODEL)
    with pytest.raises(UserError, match=r"train.side_weights has 2 weights, but UNet3Plus .* gives 4 side"):
        fit(recipe, 0, 0, _paths(dataset, tmp_path), runtime, average="dataset")
    assert not (tmp_path / "models").exists()  # refused before anything was written


def _pseudo_folder(dataset: Path, out: Path) -> Path:
    """The pseudo stage's output for the dataset's test images: each mask the truth's class 0/1 split
    with a band of ignored pixels (what `pipeline.data.pseudo.write_pseudo` leaves)."""
    manifest = read_manifest(dataset / "manifest.json")
    entries = []
    for image in manifest.test:
        mask = np.zeros((image.height, image.width), np.uint8)
        mask[:, : image.width // 2] = 1
        mask[:, image.width // 2 : image.width // 2 + 8] = IGNORE_INDEX
        write_mask(out / "masks" / mask_relpath(image.file_name), mask)
        presence = [c in (0, 1) for c in range(manifest.n_classes)]
        entries.append(
            {"file_name": image.file_name, "id": image.id, "height": image.height, "width": image.width,
             "presence": presence, "labelled": float((mask != IGNORE_INDEX).mean())}
        )  # fmt: skip
    (out / "pseudo.json").write_text(
        json.dumps({"threshold": 0.9, "classes": manifest.classes, "images": entries})
    )
    return out


def test_pseudo_labelled_images_train_but_never_validate(dataset: Path, tmp_path: Path) -> None:
    recipe = _recipe()
    pseudo = _pseudo_folder(dataset, tmp_path / "pseudo")
    paths = dataclasses.replace(_paths(dataset, tmp_path / "run"), pseudo=pseudo)
    data = load_fold_data(0, paths)
    test_names = {image.file_name for image in read_manifest(dataset / "manifest.json").test}
    runtime = _cpu(recipe)
    train_loader, val_loader = build_loaders(recipe.augment, recipe.train, 0, data, paths, runtime)
    val_names = {image.file_name for image in val_loader.dataset.images}
    train_names = set(train_loader.dataset.parts[0].file_names) | set(
        train_loader.dataset.parts[1].file_names
    )
    assert test_names <= train_names and not test_names & val_names
    assert len(val_names) == N_TRAIN // 3  # exactly the held-out fold
    # The pseudo masks' ignored pixels reach the loss as IGNORE_INDEX; every other value is a class.
    seen = torch.cat([batch[1].flatten() for batch in train_loader])
    assert (seen == IGNORE_INDEX).any() and seen[seen != IGNORE_INDEX].max() < 11

    result = fit(recipe, 0, 0, paths, runtime, average="dataset")
    plain = fit(recipe, 0, 0, _paths(dataset, tmp_path / "plain"), runtime, average="dataset")
    best = load_checkpoint(paths.model_dir / "best.pt")
    assert (
        best["fingerprint"]
        != load_checkpoint(tmp_path / f"plain/models/{MODEL}/fold0/best.pt")["fingerprint"]
    )
    assert math.isfinite(result["miou"]) and math.isfinite(plain["miou"])


def test_an_empty_pseudo_set_trains_exactly_as_without_one(dataset: Path, tmp_path: Path) -> None:
    # pseudo.enabled false: the stage writes no images, and training must be what it was without pseudo.
    manifest = read_manifest(dataset / "manifest.json")
    empty = tmp_path / "pseudo"
    empty.mkdir()
    (empty / "pseudo.json").write_text(
        json.dumps({"threshold": None, "classes": manifest.classes, "images": []})
    )
    data = load_fold_data(0, dataclasses.replace(_paths(dataset, tmp_path), pseudo=empty))
    without = load_fold_data(0, _paths(dataset, tmp_path))
    assert data.pseudo is None and data.train_names == without.train_names
    assert np.array_equal(data.all_presence, without.presence)


def test_class_weights_a_loss_would_drop_are_refused_before_any_worker_starts() -> None:
    # check_train_params runs in the stage before torchrun starts workers, and again in fit.
    train = TrainParams(losses={"ce": 1.0, "lovasz": 1.0}, class_weights=[1.0, 2.0, 3.0])
    expected = r"params: models\.m: train\.class_weights weights only ce, dice, focal; .* names lovasz"
    with pytest.raises(UserError, match=expected):
        check_train_params(train, "m", 3)
    check_train_params(train.model_copy(update={"losses": {"ce": 1.0, "dice": 1.0}}), "m", 3)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_best_checkpoint_is_the_validated_average_of_the_k_best_epochs(
    dataset: Path,
    tmp_path: Path,
    ema: float | None,
) -> None:
    recipe = _recipe(epochs=3, max_batches=1, average_top_k=2, ema=ema)
    paths = _paths(dataset, tmp_path)
    metrics = fit(recipe, 0, 0, paths, _cpu(recipe), average="dataset")
    last = load_checkpoint(paths.model_dir / "last.pt")
    best = load_checkpoint(paths.model_dir / "best.pt")
    top = [tuple(item) for item in last["top_k"]]
    assert len(top) == 2 and top == updated_top_k(top[1:], *top[0], 2)  # the two best, best first
    assert [a["epoch"] for a in best["averaged"]] == [e for e, _ in top]
    assert best["epoch"] == top[0][0] == last["best_epoch"]
    kept = sorted(p.name for p in (paths.model_dir / TOP_DIR).iterdir())
    assert kept == sorted(top_k_path(paths.model_dir, e).name for e, _ in top)
    states = [load_checkpoint(top_k_path(paths.model_dir, e))["model_state"] for e, _ in sorted(top)]
    expected = average_states(states)
    for key, value in expected.items():
        torch.testing.assert_close(best["model_state"][key], value, rtol=0, atol=0, msg=key)
    # best.pt's score is the averaged model's own validation, and the metrics file says it.
    assert metrics["miou"] == best["score"]
    if ema is not None:  # the kept weights are the EMA model's, not the raw ones last.pt trains on
        assert any(
            not torch.equal(last["model_state"][k], v) for k, v in states[-1].items() if v.is_floating_point()
        )


def test_a_killed_run_with_averaging_resumes_to_the_same_bits(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _recipe(epochs=3, max_batches=1, average_top_k=2)
    killed, straight = _paths(dataset, tmp_path / "killed"), _paths(dataset, tmp_path / "straight")
    writes = []

    def save_then_kill(path: Path, state: dict) -> None:
        save_checkpoint(path, state)
        writes.append(Path(path).name)
        if writes.count("last.pt") == 2:  # after epoch 2's last.pt, before best.pt or the average
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", save_then_kill)
        with pytest.raises(KeyboardInterrupt):
            fit(recipe, 0, 0, killed, _cpu(recipe), average="dataset")
    assert load_checkpoint(killed.model_dir / "last.pt")["epoch"] == 1
    fit(recipe, 0, 0, killed, _cpu(recipe), average="dataset")
    fit(recipe, 0, 0, straight, _cpu(recipe), average="dataset")
    a, b = load_checkpoint(killed.model_dir / "best.pt"), load_checkpoint(straight.model_dir / "best.pt")
    assert (a["epoch"], a["score"], a["averaged"]) == (b["epoch"], b["score"], b["averaged"])
    for key in a["model_state"]:
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=0, msg=key)
    # A finished run asked again recomputes the same average (nothing to repair after a kill mid-write).
    fit(recipe, 0, 0, straight, _cpu(recipe), average="dataset")
    again = load_checkpoint(straight.model_dir / "best.pt")
    for key in a["model_state"]:
        torch.testing.assert_close(again["model_state"][key], b["model_state"][key], rtol=0, atol=0, msg=key)
