"""Tests for the refit (pipeline.training.refit, stages/refit.py) and its place in predict's members."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, killed_after_the_first_save, tiny_overlay, write_params

from pipeline.config import params_from_overlay
from pipeline.data import coco
from pipeline.data.geometry import Geometry
from pipeline.ensemble.fit import FittedWeights
from pipeline.errors import UserError
from pipeline.inference.infer import Ensemble, Member, predict_members
from pipeline.inference.members import member_checkpoints, refit_shares
from pipeline.models.checkpoints import REFIT_FILE, load_checkpoint, save_checkpoint
from pipeline.training import refit as refit_module
from pipeline.training.fold_data import training_set
from pipeline.training.refit import RefitPaths, fold_best_epochs, refit, refit_epochs
from pipeline.training.runtime import setup_runtime

ROOT = Path(__file__).resolve().parents[1]
MODEL = "unet"
REFIT = {"train": {"lr": 0.003, "amp": False, "max_batches": 2}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _paths(data: Path, out: Path) -> RefitPaths:
    return RefitPaths(data / "demo", data / "manifest.json", data / "masks", out)


def _recipe(**train: object):
    overlay = tiny_overlay(REFIT, {"models": {MODEL: {"train": dict(train)}}})
    return params_from_overlay(overlay).recipe(MODEL)


def _cpu(recipe) -> object:
    return setup_runtime(recipe.train, device="cpu")


def test_refit_epochs_are_the_configured_ones_or_the_folds_median() -> None:
    assert refit_epochs(7, [3, 4, 5]) == 7
    assert refit_epochs(None, [5, 3, 4]) == 4
    assert refit_epochs(None, [2, 5]) == 5  # even count: the upper middle one
    with pytest.raises(ValueError, match="best epochs"):
        refit_epochs(None, [])


def test_fold_best_epochs_count_from_one_and_name_a_missing_checkpoint(tmp_path: Path) -> None:
    paths = []
    for fold, epoch in enumerate([4, 9]):
        paths.append(tmp_path / f"fold{fold}" / "best.pt")
        paths[-1].parent.mkdir()
        save_checkpoint(paths[-1], {"epoch": epoch})
    assert fold_best_epochs(paths) == [5, 10]
    with pytest.raises(UserError, match=r"fold2/best\.pt: missing"):
        fold_best_epochs([*paths, tmp_path / "fold2" / "best.pt"])


def test_refit_shares_give_the_refit_its_weight_and_the_folds_the_rest() -> None:
    shares = refit_shares(4, 0.4)
    assert shares[-1] == 0.4 and shares[:-1] == [pytest.approx(0.15)] * 4
    assert sum(shares) == pytest.approx(1.0)


def test_a_refit_trains_on_every_image_and_resumes_bit_for_bit(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(ema=0.9)
    killed = _paths(dataset, tmp_path / "killed")
    saves: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(refit_module, "save_checkpoint", killed_after_the_first_save(saves))
        with pytest.raises(KeyboardInterrupt):
            refit(recipe, 0, killed, _cpu(recipe), epochs=3)
    assert saves == ["last.pt"] and not (killed.model_dir / REFIT_FILE).exists()
    result = refit(recipe, 0, killed, _cpu(recipe), epochs=3)
    assert "resuming unet refit from epoch 2/3" in capsys.readouterr().out
    assert result["epochs"] == 3

    straight = _paths(dataset, tmp_path / "straight")
    seen = []

    def recorded(*args: object, **kwargs: object) -> object:
        seen.append(list(args[2]))  # training_set(aug, root, file_names, ...)
        return training_set(*args, **kwargs)

    monkeypatch.setattr(refit_module, "training_set", recorded)
    refit(recipe, 0, straight, _cpu(recipe), epochs=3)
    assert len(seen[0]) == TINY["demo"]["n_train"]  # every training image, no fold held out
    a, b = (load_checkpoint(p.model_dir / REFIT_FILE) for p in (killed, straight))
    assert a["fold"] is None and a["refit"] and a["epoch"] == 2
    for key in a["model_state"]:  # bit for bit on CPU (the EMA weights: train.ema is on)
        torch.testing.assert_close(a["model_state"][key], b["model_state"][key], rtol=0, atol=0, msg=key)
    last = load_checkpoint(straight.model_dir / "last.pt")
    ema = {key.removeprefix("module."): value for key, value in last["ema_state"].items()}
    for key, value in a["model_state"].items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
    assert len(last["history"]) == 3 and "val_miou" not in last["history"][0]


def _stage(dataset: Path, work: Path, overlay: dict) -> subprocess.CompletedProcess[str]:
    params = write_params(work / "params.yaml", tiny_overlay(REFIT, overlay))
    command = [
        sys.executable, "stages/refit.py", "--model", MODEL, "--root", str(dataset / "demo"),
        "--manifest", str(dataset / "manifest.json"), "--masks", str(dataset / "masks"),
        "--folds-dir", str(work / "models" / MODEL), "--out", str(work / "refits" / MODEL),
        "--params", str(params),
    ]  # fmt: skip
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_stage_trains_the_folds_median_epochs_and_clears_its_folder_when_off(
    dataset: Path, tmp_path: Path
) -> None:
    folds = tmp_path / "models" / MODEL
    for fold, epoch in enumerate([0, 1]):  # best epochs 1 and 2: the upper middle one is 2
        (folds / f"fold{fold}").mkdir(parents=True)
        save_checkpoint(folds / f"fold{fold}" / "best.pt", {"epoch": epoch})
    done = _stage(dataset, tmp_path, {"refit": {"enabled": True}})
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "refits" / MODEL
    report = json.loads((out / "refit.json").read_text())
    assert report["enabled"] and report["epochs"] == 2 and "[1, 2]" in report["chosen_by"]
    assert load_checkpoint(out / REFIT_FILE)["epoch"] == 1

    off = _stage(dataset, tmp_path, {"refit": {"enabled": False}})
    assert off.returncode == 0, off.stdout + off.stderr
    assert sorted(p.name for p in out.iterdir()) == ["refit.json"]
    assert json.loads((out / "refit.json").read_text()) == {"enabled": False}


def test_a_missing_fold_checkpoint_is_one_line(dataset: Path, tmp_path: Path) -> None:
    done = _stage(dataset, tmp_path, {"refit": {"enabled": True}})
    assert done.returncode != 0
    assert "fold0/best.pt: missing" in done.stderr and "Traceback" not in done.stderr


def test_refit_params_are_checked() -> None:
    for bad in ({"weight": 0}, {"weight": 1.5}, {"epochs": 0}):
        with pytest.raises(UserError, match="refit"):
            params_from_overlay(tiny_overlay({"refit": bad}))


def test_member_checkpoints_add_the_refit_model_and_name_a_missing_one(tmp_path: Path) -> None:
    fitted = FittedWeights(["unet"], [0, 1], ["background", "a", "b"], [[1.0] * 3])
    for fold in (0, 1):
        (tmp_path / "models/unet" / f"fold{fold}").mkdir(parents=True)
        (tmp_path / "models/unet" / f"fold{fold}" / "best.pt").write_bytes(b"")
    assert len(member_checkpoints(tmp_path / "models", fitted)["unet"]) == 2
    with pytest.raises(UserError, match=r"refits/unet/final\.pt: refit model of 'unet' not found"):
        member_checkpoints(tmp_path / "models", fitted, tmp_path / "refits")
    (tmp_path / "refits/unet").mkdir(parents=True)
    (tmp_path / "refits/unet" / REFIT_FILE).write_bytes(b"")
    paths = member_checkpoints(tmp_path / "models", fitted, tmp_path / "refits")["unet"]
    assert paths[-1] == tmp_path / "refits/unet" / REFIT_FILE and len(paths) == 3


class _Constant(torch.nn.Module):
    """Logits that give every pixel the same class probabilities."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h, w).clone()


def test_a_members_shares_weight_its_models(tiny_demo: Path) -> None:
    images = coco.load_coco(tiny_demo / "test.json", require_annotations=False).images[:1]
    fold, refit_model = _Constant([2.0, 0.0, 0.0]), _Constant([0.0, 2.0, 0.0])
    geometry = Geometry("squash", TINY["augment"]["size"])
    folds = Ensemble([fold, refit_model], ["background", "a", "b"], geometry, [{}, {}])

    def merged(shares: list[float] | None) -> torch.Tensor:
        member = Member("unet", folds, "none", shares)
        stream = predict_members(
            [member], torch.ones(1, 3), tiny_demo, images, [1.0], 1, 0, torch.device("cpu")
        )
        return next(iter(stream))[1][:, 0, 0]

    p_fold, p_refit = torch.softmax(fold.logits, 0), torch.softmax(refit_model.logits, 0)
    torch.testing.assert_close(merged([0.25, 0.75]), 0.25 * p_fold + 0.75 * p_refit)
    torch.testing.assert_close(merged(None), 0.5 * p_fold + 0.5 * p_refit)
