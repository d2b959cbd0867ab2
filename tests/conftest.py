"""Shared fixtures: a throw-away DVC project with this repository's stages, and commands run in it."""

from __future__ import annotations

import copy
import json
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config import DemoParams, ModelParams, complete
from pipeline.data.demo import generate_demo

ROOT = Path(__file__).resolve().parents[1]

# The longest test files, longest first: `make test`'s (a fresh clone, 2026-12-07: 358, 284, 273, 148 and
# 87 s), then `make test-bench`'s (350, 293, 239, 193 s on a shared machine). Both hand whole files to
# two workers (`--dist loadfile`) in collection order (`--no-loadscope-reorder`; xdist's default order,
# most tests first, started the 5-test e2e module last, and the other worker then sat idle for 3
# minutes): the long ones first leave the short ones to fill in.
LONGEST_FIRST = [
    "test_e2e.py",
    "test_train.py",
    "test_parallel.py",
    "test_mixed_sizes.py",
    "test_slurm.py",
    "test_bench_gpu_check.py",
    "test_bench_realsets.py",
    "test_bench_ablation.py",
    "test_crash.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


Run = Callable[[list[str], Path], subprocess.CompletedProcess[str]]


def run_command(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with this venv's executables first on PATH; output captured as text."""
    env = {**venv_env(), **(extra_env or {})}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def run() -> Run:
    """`run(args, cwd)`: a command in the test's environment (this venv's dvc and python)."""
    return run_command


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """tmp_path/project: this repository's dvc.yaml, pipeline/, stages/ and teacher/, DVC initialised.

    The test writes params.yaml and the data.
    """
    return make_dvc_project(tmp_path / "project")


def make_dvc_project(work: Path) -> Path:
    """`work` made a DVC project (no git) holding this repository's dvc.yaml, pipeline/, stages/,
    teacher/ (the pseudo stage's dependency: its README, no frozen teacher) and .dvcignore."""
    work.mkdir(parents=True)
    for name in ["dvc.yaml", "pipeline", "stages", "teacher", ".dvcignore"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / name)
    assert run_command(["dvc", "init", "--no-scm", "-q"], work).returncode == 0
    return work


# A toy project of the real pipeline's shape, for the parallel runner and SLURM: its stages only sleep,
# print epoch lines, fail when told and write small files.

STEP = '''\
"""A toy stage: logs epoch lines, sleeps, fails when told, writes its output; dies with its dvc."""
import json, os, pathlib, sys, time
from pipeline.writer import die_with_parent
die_with_parent()
kind, model, fold = sys.argv[1], sys.argv[2], sys.argv[3]
name = f"{kind}@{model}-{fold}"
control = json.loads(pathlib.Path("control.json").read_text())
events = pathlib.Path("events")
events.mkdir(exist_ok=True)
(events / f"{name}.start").write_text(str(time.time()))
(events / f"{name}.ran-on-node-{os.environ.get('TRASHSEG_NODE_RANK', '-')}").touch()
epochs = control.get("epochs", 2) if kind == "train" else 0
for epoch in range(1, epochs + 1):
    time.sleep(control.get("sleep", 0.5))
    print(f"{model} fold {fold} epoch {epoch}/{epochs}: train loss 0.5, val mIoU {0.1 * epoch:.4f}, lr 1e-03",
          flush=True)
if name in control.get("fail", []):
    sys.exit(3)
out = pathlib.Path(sys.argv[4])
out.parent.mkdir(parents=True, exist_ok=True)
source = pathlib.Path(sys.argv[5]).read_text() if len(sys.argv) > 5 else ""
out.write_text(f"{name} from {source.strip()!r} with {control.get('value', 0)}\\n")
(events / f"{name}.end").write_text(str(time.time()))
'''

TOY_DVC = {
    "stages": {
        "prep": {"cmd": "python -c \"open('data.txt', 'w').write('data')\"", "outs": ["data.txt"]},
        "train": {
            "matrix": {"model": ["a", "b"], "fold": [0, 1]},
            "cmd": "exec python step.py train ${item.model} ${item.fold} "
            "out/${item.model}/train${item.fold}.txt data.txt",
            "deps": ["step.py", "data.txt"],
            "params": [{"control.json": ["value"]}],
            "outs": ["out/${item.model}/train${item.fold}.txt"],
        },
        "oof": {
            "matrix": {"model": ["a", "b"], "fold": [0, 1]},
            "cmd": "python step.py oof ${item.model} ${item.fold} out/${item.model}/oof${item.fold}.txt "
            "out/${item.model}/train${item.fold}.txt",
            "deps": ["step.py", "out/${item.model}/train${item.fold}.txt"],
            "outs": ["out/${item.model}/oof${item.fold}.txt"],
        },
        "final": {
            "cmd": "python -c \"import glob; open('final.txt', 'w').write(''.join("
            "open(p).read() for p in sorted(glob.glob('out/*/oof*.txt'))))\"",
            "deps": [f"out/{m}/oof{k}.txt" for m in "ab" for k in (0, 1)],
            "outs": ["final.txt"],
        },
    }
}
TOY_STAGES = [f"{kind}@{m}-{k}" for kind in ("train", "oof") for m in "ab" for k in (0, 1)]


def venv_env() -> dict[str, str]:
    """os.environ with this venv's executables (dvc, python) first on PATH, and SHELL=/bin/sh.

    DVC runs stage commands through $SHELL. A machine without SHELL (CI) gets /bin/sh, which on this
    image is dash: it keeps itself between dvc and the command unless the command says `exec`. Every
    test runs under that, the stricter case, whatever shell the person running them uses.
    """
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SHELL="/bin/sh")


def make_toy_project(path: Path, **control: object) -> Path:
    """A DVC project (no git) of TOY_DVC's stages at `path`; `control` steers its stages (see STEP)."""
    path.mkdir()
    (path / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC, sort_keys=False))
    (path / "step.py").write_text(STEP)
    (path / "control.json").write_text(json.dumps({"value": 1, **control}))
    init = subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=path, env=venv_env(), capture_output=True)
    assert init.returncode == 0, init.stderr
    return path


