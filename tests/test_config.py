"""Typed params: the committed files load, and every kind of mistake names its key."""

from __future__ import annotations

import ast
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    RECIPE_SECTIONS,
    complete,
    load_overlay,
    load_params,
    missing_keys,
    overlay_of,
    params_from_dict,
    params_from_overlay,
    params_to_dict,
    render_params,
)
from pipeline.ensemble.steps import seed_groups
from pipeline.errors import UserError
from pipeline.orchestration.cli import main
from pipeline.training.resume import WEIGHT_MODULES

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = ["configs/demo.yaml", "configs/trash.yaml", "configs/real-cpu.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_each_shipped_config_completes_to_params_training_uses(path: str) -> None:
    params = load_overlay(ROOT / path)
    assert params.ensemble.folds == list(range(params.split.n_splits))
    assert len(params.models) >= 2  # every shipped config ensembles two models
    # What training reads (the resolved recipe) is what the complete file says, key for key.
    raw = complete(yaml.safe_load((ROOT / path).read_text()))
    for name, recipe in params.models.items():
        for section in RECIPE_SECTIONS:
            own = raw["models"][name].get(section, {})
            assert getattr(recipe, section).model_dump() == {**raw[section], **own}, (name, section)


@pytest.mark.parametrize("path", CONFIGS)
def test_overlays_hold_only_what_differs_from_the_defaults(path: str) -> None:
    raw = yaml.safe_load((ROOT / path).read_text())
    assert overlay_of(complete(raw)) == raw


def test_params_yaml_is_what_the_params_command_writes_from_the_demo_overlay(tmp_path: Path) -> None:
    # One source: params.yaml is configs/demo.yaml over the defaults, every key spelled out and commented.
    main(["params", str(ROOT / "configs/demo.yaml"), "--out", str(tmp_path / "params.yaml")])
    written = (tmp_path / "params.yaml").read_text()
    committed = (ROOT / "params.yaml").read_text()
    assert written.replace(str(ROOT / "configs/demo.yaml"), "configs/demo.yaml") == committed
    raw = yaml.safe_load(committed)
    assert not missing_keys(raw)
    assert render_params(raw, []).count("#") >= 30  # the fields' descriptions document the file


def test_a_params_file_that_leaves_a_key_out_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["train"]["ema"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        UserError, match=r"params.yaml: missing key 'train.ema' \(1 missing; .*python -m pipeline params"
    ):
        load_params(path)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(UserError, match="missing key 'demo'"):
        load_params(tmp_path / "empty.yaml")


def test_an_overlay_is_completed_from_the_defaults() -> None:
    params = params_from_overlay({"train": {"epochs": 3}})
    assert params.train.epochs == 3
    assert params.data.overlap == "area_desc"
    assert list(params.models) == ["model"]


def test_recipes_override_the_shared_sections() -> None:
    params = params_from_overlay(
        {
            "train": {"lr": 0.01, "epochs": 4},
            "model": {"encoder": "resnet18"},
            "models": {
                "unet": {"model": {"arch": "Unet"}},
                "fpn": {"model": {"arch": "FPN"}, "train": {"lr": 0.1}},
            },
        }
    )
    assert list(params.models) == ["unet", "fpn"]
    fpn, unet = params.recipe("fpn"), params.recipe("unet")
    assert (fpn.model.arch, fpn.model.encoder, fpn.train.lr, fpn.train.epochs) == ("FPN", "resnet18", 0.1, 4)
    assert (unet.model.arch, unet.train.lr) == ("Unet", 0.01)
    with pytest.raises(UserError, match="no model recipe 'deeplab' in 'models' \\(defined: unet, fpn\\)"):
        params.recipe("deeplab")


def test_params_round_trip_through_a_dict() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params_from_dict(params_to_dict(params)) == params


def test_int_accepted_for_float() -> None:
    params = params_from_overlay({"train": {"lr": 1}})
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
        ({"ensemble": {"folds": [0, "1"]}}, "'ensemble.folds' must be a list of an integer"),
        ({"model": {"encoder_weights": 3}}, "'model.encoder_weights' must be a string or null"),
        ({"model": []}, "'model' must be a mapping"),
        ({"split": {"n_splits": 3}, "ensemble": {"folds": [0, 3]}}, "'ensemble.folds' names fold 3"),
        ({"split": {"n_splits": 3}, "ensemble": {"folds": [0, 0]}}, "must list each fold once"),
        ({"split": {"n_splits": 1}, "ensemble": {"folds": [0]}}, "at least 2"),
        ({"ensemble": {"grid_step": 0.3}}, "'ensemble.grid_step' must be 1/n for an integer n"),
        ({"train": {"num_workers": 2}}, "unknown key 'train.num_workers'"),
        ({"runtime": {"num_workers": -1}}, "'runtime.num_workers' must be at least 0"),
        ({"runtime": {"nnodes": 0}}, "'runtime.nnodes' must be at least 1, got 0"),
        ({"runtime": {"rdzv_endpoint": "node0"}}, "'runtime.rdzv_endpoint' must be host:port of node 0"),
        ({"models": {"a": {"train": {"lr": -1}}}}, "'models.a.train.lr' must be greater than 0"),
        ({"models": {"a": {"trian": {}}}}, "unknown key 'models.a.trian'"),
        ({"models": {"a": {"model": {"arch_": "FPN"}}}}, "unknown key 'models.a.model.arch_'"),
        ({"models": {"a": {"augment": {"size": 100}}}}, "'models.a.augment.size' must be divisible by 32"),
        ({"models": {"a-b": {}}}, "model name 'a-b' must be letters, digits and _"),
        ({"models": {}}, "'models' must map recipe names"),
        ({"augment": {"size": 100}}, "divisible by 32"),
        ({"augment": {"elastic_p_min": 0.9, "elastic_p_max": 0.1}}, "elastic_p_min"),
        ({"train": {"grad_clip": -1}}, "'train.grad_clip' must be greater than 0, got -1"),
        ({"train": {"lr": 0}}, "'train.lr' must be greater than 0"),
        ({"train": {"seed": -1}}, "'train.seed' must be at least 0, got -1"),
        ({"train": {"max_batches": 0}}, "'train.max_batches' must be at least 1, got 0"),
        ({"train": {"epochs": 0}}, "'train.epochs' must be at least 1, got 0"),
        ({"train": {"class_weights": [0, 0]}}, "'train.class_weights' must be all >= 0, some > 0"),
        ({"train": {"losses": {"ce": 0.0}}}, "'train.losses' must be weights all >= 0, some > 0"),
        ({"augment": {"elastic_sigma": 0}}, "'augment.elastic_sigma' must be greater than 0"),
        ({"augment": {"size": 0}}, "'augment.size' must be greater than 0"),
        ({"augment": {"hflip": 1.5}}, "'augment.hflip' must be between 0 and 1, got 1.5"),
        ({"predict": {"scales": []}}, "'predict.scales' must be non-empty"),
        ({"predict": {"batch_size": 0}}, "'predict.batch_size' must be at least 1"),
        ({"submission": {"size": 0}}, "'submission.size' must be greater than 0, got 0"),
        ({"model": {"decoder_channels": []}}, "'model.decoder_channels' must be non-empty"),
    ],
)
def test_mistakes_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(UserError, match=r"^src: ") as info:
        params_from_overlay(raw, source="src")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_params_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize("path", CONFIGS)
