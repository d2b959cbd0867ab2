"""bench/realsets.py: its statistics on hand-sized numbers, and one end-to-end run on two tiny sets."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from conftest import tiny_params
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def realsets(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("realsets")


def test_t_interval_matches_scipy(realsets: ModuleType) -> None:
    values = [0.1, 0.3, 0.2, 0.25]
    mean, low, high = realsets.t_interval(values)
    expected = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(0.2125)
    assert (low, high) == pytest.approx(expected)


def test_t_interval_of_one_value_has_no_bounds(realsets: ModuleType) -> None:
    mean, low, high = realsets.t_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)


def test_ratio_interval_is_the_geometric_mean_of_paired_ratios(realsets: ModuleType) -> None:
    # Ratios 2 and 0.5: geometric mean 1; the log ratios +-ln 2 give a wide interval around it.
    ratio, low, high = realsets.ratio_interval([0.4, 0.1], [0.2, 0.2])
    assert ratio == pytest.approx(1.0)
    half = stats.t.ppf(0.975, 1) * np.std([math.log(2), -math.log(2)], ddof=1) / math.sqrt(2)
    assert (low, high) == pytest.approx((math.exp(-half), math.exp(half)))
    # Identical ratios: a zero-width interval at that ratio.
    assert realsets.ratio_interval([0.3, 0.6], [0.2, 0.4]) == pytest.approx((1.5, 1.5, 1.5))
    # A plain score of 0 leaves the ratio undefined rather than infinite.
    assert all(math.isnan(v) for v in realsets.ratio_interval([0.3], [0.0]))


def test_calibration_fits_epochs_and_validations_into_the_budget(realsets: ModuleType) -> None:
    calibration = realsets.Calibration(train_seconds=40.0, val_seconds=5.0, overhead_seconds=30.0)
    # 13 epochs validated at 5, 10 and 13: 30 + 520 + 15 = 565 s; 14 would be 605 s.
    assert calibration.stage_seconds(13, 5) == 565.0
    assert calibration.epochs(600.0, val_every=5) == 13
    # Validating every epoch: 12 epochs are 30 + 480 + 60 = 570 s; 13 would be 615 s.
    assert calibration.epochs(600.0, val_every=1) == 12
    # A budget shorter than one epoch still trains one.
    assert calibration.epochs(10.0, val_every=1) == 1


def test_calibration_averages_the_timed_epoch_lines(realsets: ModuleType) -> None:
    from pipeline.progress import epoch_line

    lines = [
        "Running stage 'train@unet-0':\n",
        epoch_line("unet fold 0", 1, 2, 0.9, 0.1, 1e-3, 50.0, 6.0) + "\n",
        # After a progress bar's carriage return, as the stage's log holds it.
        "epoch 2/2:  50%|#####     | 3/6\r" + epoch_line("unet fold 0", 2, 2, 0.8, 0.2, 1e-3, 45.0, 5.0),
    ]
    # Epochs of 47.5 s on average, 5.5 s of it validating; 120 - 2 x 47.5 = 25 s once.
    calibration = realsets.calibration_from_lines(lines, stage_seconds=120.0)
    assert calibration == realsets.Calibration(train_seconds=42.0, val_seconds=5.5, overhead_seconds=25.0)
    untimed = [epoch_line("unet fold 0", e, 2, 0.9, 0.1, 1e-3) for e in (1, 2)]
    with pytest.raises(SystemExit, match="no timed epoch lines"):
        realsets.calibration_from_lines(untimed, stage_seconds=120.0)
    with pytest.raises(SystemExit, match="no timed epoch lines"):
        realsets.calibration_from_lines(lines[:2], stage_seconds=120.0)


def test_geometric_mean_interval_over_sets(realsets: ModuleType) -> None:
    logs = [[math.log(1.2), math.log(1.4)], [math.log(0.9), math.log(1.1)]]
    ratio, low, high = realsets.geometric_mean_interval(logs)
    centre = (np.mean(logs[0]) + np.mean(logs[1])) / 2
    assert ratio == pytest.approx(math.exp(centre))
    assert low < ratio < high
    # One pair in a set: a point estimate only.
    ratio, low, high = realsets.geometric_mean_interval([[math.log(2.0)], [0.0, 0.0]])
    assert ratio == pytest.approx(math.sqrt(2.0)) and math.isnan(low) and math.isnan(high)


def test_mean_over_sets_interval_ignores_the_spread_between_sets(realsets: ModuleType) -> None:
    # Two sets whose differences sit far apart but agree within each: the spread between the sets
    # is not noise of the mean over these sets, so the interval stays narrow.
    mean, low, high = realsets.mean_over_sets_interval([[0.01, 0.03], [0.09, 0.11]])
    assert mean == pytest.approx(0.06)
    # Equal variances (sd 0.01414 / sqrt 2 = 0.01 each): se = 0.01 / sqrt 2, dof = 2.
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(2)
    assert (low, high) == pytest.approx((0.06 - half, 0.06 + half))
    assert high - low < 0.09 - 0.01
    assert math.isnan(realsets.mean_over_sets_interval([[0.1], [0.2, 0.3]])[1])


def test_a_cached_run_ignores_the_files_epochs_but_not_a_setting(
    realsets: ModuleType, tmp_path: Path
) -> None:
    params = tiny_params()
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"params": params, "seed": 0}))
    # The harness sets the epochs from the budget: the file's count shapes nothing the record holds.
    more = json.loads(json.dumps(params))
    more.setdefault("train", {})["epochs"] = 99
    assert realsets.cached(path, more, seed=0)
    other = json.loads(json.dumps(params))
    other.setdefault("augment", {})["size"] = 96 if params.get("augment", {}).get("size") != 96 else 64
    assert not realsets.cached(path, other, seed=0)
    assert not realsets.cached(path, more, seed=1)


def test_class_counts_use_the_truth_classes(realsets: ModuleType) -> None:
    iou = {"background": 0.9, "a": 0.0, "b": 0.15, "c": 0.5, "d": None}
    # d is in the truth but unscored (never predicted): it counts as 0; background never counts.
    assert realsets.class_counts(iou, ["a", "b", "c", "d"]) == (2, 1, 4)


def _record(real: str, recipe: str, seed: int, fold: int, miou: float) -> dict:
    return {
        "set": real,
        "recipe": recipe,
        "seed": seed,
        "fold": fold,
        "miou": miou,
        "epochs": 3,
        "iou": {"background": 0.9, "x": miou},
        "truth_classes": ["x"],
    }


def test_summary_pairs_runs_by_seed_and_fold(realsets: ModuleType) -> None:
    records = [
        _record("s1", "plain", 0, 0, 0.2),
        _record("s1", "plain", 1, 0, 0.4),
        _record("s1", "cand", 0, 0, 0.3),
        _record("s1", "cand", 1, 0, 0.4),
        _record("s1", "ref", 0, 0, 0.25),
        _record("s1", "ref", 1, 0, 0.3),
        # A second set with one plain run: the candidate's unpaired run has no ratio there.
        _record("s2", "plain", 0, 0, 0.5),
        _record("s2", "cand", 0, 0, 0.5),
        _record("s2", "cand", 1, 0, 0.6),
    ]
    summary = realsets.summarize(records, ["cand", "ref"], "ref")
    row = summary["sets"]["s1"]["cand"]
    assert row["n"] == 2 and row["n_paired"] == 2
    assert row["ratio"] == pytest.approx(math.sqrt(1.5 * 1.0))
    assert row["diff_to_reference"] == pytest.approx(((0.3 - 0.25) + (0.4 - 0.3)) / 2)
    assert row["classes_above_0_2"] == 1.0
    assert summary["sets"]["s2"]["cand"]["n_paired"] == 1
    assert summary["sets"]["s2"]["cand"]["ratio"] == pytest.approx(1.0)
    # cand has pairs on both sets; ref has none on s2, so no ratio over the sets.
    assert summary["overall"]["cand"]["sets"] == 2
    assert "ref" not in summary["overall"]
    # ref has no run on s2: no difference to it averaged over the sets.
    assert "diff_to_reference" not in summary["overall"]["cand"]
    text = realsets.format_summary(summary, 10)
    assert "### s1 (10 min per run)" in text and "| cand | 2 |" in text


def test_summary_averages_the_difference_to_the_reference_over_sets(realsets: ModuleType) -> None:
    records = []
    for real, base in [("s1", 0.3), ("s2", 0.5)]:
        for seed, (cand, ref) in enumerate(
            [(0.05, 0.0), (0.07, 0.0)] if real == "s1" else [(0.0, 0.01), (0.0, 0.03)]
        ):
            records += [
                _record(real, "plain", seed, 0, base),
                _record(real, "cand", seed, 0, base + cand),
                _record(real, "ref", seed, 0, base + ref),
            ]
    summary = realsets.summarize(records, ["cand", "ref"], "ref")
    overall = summary["overall"]["cand"]
    # s1: +0.05, +0.07 (mean +0.06); s2: -0.01, -0.03 (mean -0.02); over the sets +0.02.
    assert overall["diff_to_reference"] == pytest.approx(0.02)
    expected = realsets.mean_over_sets_interval([[0.05, 0.07], [-0.01, -0.03]])
    assert (overall["diff_low"], overall["diff_high"]) == pytest.approx(expected[1:])
    assert "diff_to_reference" not in summary["overall"]["ref"]
    assert "| cand | 2 | " in realsets.format_summary(summary, 10).split("Over the sets")[1]


def test_the_machine_names_the_cpu_its_cores_and_bf16(realsets: ModuleType) -> None:
    info = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    )
    machine = realsets.this_machine.__wrapped__  # not the cached one: each text its own answer
    cores = len(os.sched_getaffinity(0))
    assert machine(info) == f"AuthenticAMD family 25 model 17, {cores} cores, native bf16"
    assert machine(info.replace(" avx512_bf16", "")).endswith(", no native bf16")
    assert machine(info.replace("model\t\t: 17", "model\t\t: 1")) != machine(info)


def test_records_of_another_machine_are_neither_summarised_nor_mixed(
    realsets: ModuleType, tmp_path: Path
) -> None:
    for name, machine in [("here", "m1"), ("there", "m2"), ("old", None)]:
        record = _record("s1", name, 0, 0, 0.5) | {"minutes": 10.0}
        if machine is not None:
            record["machine"] = machine
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    load = realsets.load_records
    assert [r["recipe"] for r in load(tmp_path, ["s1"], 10.0, [0], [0], "m1")] == ["here"]
    assert [r["recipe"] for r in load(tmp_path, ["s1"], 10.0, [0], [0], realsets.UNRECORDED)] == ["old"]


def test_reference_epochs_need_a_reference_and_another_candidate(realsets: ModuleType) -> None:
    base = ["--recipe", "a=params.yaml", "--recipe", "b=params.yaml"]
    assert realsets.parse_args([*base, "--reference", "a", "--reference-epochs", "b"]).reference_epochs == [
        "b"
    ]
    for extra in (["--reference-epochs", "b"], ["--reference", "a", "--reference-epochs", "a"]):
        with pytest.raises(SystemExit):
            realsets.parse_args([*base, *extra])


def test_bad_recipe_specs_exit_with_one_line(realsets: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="is not NAME=PARAMS_FILE"):
        realsets.read_candidates(["nofile"], [])
    with pytest.raises(SystemExit, match="no params file"):
        realsets.read_candidates([f"a={tmp_path / 'missing.yaml'}"], [])
    with pytest.raises(SystemExit, match="the harness sets it"):
        realsets.read_candidates([f"a={ROOT / 'params.yaml'}"], [["a", "train.seed=3"]])
    with pytest.raises(SystemExit, match="no --recipe of that name"):
        realsets.read_candidates([f"a={ROOT / 'params.yaml'}"], [["b", "train.lr=0.1"]])
    with pytest.raises(SystemExit, match=r"no test_truth\.json"):
        (tmp_path / "set").mkdir()
        (tmp_path / "set" / "train.json").write_text("{}")
        (tmp_path / "set" / "test.json").write_text("{}")
        realsets.find_sets([tmp_path / "set"])


@pytest.mark.bench
@pytest.mark.slow
def test_harness_runs_pairs_reuses_them_and_records_no_machine_path(
    tiny_demo: Path, tmp_path: Path, realsets: ModuleType
) -> None:
    # One set (named: the harness keys its records by it); the statistics over sets are tested above.
    shutil.copytree(tiny_demo, tmp_path / "tiny-a")
    sets = [str(tmp_path / "tiny-a")]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_params()))
    out = tmp_path / "out"
    args = [f"--recipe=a={tmp_path / 'tiny.yaml'}", "--sets", *sets, "--seeds", "0", "--folds", "1"]
    args += ["--n-splits", "3", "--minutes", "0.02", "--out", str(out), "--work", str(tmp_path / "work")]
    args += ["--summary-json", str(tmp_path / "summary.json")]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, str(ROOT / "bench" / "realsets.py"), *args]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    records = sorted(out.glob("*.json"))
    tag = realsets.machine_tag()  # this machine's: a run elsewhere writes another name
    assert [p.name for p in records] == [f"tiny-a-{r}-s0-f1-0.02min-{tag}.json" for r in ("a", "plain")]
    for path in records:
        text = path.read_text()
        assert str(tmp_path) not in text, f"{path.name} holds a machine path"
        record = json.loads(text)
        assert len(record["manifest_sha256"]) == 64 and 0 <= record["miou"] <= 1
        assert " cores, " in record["machine"]
    candidate = json.loads((out / f"tiny-a-a-s0-f1-0.02min-{tag}.json").read_text())
    assert candidate["params"]["train"]["seed"] == 0
    assert candidate["params"]["ensemble"]["folds"] == [1]
    assert candidate["params"]["data"]["train_json"] == "tiny-a/train.json"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["sets"]) == {"tiny-a"}
    assert "| a | 1 |" in run.stdout

    # A second call finds every run recorded and trains nothing.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "calibrating" not in again.stdout

    # A candidate whose epochs cost the reference's takes its epoch count instead of calibrating.
    same = [*command, f"--recipe=b={tmp_path / 'tiny.yaml'}", "--override", "b", "train.lr=0.002"]
    same += ["--reference", "a", "--reference-epochs", "b"]
    third = subprocess.run(same, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "b: calibrating" not in third.stdout
    taken = json.loads((out / f"tiny-a-b-s0-f1-0.02min-{tag}.json").read_text())
    assert taken["epochs"] == candidate["epochs"] and taken["epochs_from"] == "a"
    assert taken["calibration"] is None and candidate.get("epochs_from") is None
    calibration = candidate["calibration"]
    assert calibration["method"] == "epoch-lines" and calibration["train_seconds"] > 0

    # A plain run recorded on another machine is not reused here: its minutes bought other epochs.
    plain = out / f"tiny-a-plain-s0-f1-0.02min-{tag}.json"
    plain.write_text(json.dumps(json.loads(plain.read_text()) | {"machine": "another machine"}))
    fourth = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert "plain seed 0 fold 1: training" in fourth.stdout and "a: calibrating" not in fourth.stdout
    assert json.loads(plain.read_text())["machine"] == candidate["machine"]

    # Another seed: the candidate's recorded calibration sets its epochs (no second calibration).
    seed1 = list(command)
    seed1[seed1.index("--seeds") + 1] = "1"
    fifth = subprocess.run(seed1, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fifth.returncode == 0, fifth.stdout[-3000:] + fifth.stderr[-3000:]
    assert "a seed 1 fold 1:" in fifth.stdout and "a: calibrating" not in fifth.stdout
    other = json.loads((out / f"tiny-a-a-s1-f1-0.02min-{tag}.json").read_text())
    assert other["calibration"] == candidate["calibration"]
    assert other["epochs"] == candidate["epochs"]

    # Records from before the epoch lines were timed hold seconds_per_epoch: a later seed trains the
    # epoch count it sets (1.2 s of budget / 0.5 s: 2 epochs), so a candidate's pairs stay alike.
    for path in out.glob(f"tiny-a-a-s*-f1-0.02min-{tag}.json"):
        record = json.loads(path.read_text())
        del record["calibration"]
        path.write_text(json.dumps(record | {"seconds_per_epoch": 0.5}))
    seed1[seed1.index("--seeds") + 1] = "2"
    sixth = subprocess.run(seed1, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sixth.returncode == 0, sixth.stdout[-3000:] + sixth.stderr[-3000:]
    assert "a seed 2 fold 1: 2 epochs" in sixth.stdout and "a: calibrating" not in sixth.stdout
    legacy = json.loads((out / f"tiny-a-a-s2-f1-0.02min-{tag}.json").read_text())
    assert legacy["calibration"]["method"] == "two-runs" and legacy["epochs"] == 2
