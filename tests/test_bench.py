"""Smoke runs of every benchmark at toy sizes: each must reach its verdict line (figures not judged)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import params_from_overlay

ROOT = Path(__file__).resolve().parents[1]

# script -> (its toy-size arguments, a pattern its verdict line must match)
RUNS = {
    "elastic": ("--size 64 --images 2 --repeats 1", r"FastElastic vs approximate: [\d.]+x"),
    "loader": ("--images 4 --size 64 --batch-size 2 --repeats 1", r"loader: [\d.]+ images/s per core"),
    "codec": ("--sizes 64 --masks 2 --repeats 1", r"decode \(text -> mask\)\s+[\d.]+\s+[\d.]+"),
    "metrics": ("--size 64 --images 2 --repeats 1", r"numpy path vs sklearn: [\d.]+x faster"),
    "calibration": (
        "--height 24 --width 32 --stored 8 --classes 4 --images 1 --repeats 1",
        r"scale trials vs general: [\d.]+x faster",
    ),
    "predict": (
        "--images 2 --image-size 64 --input-size 32 --out-size 64 --folds 1 --repeats 1 --batch-size 2",
        r"peak RSS ratio 4N/N [\d.]+",
    ),
    "native": ("--size 200x150 --short-side 64 --classes 3", r"200x150 costs -?\d+ MB more than 20x15"),
    "cpu_precision": (
        "--size 64 --batch-size 2 --repeats 1",
        r"AdamW step, fused +[\d.]+ ms +\([\d.]+x looped\)\s+bf16 autocast vs float32: [\d.]+x",
    ),
    "train_gpu": (
        "--device cpu --arch Unet --encoder resnet18 --size 64 --batch-size 2 --workers 1 --steps 2 "
        "--repeats 1 --images 4",
        r"real / synthetic = [\d.]+ \(target >= 0.9\): not judged",
    ),
}


def _run(script: str, args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args.split()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.bench
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_to_its_verdict(script: str) -> None:
    args, verdict = RUNS[script]
    run = _run(script, args)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(verdict, run.stdout), run.stdout[-2000:]


@pytest.mark.bench
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_gpu_benchmark_skips_without_cuda() -> None:
    run = _run("train_gpu", "")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("skipped: no CUDA device")


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """bench/recipe.py and bench/ablation.py as modules (they import their siblings by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("recipe"), importlib.import_module("ablation")


def _repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_workspace_params_keep_one_recipe_on_one_fold_at_native_size(bench_modules: tuple) -> None:
    recipe, _ = bench_modules
    raw = _repo_params()
    first, second = list(raw["models"])[:2]
    raw["models"][first]["train"] = {"epochs": 7, "lr": 0.002}

    params = recipe.with_epochs(recipe.workspace_params(raw, Path("/data"), [1], 3), 2)

    assert list(params["models"]) == [first]
    assert params["models"][first]["train"] == {"lr": 0.002}  # its own epochs give way to the benchmark's
    assert params["ensemble"]["folds"] == [1] and params["split"]["n_splits"] == 3
    assert params["submission"]["size"] is None and params["data"]["root"] == "/data"
    resolved = params_from_overlay(params).recipe(first)
    assert resolved.train.epochs == 2 and resolved.train.lr == 0.002
    assert list(recipe.workspace_params(raw, Path("/data"), [0], 3, [second])["models"]) == [second]
    with pytest.raises(SystemExit, match="no model recipe 'nope'"):
        recipe.workspace_params(raw, Path("/data"), [0], 3, ["nope"])
    # Params of the old layout (the fold list under train) are refused with the config's message.
    raw["train"]["folds"] = [0]
    with pytest.raises(SystemExit, match=r"unknown key 'train\.folds'"):
        recipe.workspace_params(raw, Path("/data"), [0], 3)


def test_ablation_overrides_set_shared_recipe_and_nested_keys(bench_modules: tuple) -> None:
    recipe, ablation = bench_modules
    raw = _repo_params()
    raw["models"] = {"unet": {}, "fpn": {"model": {"arch": "FPN"}}}
    base = recipe.workspace_params(raw, Path("/data"), [0, 1], 3, "all")
    overrides = ablation.parse_overrides(
        ["train.lr=0.02", "models.fpn.train.lr=0.005", "models.fpn.train.losses.ce=0.5", "predict.tta=none"]
    )

    params = params_from_overlay(ablation.apply(base, overrides, "--variant v"))

    unet, fpn = params.recipe("unet"), params.recipe("fpn")
    assert unet.train.lr == 0.02 and fpn.train.lr == 0.005
    # A nested key of one recipe starts from what that recipe had: only `ce` changes.
    assert fpn.train.losses == {"ce": 0.5, "dice": 1.0} and unet.train.losses == {"ce": 1.0, "dice": 1.0}
    assert params.predict.tta == "none"
    assert not ablation.reuses_baseline(overrides)
    assert ablation.reuses_baseline({"predict.tta": "none", "ensemble.grid_step": 0.5})
    for bad, message in [
        ("models.nope.train.lr=1", "not a recipe trained here"),
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("models.fpn.train.lr=fast", "must be a number"),
    ]:
        with pytest.raises(SystemExit, match=message):
            ablation.apply(base, ablation.parse_overrides([bad]), "--variant v")
    for bad in ("ensemble.folds=[0]", "train", "models.fpn=1"):
        with pytest.raises(SystemExit):
            ablation.parse_overrides([bad])


def _step(oof: float, folds: list[float], test: float) -> dict:
    return {
        "oof_miou": oof,
        "in_sample_miou": oof + 0.01,
        "oof_folds": {str(k): v for k, v in enumerate(folds)},
        "oof_iou": {"bg": 0.9, "x": oof},
        "leaderboard_miou": test,
        "leaderboard_iou": {"bg": 0.9, "x": test},
    }


def test_decisions_summary_pairs_steps_by_seed_and_fold(bench_modules: tuple) -> None:
    decisions = importlib.import_module("decisions")
    runs = [
        {
            "params": {"train": {"seed": s}},
            "steps": {"weights": _step(0.5, w, t0), "calibration": _step(0.6, c, t1)},
        }
        for s, w, c, t0, t1 in [
            (0, [0.5, 0.4], [0.6, 0.5], 0.50, 0.55),
            (1, [0.6, 0.5], [0.6, 0.6], 0.40, 0.43),
        ]
    ]
    summary = decisions.summarize(runs)
    calibration = summary["steps"]["calibration"]
    # fold differences 0.1, 0.1, 0.0, 0.1: mean 0.075, sd 0.05, t(3) 3.182 -> half width 0.0796
    assert calibration["oof_fold_diff"]["pairs"] == 4
    assert calibration["oof_fold_diff"]["mean"] == pytest.approx(0.075)
    assert calibration["oof_fold_diff"]["high"] - 0.075 == pytest.approx(3.182446 * 0.05 / 2, rel=1e-5)
    assert calibration["test_diff"]["mean"] == pytest.approx(0.04) and calibration["test_diff"]["pairs"] == 2
    assert "oof_fold_diff" not in summary["steps"]["weights"]
    assert "| calibration | 0.6000 |" in decisions.format_summary(summary)
    runs[1]["steps"].pop("calibration")
    with pytest.raises(SystemExit, match="same decision steps"):
        decisions.summarize(runs)


def test_decisions_versus_a_baseline_pairs_each_step_by_seed(bench_modules: tuple) -> None:
    decisions = importlib.import_module("decisions")

    def run(seed: int, folds: list[float], test: float) -> dict:
        return {"params": {"train": {"seed": seed}}, "steps": {"weights": _step(0.5, folds, test)}}

    candidate = [run(0, [0.6, 0.5], 0.50), run(1, [0.7, 0.5], 0.45)]
    baseline = [run(1, [0.6, 0.5], 0.40), run(0, [0.5, 0.5], 0.48)]  # any order: paired by seed
    table = decisions.versus(candidate, baseline)
    assert table["weights"]["oof_fold_diff"]["mean"] == pytest.approx(0.05)  # 0.1, 0.0, 0.1, 0.0
    assert table["weights"]["test_diff"]["mean"] == pytest.approx((0.02 + 0.05) / 2)
    with pytest.raises(SystemExit, match="no baseline run of seed 1"):
        decisions.versus(candidate, baseline[1:])


def test_decisions_refit_summary_pairs_the_refit_ensemble_with_the_folds_alone_by_seed(
    bench_modules: tuple,
) -> None:
    decisions = importlib.import_module("decisions")

    def refit(with_refit: float, folds: float) -> dict:
        return {
            "weight": 0.5,
            "with_refit": {"leaderboard_miou": with_refit},
            "folds_only": {"leaderboard_miou": folds},
        }

    summary = decisions.refit_summary([refit(0.52, 0.50), refit(0.47, 0.48), refit(0.60, 0.57)])
    assert summary["test_diff"]["mean"] == pytest.approx((0.02 - 0.01 + 0.03) / 3)
    assert summary["test_diff"]["pairs"] == 3 and summary["weight"] == [0.5]
    assert summary["with_refit"] == pytest.approx((0.52 + 0.47 + 0.60) / 3)
    assert "vs the folds alone 0.5167" in decisions.format_refit(summary)
