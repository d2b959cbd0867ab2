"""Typed params: the committed files load, and every kind of mistake names its key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, load_params, params_from_dict
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "configs/trash.yaml"])
def test_committed_params_load(path: str) -> None:
    params = load_params(ROOT / path)
    assert isinstance(params, Params)
    assert params.train.folds == list(range(params.split.n_splits))


def test_committed_params_name_every_field() -> None:
    # The demo params.yaml is the documentation of every setting: it must spell out each one.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = Params()
    for section in defaults.__dataclass_fields__:
        assert set(raw[section]) == set(getattr(defaults, section).__dataclass_fields__), section


def test_missing_sections_take_defaults() -> None:
    params = params_from_dict({"train": {"epochs": 3}})
    assert params.train.epochs == 3
    assert params.data.overlap == "area_desc"


def test_int_accepted_for_float() -> None:
    params = params_from_dict({"train": {"lr": 1}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
        ({"train": {"epochs": "ten"}}, "'train.epochs' must be an integer, got 'ten'"),
        ({"train": {"epochs": 2.5}}, "'train.epochs' must be an integer"),
        ({"train": {"amp": "yes"}}, "'train.amp' must be true or false"),
        ({"train": {"epochs": True}}, "'train.epochs' must be an integer"),
        ({"data": {"overlap": "biggest"}}, "'data.overlap' must be one of 'area_desc', 'max_class'"),
        ({"train": {"losses": {"ce": "x"}}}, "'train.losses' must be a mapping of a string to a number"),
        ({"train": {"folds": [0, "1"]}}, "'train.folds' must be a list of an integer"),
        ({"model": {"encoder_weights": 3}}, "'model.encoder_weights' must be a string or null"),
        ({"model": []}, "'model' must be a mapping"),
        ({"split": {"n_splits": 3}, "train": {"folds": [0, 3]}}, "'train.folds' names fold 3"),
        ({"split": {"n_splits": 3}, "train": {"folds": [0, 0]}}, "lists a fold twice"),
        ({"split": {"n_splits": 1}, "train": {"folds": [0]}}, "at least 2"),
        ({"augment": {"size": 100}}, "divisible by 32"),
        ({"augment": {"elastic_p_min": 0.9, "elastic_p_max": 0.1}}, "elastic_p_min"),
        ({"predict": {"fold_weights": [1.0]}}, "'predict.fold_weights' has 1 weights for 5 folds"),
    ],
)
def test_mistakes_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(UserError, match=r"^src: ") as info:
        params_from_dict(raw, source="src")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_params_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML"):
        load_params(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_params(empty) == Params()


@pytest.mark.parametrize("path", ["params.yaml", "configs/trash.yaml"])
def test_dvc_builds_the_stage_graph_with_each_committed_config(tmp_path: Path, path: str) -> None:
    # dvc.yaml interpolates params into paths: a null or mistyped one breaks every DVC command.
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / path, tmp_path / "params.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    assert subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path).returncode == 0
    dag = subprocess.run([*dvc, "dag", "--md"], cwd=tmp_path, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stderr[-2000:]
    for stage in ["masks", "split", "train@0", "predict", "evaluate", "leaderboard"]:
        assert stage in dag.stdout
