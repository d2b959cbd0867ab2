"""End to end: the real dvc.yaml and stage scripts, run by `dvc repro` on a tiny config of two models."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, Run, make_dvc_project, run_command, tiny_params, venv_env, write_params

from pipeline.data.coco import load_image_list
from pipeline.data.manifest import ImageSet
from pipeline.evaluation.submission import iter_submission
from pipeline.writer import LOCK_NAME, exclusive_writer

# Two recipes over the tiny config, as the demo has: the ensemble fits their weights on the OOF.
E2E = {
    "demo": {"n_train": 18, "n_test": 5, "max_objects": 3},
    "augment": {"vflip": 0.5},  # predict.tta flips needs both flips in training
    "model": {"decoder_channels": None},
    "models": {
        "unet": {"model": {"arch": "Unet", "decoder_channels": [32, 16, 16, 8, 8]}},
        "fpn": {"model": {"arch": "FPN"}, "train": {"lr": 0.005}},
    },
    "predict": {"tta": "flips"},
    # Every OOF decision on, so predict and the bundle apply calibration and post-processing too.
    "ensemble": {"calibrate": True, "postprocess": True},
    # A refit per recipe, which predict and the bundle then include.
    "refit": {"enabled": True, "weight": 0.3},
}


def _without_output(lock: dict, path: str) -> dict:
    """`lock` (a parsed dvc.lock) with the md5 and size of output `path` blanked."""
    lock = copy.deepcopy(lock)
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                out.update(md5=None, size=None)
    return lock


def _tiny_params() -> dict:
    return tiny_params(E2E)


def _copy_of(reproduced: Reproduced, work: Path) -> Path:
    """A copy of the reproduced project at `work`, with its params as reproduced (a test may have edited
    the original's)."""
    shutil.copytree(reproduced.work, work, symlinks=True)
    write_params(work / "params.yaml", _tiny_params())
    return work


def _stale_stages(run: Run, work: Path) -> set[str]:
    status = run(["dvc", "status"], work)
    assert status.returncode == 0, status.stderr
    return set(re.findall(r"^(\S+):\s*$", status.stdout, flags=re.MULTILINE))


@dataclass(frozen=True)
class Reproduced:
    """A tiny project after `dvc repro`, and its dvc.lock as that run left it (tests edit the project)."""

    work: Path
    lock: dict


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """One sequential `dvc repro` of the tiny config, shared by the tests of this module."""
    work = make_dvc_project(tmp_path_factory.mktemp("repro") / "project")
    write_params(work / "params.yaml", _tiny_params())
    # One thread per process: the setting under which CPU training is deterministic (see the parallel test).
    repro = run_command(["dvc", "repro"], work, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    return Reproduced(work, yaml.safe_load((work / "dvc.lock").read_text()))


@pytest.mark.slow
def test_dvc_repro_runs_every_stage(reproduced: Reproduced, run: Run) -> None:
    work = reproduced.work

    for model in ("unet", "fpn"):
        for fold in (0, 1):
            assert (work / f"models/{model}/fold{fold}/best.pt").is_file()
            assert (work / f"oof/{model}/fold{fold}.npz").is_file()
            metrics = json.loads((work / f"metrics/{model}/fold{fold}.json").read_text())
            assert set(metrics) == {"miou"} and 0.0 <= metrics["miou"] <= 1.0
        # The folds' best epochs are all 1 (1 epoch each): the refit trains 1 epoch on all 18 images.
        refit = json.loads((work / f"refits/{model}/refit.json").read_text())
        assert refit["enabled"] and refit["epochs"] == 1, refit
        assert (work / f"refits/{model}/final.pt").is_file()
    cv = json.loads((work / "reports/cv.json").read_text())
    report = json.loads((work / "ensemble/report.json").read_text())
    assert cv["n_images"] == 18
    assert cv["oof_miou"] == pytest.approx(report["ensemble"]["oof_miou"])  # evaluate re-scores the labels
    assert set(cv["models"]) == {"unet", "fpn"} and set(cv["weights"]) == {"unet", "fpn"}
    assert sum(cv["weights"].values()) == pytest.approx(1.0)
    headline = json.loads((work / "metrics/cv.json").read_text())
    assert list(headline["steps"]) == ["weights", "calibration", "postprocess"]
    assert headline["oof_miou"] == pytest.approx(headline["steps"]["postprocess"])
    board = json.loads((work / "metrics/leaderboard.json").read_text())
    assert 0.0 <= board["miou"] <= 1.0
    assert list((work / "plots/worst").glob("*.png"))
    # Headline metrics only: `dvc metrics show` fits a 160-column terminal.
    shown = run(["dvc", "metrics", "show"], work)
    assert shown.returncode == 0 and "leaderboard" in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) <= 160, shown.stdout

    submission = work / "submissions/submission.csv"
    valid = run(
        [sys.executable, "-m", "pipeline", "validate", str(submission), "--test", "data/demo/test.json"], work
    )
    assert valid.returncode == 0, valid.stdout + valid.stderr
    # rle format: one row per test image and non-background class, plus the header.
    assert len(submission.read_text().splitlines()) == 1 + 5 * 10

    again = run(["dvc", "repro"], work)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout

    # What does not shape the weights leaves every train stage alone.
    edited = _tiny_params()
    edited["predict"]["tta"] = "none"
    edited["runtime"]["num_workers"] = 1
    edited["predict"]["batch_size"] = 2
    edited["submission"]["format"] = "dense"
    write_params(work / "params.yaml", edited)
    stale = _stale_stages(run, work)
    assert not any(s.startswith("train@") for s in stale), stale
    assert {f"oof@{m}-{k}" for m in ("unet", "fpn") for k in range(2)} <= stale
    assert "predict" in stale

    # One recipe's edit re-runs that recipe's train stages only.
    edited = _tiny_params()
    edited["models"]["fpn"]["train"]["lr"] = 0.002
    write_params(work / "params.yaml", edited)
    stale = _stale_stages(run, work)
    assert {s for s in stale if s.startswith("train@")} == {"train@fpn-0", "train@fpn-1"}


@pytest.mark.slow
def test_editing_messages_leaves_every_train_stage_up_to_date_and_resumable(
    reproduced: Reproduced, tmp_path: Path, run: Run
) -> None:
    # Messages, parsing and params checking shape no weights (what they decide reaches training through
    # the params and the data bytes): an edit of one re-runs no train stage, and a train stage forced to
    # run anyway finds its finished state (the same fingerprint) instead of training again.
    work = _copy_of(reproduced, tmp_path / "project")
    for module, old, new in [
        ("pipeline/data/coco.py", "not valid JSON", "not a valid JSON file"),  # the COCO validator
        ("pipeline/config.py", "must be a mapping", "must be a YAML mapping"),  # params checking
    ]:
        text = (work / module).read_text()
        assert old in text, (module, old)
        (work / module).write_text(text.replace(old, new))
    stale = _stale_stages(run, work)
    assert stale and not any(s.startswith("train@") for s in stale), stale  # masks reads coco.py
    forced = run(["dvc", "repro", "--force", "--single-item", "train@unet-0"], work)
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
    assert "unet fold 0: all 1 epochs done; rewriting the outputs from best.pt" in forced.stdout


@pytest.mark.slow
def test_parallel_repro_ends_as_the_sequential_one(reproduced: Reproduced, tmp_path: Path, run: Run) -> None:
    # One recipe's train, oof and refit stages again, two at a time on two CPU "devices" of one thread
    # each, as the sequential run had: every output (its md5 in dvc.lock) is the sequential run's, bit for
    # bit. (One recipe rather than the whole project: the other's stages are the same code, and the
    # suite's time goes to training.)
    work = _copy_of(reproduced, tmp_path / "project")
    # No run cache, so the stages train again rather than being restored (the outputs' cache stays: an
    # output missing from it counts as changed).
    shutil.rmtree(work / ".dvc" / "cache" / "runs")
    for folder in ("models/fpn", "oof/fpn", "refits/fpn", "metrics/fpn", "dvclive/fpn"):
        shutil.rmtree(work / folder)
    command = [sys.executable, "-m", "pipeline", "parallel", "--devices", "cpu,cpu", "--threads", "1"]
    parallel = run(command, work)
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    assert "== 5 stages on 2 devices (5 up to date)" in parallel.stdout, parallel.stdout[-3000:]
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    # The test probabilities are stored as uint8 (1/255 steps): on this 2-core machine one value of
    # one image in 11 x 64 x 64 x 5 landed one step apart between the two runs (seen on the commit
    # before train.cpu_bf16 too), while every train and oof output and the submission matched bit for
    # bit. So test.npz is compared by content, to within one step, and every other output by md5.
    probabilities = "predictions/test.npz"
    assert _without_output(lock, probabilities) == _without_output(reproduced.lock, probabilities)
    with np.load(work / probabilities) as ours, np.load(reproduced.work / probabilities) as theirs:
        assert ours.files == theirs.files
        for key in ours.files:
            if ours[key].dtype == np.uint8:
                assert np.abs(ours[key].astype(int) - theirs[key].astype(int)).max() <= 1, key
            else:
                assert np.array_equal(ours[key], theirs[key]), key
    for name in ["cv.json", "leaderboard.json"]:
        assert (work / "metrics" / name).read_text() == (reproduced.work / "metrics" / name).read_text()

    again = run(command, work)
    assert again.returncode == 0 and "== 0 stages on 2 devices (10 up to date)" in again.stdout
    assert "Running stage" not in again.stdout + again.stderr


def _stage_outs(lock: dict, stage: str) -> dict[str, str]:
    """{path: md5} of a stage's outputs in a parsed dvc.lock."""
    return {out["path"]: out["md5"] for out in lock["stages"][stage]["outs"]}


@pytest.mark.slow
def test_killing_dvc_mid_training_kills_the_stage_and_the_rerun_ends_as_an_uninterrupted_one(
    reproduced: Reproduced, tmp_path: Path, run: Run
) -> None:
    # DVC's lock belongs to the dvc process: a train stage that outlived a killed dvc would be a second
    # writer of its fold beside the re-run. It dies with dvc instead, and the re-run ends bit for bit
    # where the uninterrupted run did (one thread, as there).
    work = _copy_of(reproduced, tmp_path / "project")
    fold = work / "models" / "unet" / "fold0"
    shutil.rmtree(fold)  # train@unet-0 must train again
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", "train@unet-0"]
    dvc = subprocess.Popen(command, cwd=work, env={**venv_env(), **threads}, stdout=subprocess.DEVNULL)
    lock = fold / LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()):
        assert dvc.poll() is None and time.monotonic() < deadline, "the train stage never took its folder"
        time.sleep(0.02)
    trainer = int(lock.read_text().split()[1])  # "pid N on HOST"
    assert _alive(trainer)
    dvc.kill()
    dvc.wait()
    deadline = time.monotonic() + 15
    while _alive(trainer):
        assert time.monotonic() < deadline, f"train stage {trainer} outlived its dvc"
        time.sleep(0.05)

    # While another process holds the folder, a train stage refuses to start, in one line.
    with exclusive_writer(fold):
        held = run(["dvc", "repro", "--single-item", "train@unet-0"], work)
    assert held.returncode != 0
    assert f"{fold.relative_to(work)}: another process is writing this folder (pid {os.getpid()}" in (
        held.stdout + held.stderr
    )

    again = run_command(["dvc", "repro", "--single-item", "train@unet-0"], work, threads)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ours = _stage_outs(yaml.safe_load((work / "dvc.lock").read_text()), "train@unet-0")
    assert ours == _stage_outs(reproduced.lock, "train@unet-0")
    assert sorted(p.name for p in fold.iterdir()) == ["best.pt", "last.pt"]  # no temp file, no lock