# The tiny recipe every test that runs real stages or benchmarks starts from: a 15-image 64 px demo, one
# epoch of a narrow U-Net, two folds, no TTA. A test overlays only what it is about (tiny_overlay).
TINY = {
    "demo": {"n_train": 12, "n_test": 3, "image_size": 64, "max_objects": 2},
    "augment": {"size": 64},
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"epochs": 1, "batch_size": 4},
    "runtime": {"num_workers": 0},
    "split": {"n_splits": 2},
    "ensemble": {"folds": [0, 1], "grid_step": 0.5},
    "predict": {"batch_size": 4, "num_workers": 0, "tta": "none"},
    "submission": {"size": 32},
    "models": {"unet": {}},
}


def tiny_overlay(*changes: dict) -> dict:
    """TINY with each of `changes` merged over it in turn: a section's keys one by one, `models` and any
    non-mapping value whole. A fresh copy: tests may edit what this returns."""
    overlay = copy.deepcopy(TINY)
    for change in changes:
        for section, values in copy.deepcopy(change).items():
            if section != "models" and isinstance(values, dict) and isinstance(overlay.get(section), dict):
                overlay[section].update(values)
            else:
                overlay[section] = values
    return overlay


def tiny_params(*changes: dict) -> dict:
    """tiny_overlay(*changes) completed over the defaults: a whole params file's content."""
    return complete(tiny_overlay(*changes))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo generator's set at TINY's sizes (train.json, test.json, test_truth.json, images),
    generated once per session. Read only: a test that writes into a set copies it first."""
    root = tmp_path_factory.mktemp("tiny-demo") / "demo"
    generate_demo(root, DemoParams(**TINY["demo"]))
    return root


def write_params(path: Path, overlay: dict) -> Path:
    """Write a complete params file at `path`: `overlay` (only what the test changes) over the defaults,
    as `python -m pipeline params` writes one (stages refuse a params file that leaves a key out)."""
    path.write_text(yaml.safe_dump(complete(overlay), sort_keys=False))
    return path


def run_stage(script: str, args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `stages/<script>` as its command line in dvc.yaml would, but in this process (torch is
    imported once for the whole test session)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "stages" / script), run_name="__main__")


# The smallest real smp model the tests build: a U-Net on ResNet-18 with a narrow decoder.
TINY_MODEL = ModelParams(arch="Unet", encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8])


def killed_after_the_first_save(saves: list[str]) -> Callable[[Path, dict], None]:
    """A stand-in for `save_checkpoint` that writes the file, records its name in `saves`, then stops the
    run as a kill would (KeyboardInterrupt, which no stage catches)."""

    from pipeline.models.checkpoints import save_checkpoint  # torch: only for the tests that use it

    def save(path: Path, state: dict) -> None:
        save_checkpoint(path, state)
        saves.append(path.name)
        raise KeyboardInterrupt

    return save


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread here and in the subprocesses (OMP_NUM_THREADS): runs that must agree to the last
    bit split float sums the same way, and 2 DDP processes on 2 cores would fight over them otherwise.
    A module that needs it says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch  # here, not at the top: most test modules never load torch

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo (as `demo/`), its masks, the manifest and a 3-fold folds.csv (4 images per fold):
    what the masks and split stages leave for training."""
    import pandas as pd

    from pipeline.data import coco
    from pipeline.data.manifest import manifest_of, write_manifest

    root = tmp_path_factory.mktemp("data")
    (root / "demo").symlink_to(tiny_demo, target_is_directory=True)
    train = coco.load_coco(root / "demo" / "train.json", require_annotations=True)
    test = coco.load_coco(root / "demo" / "test.json", classes_from=train)
    presence = coco.write_masks(train, root / "masks")
    write_manifest(root / "manifest.json", manifest_of(train, test, presence))
    folds = [i % 3 for i in range(len(train.images))]
    pd.DataFrame({"image_id": [im.file_name for im in train.images], "fold": folds}).to_csv(
        root / "folds.csv", index=False
    )
    return root