def test_dvc_builds_the_stage_graph_with_each_committed_config(tmp_path: Path, path: str) -> None:
    # dvc.yaml interpolates params into paths: a null or mistyped one breaks every DVC command.
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    main(["params", str(ROOT / path), "--out", str(tmp_path / "params.yaml")])
    dvc = [sys.executable, "-m", "dvc"]
    assert subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path).returncode == 0
    dag = subprocess.run([*dvc, "dag", "--md"], cwd=tmp_path, capture_output=True, text=True)
    assert dag.returncode == 0, dag.stderr[-2000:]
    for stage in ["masks", "split", "ensemble", "predict", "evaluate", "leaderboard"]:
        assert stage in dag.stdout
    params = load_params(tmp_path / "params.yaml")
    for name in params.models:
        for k in params.ensemble.folds:
            assert f"train@{name}-{k}" in dag.stdout and f"oof@{name}-{k}" in dag.stdout


def _pipeline_modules(script: Path) -> set[str]:
    """Repository paths of the pipeline modules `script` imports, directly or through each other."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for name in names:
            parts = name.split(".")
            if parts[0] != "pipeline":
                continue
            # Importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py first.
            packages = ["/".join(parts[:n]) + "/__init__.py" for n in range(1, len(parts) + 1)]
            for module in [*packages, "/".join(parts) + ".py"]:
                if (ROOT / module).is_file() and module not in seen:
                    seen.add(module)
                    todo.append(ROOT / module)
    return seen


# Modules no stage's outputs depend on: messages (errors), progress bars, and params checking (config:
# the values themselves are DVC params, spelled out in the complete params.yaml). No stage lists them, so
# editing a message re-runs nothing.
OUTSIDE_DEPS = {"pipeline/config.py", "pipeline/errors.py", "pipeline/progress.py"}


def test_every_stage_depends_on_the_code_it_runs() -> None:
    # A module missing from a stage's deps lets `dvc repro` keep outputs computed by old code.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = ROOT / "stages" / f"{name}.py"
        deps = set(stage["deps"])
        assert f"stages/{name}.py" in deps, name
        runs = _pipeline_modules(script) - OUTSIDE_DEPS
        missing = runs - deps
        assert not missing, f"stage {name} does not list {sorted(missing)}"
        unused = {d for d in deps if d.startswith("pipeline/")} - runs
        assert not unused, f"stage {name} lists {sorted(unused)}, which it never imports or need not"


# Which stage families each family may import (the top-level modules, "", are open to all): data flows up
# from the COCO export to the submission, and only the command line sees every family.
FAMILY_IMPORTS = {
    "": set(),
    "data": {""},
    "models": {"", "data"},
    "training": {"", "data", "models"},
    "inference": {"", "data", "models", "ensemble"},
    "ensemble": {"", "data"},
    "evaluation": {"", "data"},
    "bundle": {"", "data", "models", "inference", "ensemble", "evaluation"},
    "orchestration": {"", "data", "models", "training", "inference", "ensemble", "evaluation", "bundle"},
}


def _family(module: str) -> str:
    """ "data" for pipeline/data/coco.py or pipeline.data.coco; "" for a top-level module."""
    parts = module.removeprefix("pipeline/").removeprefix("pipeline.").replace("/", ".").split(".")
    return parts[0] if len(parts) > 1 and (ROOT / "pipeline" / parts[0]).is_dir() else ""


def test_stage_families_import_only_down_the_flow() -> None:
    families = {path.name for path in (ROOT / "pipeline").iterdir() if (path / "__init__.py").is_file()}
    assert families == set(FAMILY_IMPORTS) - {""}, "a new family needs its row in FAMILY_IMPORTS"
    assert not {"inference", "orchestration", "ensemble", "evaluation"} & FAMILY_IMPORTS["training"]
    wrong = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        source = path.relative_to(ROOT).as_posix()
        if source == "pipeline/__main__.py":  # the entry point of the command line
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if not name.startswith("pipeline."):
                    continue
                mine, theirs = _family(source), _family(name)
                if theirs != mine and theirs not in FAMILY_IMPORTS[mine]:
                    wrong.append(f"{source} imports {name} ({mine or 'top'} -> {theirs or 'top'})")
    assert not wrong, "\n".join(wrong)


def test_every_path_a_stage_reads_is_a_dependency() -> None:
    # Each `--flag path` of a stage's command is either one of its outputs or one of its deps.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        outputs = [
            next(iter(entry)) if isinstance(entry, dict) else entry
            for key in ("outs", "metrics", "plots")
            for entry in stage.get(key, [])
        ]
        tokens = stage["cmd"].split()
        for flag, value in itertools.pairwise(tokens):
            if not flag.startswith("--") or not ("/" in value or value.startswith("${data.")):
                continue
            if any(out == value or out.startswith(value + "/") for out in outputs):
                continue
            assert value in stage["deps"], f"stage {name}: {flag} {value} is neither a dep nor an output"


def test_the_training_fingerprint_covers_the_code_that_shapes_the_weights() -> None:
    # A module the train stage runs must either be hashed into the resume fingerprint or be known
    # not to shape the weights; otherwise a code change would resume (keep) weights the old code made.
    not_shaping = {
        "pipeline/config.py",  # parsing and checking params: the resolved recipe is hashed instead
        "pipeline/data/manifest.py",  # parsing the manifest, whose bytes are hashed
        "pipeline/data/records.py",  # the parsed records' types
        "pipeline/training/live.py",  # curves and the metrics file, written after the weights
        "pipeline/__init__.py",
        "pipeline/data/__init__.py",
        "pipeline/models/__init__.py",
        "pipeline/training/__init__.py",
        "pipeline/atomic.py",
        "pipeline/errors.py",
        "pipeline/data/probstore.py",  # the pseudo module imports it for the teacher, not for training
        "pipeline/progress.py",
        "pipeline/writer.py",  # the folder lock and the death signal: who writes, not what
        "pipeline/digest.py",  # how the fingerprint names files by their bytes, not what trains
    }
    hashed = {f"pipeline/{name}" for name in WEIGHT_MODULES}
    assert hashed | not_shaping == _pipeline_modules(ROOT / "stages" / "train.py")
    assert not hashed & not_shaping


def test_only_training_reads_the_pseudo_labels() -> None:
    # Pseudo-labelled test images may teach a model but never be scored as if they were truth: the
    # stages that score or fit on held-out predictions must not depend on the pseudo stage's output.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readers = sorted(name for name, stage in stages.items() if "data/pseudo" in stage.get("deps", []))
    assert readers == ["refit", "train"]  # the two that train
    assert "data/pseudo" in stages["pseudo"]["outs"]


def test_seeds_in_an_overlay_become_one_recipe_per_seed_that_the_ensemble_ties() -> None:
    unet = {"seeds": [3, 7], "model": {"arch": "Unet"}}
    overlay = {"models": {"unet": unet, "fpn": {"model": {"arch": "FPN"}}}}
    params = params_from_overlay(overlay)
    assert list(params.models) == ["unet_s3", "unet_s7", "fpn"]
    assert [r.train.seed for r in params.models.values()] == [3, 7, params.train.seed]
    assert seed_groups(list(params.models.values())) == [0, 0, 1]
    # Two recipes equal in everything, the seed too, are not seed copies.
    twins = params_from_overlay({"models": {"a": {}, "b": {}, "c": {"train": {"seed": 5}}}})
    assert seed_groups(list(twins.models.values())) == [0, 1, 2]
    # params.yaml holds the copies, never `seeds` itself: a DVC matrix needs every recipe name.
    raw = complete(overlay)
    raw["models"]["unet"] = {"seeds": [1]}
    with pytest.raises(UserError, match=r"'models.unet.seeds' belongs in an overlay"):
        params_from_dict(raw)
    for bad in ([], [1, 1], [-1], ["a"], 2):
        with pytest.raises(UserError, match="must list distinct seeds"):
            complete({"models": {"unet": {"seeds": bad}}})
    with pytest.raises(UserError, match="two recipes named 'unet_s1'"):
        complete({"models": {"unet": {"seeds": [1]}, "unet_s1": {}}})