@pytest.mark.slow
def test_an_exported_bundle_predicts_the_same_submission_offline(
    reproduced: Reproduced, tmp_path: Path, run: Run
) -> None:
    # A code competition's notebook: the bundle's zip, the test images and trashseg installed from its
    # wheel; no checkout, no DVC, no params file. Its CSV must be the predict stage's, byte for byte.
    work = _copy_of(reproduced, tmp_path / "project")
    exported = run([sys.executable, "-m", "pipeline", "export", str(tmp_path / "bundle")], work)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    # Each member's two folds and its refit model, which has refit.weight of the member's share.
    for member in json.loads((tmp_path / "bundle/bundle.json").read_text())["members"]:
        assert [Path(c).name for c in member["checkpoints"]] == ["fold0.pt", "fold1.pt", "refit.pt"]
        assert member["shares"] == pytest.approx([0.35, 0.35, 0.3])
    notebook = tmp_path / "notebook"
    (notebook / "test").mkdir(parents=True)
    shutil.copy(tmp_path / "bundle.zip", notebook)
    test_json = work / "data/demo/test.json"
    for image in json.loads(test_json.read_text())["images"]:
        (notebook / "test" / image["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / "data/demo" / image["file_name"], notebook / "test" / image["file_name"])
    shutil.copy(test_json, notebook / "test")
    site = _installed_wheel(tmp_path / "wheel")
    offline = _offline(site)

    done = offline(["predict-bundle", "bundle.zip", "test/test.json", "submission.csv"], notebook)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = (work / "submissions/submission.csv").read_bytes()
    assert (notebook / "submission.csv").read_bytes() == expected
    assert json.loads((notebook / "submission.json").read_text())["rle_order"] == "column"
    # A folder of images is read in name order: the same rows.
    done = offline(["predict-bundle", "bundle.zip", "test", "by_folder.csv"], notebook)
    assert done.returncode == 0, done.stdout + done.stderr
    by_folder = (notebook / "by_folder.csv").read_text().splitlines()
    assert by_folder[0] == expected.decode().splitlines()[0]
    assert sorted(by_folder[1:]) == sorted(expected.decode().splitlines()[1:])

    # The ONNX engine (onnxruntime on the CPU) agrees with torch on >= 99.9 % of the pixels.
    with_onnx = run([sys.executable, "-m", "pipeline", "export", str(tmp_path / "onnx"), "--onnx"], work)
    assert with_onnx.returncode == 0, with_onnx.stdout + with_onnx.stderr
    shutil.copy(tmp_path / "onnx.zip", notebook)
    done = offline(["predict-bundle", "onnx.zip", "test/test.json", "onnx.csv", "--engine", "onnx"], notebook)
    assert done.returncode == 0, done.stdout + done.stderr
    classes = json.loads((tmp_path / "onnx/bundle.json").read_text())["classes"]
    test = ImageSet(load_image_list(test_json), len(classes))
    size = _tiny_params()["submission"]["size"]
    ours = dict(iter_submission(notebook / "onnx.csv", test, size))
    agree = [
        (mask == ours[name]).mean() for name, mask in iter_submission(notebook / "submission.csv", test, size)
    ]
    assert len(agree) == len(test.images) and np.mean(agree) >= 0.999, agree

    # A tampered file and a time limit it cannot make: one line each, exit 2 (a user error), no CSV.
    shutil.unpack_archive(notebook / "bundle.zip", notebook / "tampered", "zip")
    checkpoint = next((notebook / "tampered/models").rglob("*.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    for args, message in [
        (
            ["tampered", "test", "t.csv"],
            f"{checkpoint.name}: SHA-256 differs from the one bundle.json records",
        ),
        (["bundle.zip", "test", "t.csv", "--time-limit", "0.001"], "stopped, no submission written"),
    ]:
        refused = offline(["predict-bundle", *args], notebook)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in refused.stderr  # beside the progress bar
        assert not (notebook / "t.csv").exists()

    # A member the ensemble gave no weight is left out of the bundle.
    weights = json.loads((work / "ensemble/weights.json").read_text())
    weights["weights"] = [[0.0] * len(weights["classes"]), [1.0] * len(weights["classes"])]
    (work / "ensemble/weights.json").write_text(json.dumps(weights))
    again = run([sys.executable, "-m", "pipeline", "export", str(tmp_path / "bundle")], work)
    assert again.returncode == 0 and f"left out (zero weight): {weights['members'][0]}" in again.stdout
    spec = json.loads((tmp_path / "bundle/bundle.json").read_text())
    assert [m["name"] for m in spec["members"]] == weights["members"][1:]
    assert sorted(spec["files"]) == sorted(p.relative_to(tmp_path / "bundle").as_posix()
                                           for p in (tmp_path / "bundle/models").rglob("*.pt"))  # fmt: skip


def _installed_wheel(folder: Path) -> Path:
    """trashseg built as a wheel and unpacked into `folder/site`, as `pip install` lays it out. Built from
    a copy of its sources (a build writes beside them)."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        "dist",
        "./source",  # a path: a bare name is looked up on the package index
    ]
    built = run_command(wheel, folder)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (folder / "dist").glob("trashseg-*.whl")
    shutil.unpack_archive(path, folder / "site", "zip")
    return folder / "site"


def _offline(site: Path) -> Run:
    """`python -m pipeline ARGS` with trashseg imported from `site` only and DVC not importable."""
    code = (
        "import sys; sys.modules['dvc'] = None; import pipeline; "
        f"assert pipeline.__file__.startswith({str(site)!r}), pipeline.__file__; "
        "import runpy; runpy.run_module('pipeline', run_name='__main__', alter_sys=True)"
    )

    def offline(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return run_command([sys.executable, "-c", code, *args], cwd, {"PYTHONPATH": str(site)})

    return offline


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False
