"""Evidence harness: candidate recipes vs the plain loop on every real set, over seeds and folds, paired."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from ablation import apply, parse_overrides
from pipeline.atomic import write_json
from pipeline.config import complete, load_params, params_to_dict
from pipeline.data import coco
from pipeline.data.manifest import read_manifest
from pipeline.progress import parse_epoch_line
from pipeline.training.runtime import cpu_cores, cpu_has_native_bf16, read_cpuinfo
from recipe import (
    DATA_STAGES,
    checked,
    dvc,
    make_workspace,
    pipeline_score,
    plain_loop,
    subprocess_env,
    train_stage,
    workspace_params,
    write_params,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Bumped whenever bench/recipe.py's plain loop changes what it trains: cached plain runs of another
# version are not reused.
PLAIN_VERSION = 1
# What the records of runs on a machine that did not record itself (before the field) are filed under.
UNRECORDED = "unrecorded"
# Keys the harness sets on every candidate (data.* per set, the rest per run).
HARNESS_KEYS = ("data.", "split.n_splits", "ensemble.folds", "submission.size", "train.seed", "train.epochs")

EPILOG = """\
Each candidate is a params file (`--recipe NAME=FILE`; its first model recipe, or NAME=FILE:MODEL),
optionally with keys changed (`--override NAME KEY=VALUE ...`, as bench/ablation.py's --variant).
For every set (a folder with train.json, test.json, test_truth.json; default: every one in
../shared/data), seed and fold:
  - the plain loop (bench/recipe.py's: Unet/ResNet-18 from scratch, 128 px, Adam 1e-3, cross-entropy,
    horizontal flips) trains on the fold split for --minutes and scores the test truth. Its runs do not
    depend on any candidate: one is reused while its JSON (set, manifest hash, seed, fold, minutes,
    threads, machine) is in --out.
  - each candidate runs through its own stages in a fresh workspace: masks/split/pseudo, then
    train@M-fold for as many epochs as fit the budget with train.seed = seed, then `dvc repro
    leaderboard` (oof, one-member ensemble, predict, native-size scoring). The epochs that fit are
    calibrated once per (set, candidate, machine) by one 2-epoch run validating every epoch, under the
    same load: its timed epoch lines give an epoch's and a validation's seconds (paid every
    train.val_every epochs), the rest of its wall time is paid once. Later calls that add seeds or
    folds take the candidate's recorded calibration.
    A candidate run is reused while its JSON holds the same params and machine. A candidate named in
    --reference-epochs (one whose epochs cost what the reference's do) takes the reference's epoch
    count for the same run instead: no timing, so other load on the machine cannot skew its budget.
--jobs runs go at once, --threads torch threads each: on 2 cores, 2 jobs of 1 thread. One JSON per run
goes to --out (set name, manifest hash, full params with data paths relative to the set, never a
machine path; the machine as CPU, cores and native bf16, since a budget in minutes buys
different epochs on another: runs of one machine are reused, summarised and paired only with its own
runs). Then per set: mean test mIoU +- sd, the ratio to the plain loop (geometric mean of the
per-(seed, fold) ratios, 95 % t-interval), classes with IoU > 0 and > 0.2, per-class IoU; over sets the
geometric mean of the ratios; with --reference, each candidate's paired mIoU difference to it, per set
and averaged over the sets.

  python bench/realsets.py --recipe shipped=configs/real-cpu.yaml --seeds 0 1 --folds 0 1
  python bench/realsets.py --recipe base=configs/real-cpu.yaml --recipe lr3=configs/real-cpu.yaml \\
      --override lr3 train.lr=0.003 --seeds 0 --folds 0 --reference base
  python bench/realsets.py --summary-only --recipe base=configs/real-cpu.yaml   # tables from --out
"""


@dataclass(frozen=True)
class Candidate:
    name: str
    raw: dict[str, Any]  # the params file's contents
    model: str | None  # the recipe of its `models` to train (None: the first)
    overrides: dict[str, Any]
    source: str  # the file, for messages


@dataclass(frozen=True)
class RealSet:
    name: str
    folder: Path


def main() -> None:
    args = parse_args(sys.argv[1:])
    sets = find_sets(args.sets)
    candidates = read_candidates(args.recipe, args.override or [])
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        run_all(args, sets, candidates)
    machine = this_machine() if args.machine is None else args.machine
    records = load_records(args.out, [s.name for s in sets], args.minutes, args.seeds, args.folds, machine)
    summary = summarize(records, [c.name for c in candidates], args.reference)
    print(f"runs of {machine}")
    print(format_summary(summary, args.minutes))
    if args.summary_json is not None:
        write_json(args.summary_json, summary)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", action="append", required=True, help="NAME=PARAMS_FILE[:MODEL]")
    parser.add_argument("--override", action="append", nargs="+", metavar=("NAME", "KEY=VALUE"))
    parser.add_argument("--sets", type=Path, nargs="+", help="set folders (default: ../shared/data/*)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-splits", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget of every run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--reference", help="a candidate every other is compared with, paired")
    parser.add_argument(
        "--reference-epochs",
        nargs="+",
        default=[],
        metavar="NAME",
        help="candidates whose epochs cost what the reference's do (lr, loss, TTA changed): they train "
        "for the reference's epoch count of the same set, seed and fold instead of calibrating their own",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "measurements" / "realsets")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "realsets", help="workspaces"
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's workspace")
    parser.add_argument("--summary-only", action="store_true", help="no runs: tables from --out")
    parser.add_argument("--summary-json", type=Path, help="write the summary here")
    parser.add_argument(
        "--machine",
        help=f"summarise the runs of this machine (as its records name it; {UNRECORDED!r}: records older "
        "than the field) instead of this one's",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.jobs < 1 or args.threads < 1:
        parser.error("--minutes must be > 0, --jobs and --threads >= 1")
    if not all(0 <= fold < args.n_splits for fold in args.folds):
        parser.error(f"--folds must be folds of the {args.n_splits} --n-splits")
    names = [spec.partition("=")[0] for spec in args.recipe]
    if args.reference is not None and args.reference not in names:
        parser.error(f"--reference {args.reference} is not one of the --recipe names ({', '.join(names)})")
    if args.reference_epochs and args.reference is None:
        parser.error("--reference-epochs needs --reference")
    unknown = [name for name in args.reference_epochs if name not in names or name == args.reference]
    if unknown:
        parser.error(f"--reference-epochs {unknown[0]}: not one of the other --recipe names")
    return args


@functools.cache
def this_machine(cpuinfo: str | None = None) -> str:
    """What a minutes budget buys here: the CPU (vendor, family, model: /proc/cpuinfo's "model name" is
    often just "AMD EPYC" under a hypervisor), the cores this process may use, and whether bf16 is
    native (`train.cpu_bf16` trains about 2x the epochs where it is). Runs of different machines are
    neither reused nor paired: a 10-minute run on one is not a 10-minute run on another."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "vendor_id" in fields:
        cpu = f"{fields['vendor_id']} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    else:
        cpu = platform.processor() or platform.machine()
    bf16 = "native bf16" if cpu_has_native_bf16(cpuinfo) else "no native bf16"
    return f"{cpu}, {cpu_cores()} cores, {bf16}"


def find_sets(folders: Sequence[Path] | None) -> list[RealSet]:
    """The sets named, or every folder of ../shared/data holding train.json; exits if one lacks a file."""
    if folders is None:
        if not SHARED_DATA.is_dir():
            raise SystemExit(f"error: no --sets given and {SHARED_DATA} does not exist")
        folders = sorted(p for p in SHARED_DATA.iterdir() if (p / "train.json").is_file())
    sets = []
    for folder in folders:
        for name in ("train.json", "test.json", "test_truth.json"):
            if not (folder / name).is_file():
                raise SystemExit(f"error: {folder}: no {name} (a set needs train, test and test truth)")
        sets.append(RealSet(folder.resolve().name, folder.resolve()))
    if len({s.name for s in sets}) != len(sets):
        raise SystemExit("error: two --sets share a folder name, which names their results")
    return sets


def read_candidates(specs: list[str], overrides: list[list[str]]) -> list[Candidate]:
    """--recipe NAME=FILE[:MODEL] and --override NAME KEY=VALUE ... -> candidates; exits on a bad one."""
    by_name: dict[str, list[str]] = {}
    for name, *pairs in overrides:
        by_name.setdefault(name, []).extend(pairs)
    candidates = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"error: --recipe {spec!r} is not NAME=PARAMS_FILE[:MODEL]")
        file, _, model = rest.partition(":")
        path = Path(file)
        if not path.is_file():
            raise SystemExit(f"error: --recipe {name}: no params file {path}")
        raw = complete(yaml.safe_load(path.read_text()) or {})
        pairs = parse_overrides(by_name.pop(name, []))
        owned = [key for key in pairs if key.startswith(HARNESS_KEYS)]
        if owned:
            raise SystemExit(f"error: --override {name} {owned[0]}: the harness sets it")
        candidates.append(Candidate(name, raw, model or None, pairs, str(path)))
    if by_name:
        raise SystemExit(f"error: --override {next(iter(by_name))}: no --recipe of that name")
    if len({c.name for c in candidates}) != len(candidates) or "plain" in {c.name for c in candidates}:
        raise SystemExit("error: --recipe names must be distinct and not 'plain'")
    return candidates


# ---------------------------------------------------------------------------------------------------------
# Runs


def run_all(args: argparse.Namespace, sets: list[RealSet], candidates: list[Candidate]) -> None:
    """Every missing run, --jobs at a time: plain runs one each, a (set, candidate)'s runs in one
    sequence (its calibration comes first and is shared)."""
    env = subprocess_env(args.threads)
    bases = {}
    for real in sets:
        bases[real.name] = prepare_base(args.work / real.name / "base", real, args.n_splits, candidates, env)
        print(f"{real.name}: manifest {bases[real.name][1][:12]}")
    pairs = [(seed, fold) for seed in args.seeds for fold in args.folds]
    plain = [("plain", (real, *bases[real.name], seed, fold)) for real in sets for seed, fold in pairs]
    by_candidate = [
        [("pipeline", (real, *bases[real.name], candidate, pairs)) for real in sets]
        for candidate in candidates
    ]
    # The first candidate's runs and the plain ones first, then the others, in the order given: a
    # harness stopped early has paired figures of the candidates named first.
    groups = by_candidate[0] + plain + [g for later in by_candidate[1:] for g in later]
    lock = threading.Lock()

    def run_group(group: tuple[str, Any]) -> None:
        kind, job = group
        if kind == "plain":
            run_plain(args, env, *job, lock)
        else:
            run_candidate(args, env, *job, lock)

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_group, g) for g in groups]:
            future.result()


def prepare_base(
    base: Path, real: RealSet, n_splits: int, candidates: list[Candidate], env: dict[str, str]
) -> tuple[Path, str]:
    """A workspace with the set's masks, manifest and folds (what plain runs read and candidate
    workspaces start from); returns it with the manifest's sha256. Every candidate must read the
    data and split it as the first does, or pairs would not be paired."""
    params = [candidate_params(c, real, n_splits, folds=list(range(n_splits)), seed=0) for c in candidates]
    for other, candidate in zip(params[1:], candidates[1:], strict=True):
        for section in ("data", "split"):
            if other.get(section) != params[0].get(section):
                raise SystemExit(
                    f"error: {candidate.name}: its {section} section differs from {candidates[0].name}'s: "
                    "the plain loop and every candidate must share masks and folds"
                )
    base.mkdir(parents=True, exist_ok=True)
    make_workspace(base)
    write_params(base, params[0])
    (base / "logs").mkdir(exist_ok=True)
    for stage in DATA_STAGES:
        dvc(base, ["repro", "-s", stage], env, base / "logs" / "dvc.log")
    return base, hashlib.sha256((base / "data" / "manifest.json").read_bytes()).hexdigest()


@functools.cache  # once per set: every run's record carries it
def fingerprint(base: Path) -> dict[str, Any]:
    """What a set looks like to a recipe, from the masks stage's manifest and object bank: images,
    classes, object size (visible pixels / image pixels), foreground share, empty images, objects
    per class. These are the candidates for what predicts a recipe's win on a set."""
    manifest = read_manifest(base / "data" / "manifest.json")
    sizes = {image.file_name: image.height * image.width for image in manifest.train}
    bank = json.loads((base / "data" / "masks" / "objects.json").read_text())["objects"]
    shares = np.array([obj["area"] / sizes[obj["file_name"]] for obj in bank])
    per_class = np.bincount([obj["class"] for obj in bank], minlength=manifest.n_classes)[1:]
    shapes = {(image.height, image.width) for image in manifest.train}
    return {
        "train_images": len(manifest.train),
        "classes": manifest.n_classes - 1,
        "objects_per_image": len(bank) / len(manifest.train),
        "object_share_median": float(np.median(shares)),
        "objects_under_1pct": float(np.mean(shares < 0.01)),
        "foreground_share": sum(obj["area"] for obj in bank) / sum(sizes.values()),
        "empty_images": float(np.mean(~manifest.presence[:, 1:].any(axis=1))),
        "classes_without_objects": int((per_class == 0).sum()),  # e.g. a kept id-0 supercategory
        "objects_per_class_min": int(per_class[per_class > 0].min()),
        "objects_per_class_median": float(np.median(per_class[per_class > 0])),
        "image_shapes": len(shapes),
    }


@functools.cache  # once per set: parsing the test truth is not per run
def truth_classes(base: Path) -> list[str]:
    """The foreground classes the set's test truth holds, by the training json's class names: the ones
    a recipe can find (a class absent from the truth scores no IoU, or 0 if predicted)."""
    data = load_params(base / "params.yaml").data
    truth = coco.load_with_training_classes(
        data.test_truth_json, data.train_json, data.root, data.on_bad_annotation, data.unused_categories
    )
    index = {cid: i for i, cid in enumerate(truth.category_ids, start=1)}
    present = {
        index[a["category_id"]]
        for anns in truth.annotations.values()
        for a in anns
        if a["category_id"] in index
    }
    return [truth.classes[i] for i in sorted(present)]


def candidate_params(
    candidate: Candidate, real: RealSet, n_splits: int, folds: list[int], seed: int
) -> dict[str, Any]:
    """The workspace params of one run: the candidate's file with its overrides, data.* at the set,
    `folds` held out by the ensemble, native-size scoring and train.seed = `seed`."""
    models: str | list[str] = "first" if candidate.model is None else [candidate.model]
    params = workspace_params(candidate.raw, real.folder, folds, n_splits, models, candidate.source)
    params = apply(params, candidate.overrides, candidate.source)
    params.setdefault("train", {})["seed"] = seed
    checked(params, candidate.source)
    return params


def validating_every_epoch(params: dict[str, Any], model: str) -> dict[str, Any]:
    """A copy of workspace params whose recipe `model` validates after every epoch."""
    out = copy.deepcopy(params)
    out.setdefault("train", {})["val_every"] = 1
    own = out["models"][model].get("train")
    if isinstance(own, dict) and "val_every" in own:
        own["val_every"] = 1
    return out


def val_every(params: dict[str, Any], model: str) -> int:
    """Recipe `model`'s train.val_every in workspace params, defaults filled in."""
    return checked(params, "params").recipe(model).train.val_every


def portable(params: dict[str, Any], real: RealSet) -> dict[str, Any]:
    """`params` with the set's folder written as its name: a record holds no machine path."""
    text = json.dumps(params).replace(str(real.folder), real.name)
    return json.loads(text)


def machine_tag() -> str:
    """The end of this machine's record names: a hash of `this_machine()`."""
    return hashlib.sha256(this_machine().encode()).hexdigest()[:8]


def record_path(out: Path, recipe: str, real: str, seed: int, fold: int, minutes: float) -> Path:
    """The record of one run made on this machine: the name ends in `machine_tag()`, so a run on another
    machine never overwrites it (records from before the field have no such suffix)."""
    return out / f"{real}-{recipe}-s{seed}-f{fold}-{minutes:g}min-{machine_tag()}.json"


def resolved(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with every default filled in, as the stages read them: a key added to the code with
    the value runs already had leaves their records current."""
    return params_to_dict(checked(complete(params), "params"))


def _shaping(params: dict[str, Any]) -> dict[str, Any]:
    """`resolved(params)` without what configures nothing in a run of the harness: the demo section, and
    train.epochs (shared and per recipe), which the harness sets from the budget (the run's record holds
    the count it trained)."""
    out = {key: value for key, value in resolved(params).items() if key != "demo"}
    for section in [out.get("train"), *(recipe.get("train") for recipe in out.get("models", {}).values())]:
        if isinstance(section, dict):
            section.pop("epochs", None)
    return out


def cached(path: Path, params: dict[str, Any] | None = None, **expected: Any) -> bool:
    """Whether the record at `path` exists, holds `expected`'s values and (if given) the same params
    once defaults are filled in."""
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if params is not None and ("params" not in record or _shaping(record["params"]) != _shaping(params)):
        return False
    return all(record.get(key) == value for key, value in expected.items())


def run_plain(
    args: argparse.Namespace,
    env: dict[str, str],
    real: RealSet,
    base: Path,
    manifest_hash: str,
    seed: int,
    fold: int,
    lock: threading.Lock,
) -> None:
    path = record_path(args.out, "plain", real.name, seed, fold, args.minutes)
    key = {
        "manifest_sha256": manifest_hash,
        "plain_version": PLAIN_VERSION,
        "threads": args.threads,
        "machine": this_machine(),
    }
    if cached(path, **key):
        return
    stem = base / "logs" / f"plain-s{seed}-f{fold}"
    with lock:
        print(f"{real.name} plain seed {seed} fold {fold}: training ({stem}.log)")
    with plain_loop(base, fold, args.minutes * 60, None, True, dict(env), stem, seed) as result:
        pass
    record = {
        "set": real.name,
        "recipe": "plain",
        "seed": seed,
        "fold": fold,
        "n_splits": args.n_splits,
        "minutes": args.minutes,
        **key,
        "truth_classes": truth_classes(base),
        "fingerprint": fingerprint(base),
        "epochs": result["epochs"],
        "train_minutes": result["train_seconds"] / 60,
        "miou": result["miou"],
        "iou": result["iou"],
    }
    write_json(path, record)
    with lock:
        print(
            f"{real.name} plain seed {seed} fold {fold}: mIoU {record['miou']:.3f}, {record['epochs']} epochs"
        )


@dataclass(frozen=True)
class Calibration:
    """What a candidate's train stage costs on this machine, from the epoch lines of one short run.

    `train_seconds`: one epoch without validation, its checkpoint writes included; `val_seconds`: one
    validation; `overhead_seconds`: the rest of the stage's wall time (DVC, imports, data, the first
    epoch's warm-up, the metrics written at the end), paid once a run. `method` "two-runs": a record
    from before the epoch lines were timed, whose `seconds_per_epoch` (a 2-epoch run's wall time less a
    1-epoch run's, each epoch validated) is taken as an epoch's whole cost."""

    train_seconds: float
    val_seconds: float
    overhead_seconds: float
    method: str = "epoch-lines"

    def epochs(self, budget_seconds: float, val_every: int) -> int:
        """The most epochs (at least 1) whose stage fits `budget_seconds`: validated every `val_every`
        epochs and after the last, as `train.fit` does."""
        epochs = 1
        while self.stage_seconds(epochs + 1, val_every) <= budget_seconds:
            epochs += 1
        return epochs

    def stage_seconds(self, epochs: int, val_every: int) -> float:
        validations = epochs // val_every + (1 if epochs % val_every else 0)
        return self.overhead_seconds + epochs * self.train_seconds + validations * self.val_seconds


def calibration_from_lines(lines: Iterable[str], stage_seconds: float) -> Calibration:
    """The calibration from a train stage's output that validated every epoch, of two epochs or more:
    the epochs' mean seconds and validation seconds, and whatever the epochs do not account for of
    `stage_seconds` as overhead. The mean, not the last epoch alone: on a shared 2-core machine two
    epochs of one run differed by a fifth (39.9 and 48.3 s), more than the first epoch's warm-up adds."""
    epochs = [progress for line in lines if (progress := parse_epoch_line(line)) is not None]
    seconds = [e.seconds for e in epochs if e.seconds is not None]
    val_seconds = [e.val_seconds for e in epochs if e.val_seconds is not None]
    if len(epochs) < 2 or len(seconds) < len(epochs) or len(val_seconds) < len(epochs):
        raise SystemExit("error: the calibration run wrote no timed epoch lines of two validated epochs")
    epoch, val = float(np.mean(seconds)), float(np.mean(val_seconds))
    overhead = stage_seconds - len(epochs) * epoch
    return Calibration(max(epoch - val, 0.0), val, max(overhead, 0.0))


def recorded_calibration(
    args: argparse.Namespace, real: RealSet, candidate: Candidate, key: dict[str, Any]
) -> Calibration | None:
    """The calibration of an earlier run of `candidate` on `real` (same params but seed and fold, same
    manifest, threads and machine), None if there is none. Calibrated once, a candidate trains the
    same epoch count at every seed and fold: a fresh calibration per call would add its own noise to the
    pairs' differences. A record from before the epoch lines were timed gives its "two-runs" figure,
    which sets the epoch count its runs had: a candidate's later pairs train as its first did."""
    pattern = f"{real.name}-{candidate.name}-s*-f*-{args.minutes:g}min-{machine_tag()}.json"
    for path in sorted(args.out.glob(pattern)):
        record = json.loads(path.read_text())
        # The name's pattern alone would also match another set or candidate whose name extends these.
        same_run = (record.get("set"), record.get("recipe")) == (real.name, candidate.name)
        if not same_run or (record.get("calibration") is None and record.get("seconds_per_epoch") is None):
            continue
        params = candidate_params(candidate, real, args.n_splits, [record["fold"]], record["seed"])
        if cached(path, portable(params, real), **key):
            if record.get("calibration") is not None:
                return Calibration(**record["calibration"])
            return Calibration(float(record["seconds_per_epoch"]), 0.0, 0.0, method="two-runs")
    return None


def run_candidate(
    args: argparse.Namespace,
    env: dict[str, str],
    real: RealSet,
    base: Path,
    manifest_hash: str,
    candidate: Candidate,
    pairs: list[tuple[int, int]],
    lock: threading.Lock,
) -> None:
    """Every (seed, fold) run of one candidate on one set, after one calibration if any run is missing
    and no recorded run of the candidate on this set and machine holds one."""
    key = {"manifest_sha256": manifest_hash, "threads": args.threads, "machine": this_machine()}
    calibration = recorded_calibration(args, real, candidate, key)
    for seed, fold in pairs:
        params = candidate_params(candidate, real, args.n_splits, [fold], seed)
        (model,) = params["models"]
        path = record_path(args.out, candidate.name, real.name, seed, fold, args.minutes)
        if cached(path, portable(params, real), **key):
            continue
        work = args.work / real.name / f"{candidate.name}-s{seed}-f{fold}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work, ignore=shutil.ignore_patterns("logs"))
        (work / "logs").mkdir()
        log = work / "logs" / "dvc.log"
        write_params(work, params)
        for stage in DATA_STAGES:
            dvc(work, ["repro", "-s", stage], env, log)
        epochs_from = None
        if candidate.name in args.reference_epochs:
            # Same cost per epoch as the reference: its calibrated count for this very run is the fair
            # budget, and no timing (which other load on the machine disturbs) is needed.
            reference = record_path(args.out, args.reference, real.name, seed, fold, args.minutes)
            if not reference.is_file():
                raise SystemExit(f"error: {candidate.name}: no {reference.name} to take its epochs from")
            # record_path names this machine's record: another machine's count is never taken.
            epochs_from = args.reference
            epochs = int(json.loads(reference.read_text())["epochs"])
        elif calibration is None:
            with lock:
                print(f"{real.name} {candidate.name}: calibrating ({log})")
            # One run of two epochs, each validated: its timed epoch lines give an epoch's and a
            # validation's cost apart (a recipe with train.val_every > 1 pays the second less often),
            # measured inside one process rather than as the difference of two runs' wall times.
            start = log.stat().st_size
            seconds = train_stage(work, validating_every_epoch(params, model), model, fold, 2, env)
            with log.open() as handle:
                handle.seek(start)
                calibration = calibration_from_lines(handle, seconds)
        if epochs_from is None:
            assert calibration is not None
            epochs = calibration.epochs(args.minutes * 60, val_every(params, model))
        with lock:
            print(f"{real.name} {candidate.name} seed {seed} fold {fold}: {epochs} epochs ({log})")
        train_s = train_stage(work, params, model, fold, epochs, env)
        dvc(work, ["repro", "leaderboard"], env, log)
        score = pipeline_score(work)
        record = {
            "set": real.name,
            "recipe": candidate.name,
            "seed": seed,
            "fold": fold,
            "n_splits": args.n_splits,
            "minutes": args.minutes,
            **key,
            "params": portable(resolved(params), real),
            "model": model,
            "truth_classes": truth_classes(base),
            "fingerprint": fingerprint(base),
            "calibration": None if epochs_from else dataclasses.asdict(calibration),
            "epochs": epochs,
            "epochs_from": epochs_from,  # None: calibrated; else the candidate whose count it took
            "train_minutes": train_s / 60,
            "miou": score["miou"],
            "iou": score["iou"],
        }
        write_json(path, record)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        with lock:
            print(
                f"{real.name} {candidate.name} seed {seed} fold {fold}: mIoU {record['miou']:.3f} "
                f"({epochs} epochs, {record['train_minutes']:.1f} min)"
            )


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure functions of the records)


def load_records(
    out: Path, sets: list[str], minutes: float, seeds: list[int], folds: list[int], machine: str
) -> list[dict[str, Any]]:
    """The records in `out` of these sets, budget, seeds and folds, run on `machine` (`this_machine()`'s
    text, or UNRECORDED for records older than the field)."""
    records = []
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        if (
            record.get("set") in sets
            and record.get("minutes") == minutes
            and record.get("seed") in seeds
            and record.get("fold") in folds
            and record.get("machine", UNRECORDED) == machine
        ):
            records.append(record)
    return records


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval for the mean; low = high = nan below 2 values."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def ratio_interval(pipeline: Sequence[float], plain: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of the paired ratios pipeline/plain with its 95 % interval (a t-interval on the log
    ratios, mapped back); nan where a plain score is 0."""
    p, q = np.asarray(pipeline, dtype=np.float64), np.asarray(plain, dtype=np.float64)
    if (q <= 0).any() or (p <= 0).any():
        return math.nan, math.nan, math.nan
    mean, low, high = t_interval(np.log(p / q))
    return math.exp(mean), math.exp(low), math.exp(high)


def mean_over_sets_interval(values: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """The mean over sets of each set's mean (every set weighs the same, whatever its pairs), with a 95 %
    interval: the standard error combines the sets' (each the sd of its pairs / sqrt n), Welch-Satterthwaite
    degrees of freedom. Differences between the sets' means are the question, not noise, so they do not
    widen it. The interval is nan if a set has fewer than 2 pairs."""
    means = [float(np.mean(x)) for x in values]
    centre = float(np.mean(means))
    if any(len(x) < 2 for x in values):
        return centre, math.nan, math.nan
    var = [float(np.var(x, ddof=1)) / len(x) for x in values]
    se2 = sum(var) / len(values) ** 2
    if se2 == 0:
        return centre, centre, centre
    dof = sum(var) ** 2 / sum(v**2 / (len(x) - 1) for v, x in zip(var, values, strict=True))
    half = float(stats.t.ppf(0.975, dof) * math.sqrt(se2))
    return centre, centre - half, centre + half


def geometric_mean_interval(logs: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """Geometric mean over sets of each set's mean log ratio, with `mean_over_sets_interval`'s interval
    mapped back."""
    centre, low, high = mean_over_sets_interval(logs)
    return math.exp(centre), math.exp(low), math.exp(high)


def class_counts(iou: dict[str, float | None], classes: list[str]) -> tuple[int, int, int]:
    """(classes with IoU > 0, > 0.2, all) among `classes` (those of the test truth)."""
    scores = [iou.get(name) or 0.0 for name in classes]
    return sum(v > 0 for v in scores), sum(v > 0.2 for v in scores), len(scores)


def summarize(records: Iterable[dict[str, Any]], recipes: list[str], reference: str | None) -> dict[str, Any]:
    """Per set and candidate: runs paired with the plain loop by (seed, fold), their statistics; over
    sets, each candidate's geometric-mean ratio; with `reference`, paired mIoU differences to it, per set
    and averaged over the sets."""
    by_key = {(r["set"], r["recipe"], r["seed"], r["fold"]): r for r in records}
    sets = sorted({key[0] for key in by_key})
    out: dict[str, Any] = {"sets": {}, "overall": {}, "fingerprints": {}}
    for record in by_key.values():
        if "fingerprint" in record:
            out["fingerprints"].setdefault(record["set"], record["fingerprint"])
    logs: dict[str, list[list[float]]] = {name: [] for name in recipes}
    diffs_by_set: dict[str, list[list[float]]] = {name: [] for name in recipes}
    for real in sets:
        rows: dict[str, Any] = {}
        for recipe in ["plain", *recipes]:
            runs = [r for (s, name, _, _), r in sorted(by_key.items()) if s == real and name == recipe]
            if not runs:
                continue
            pairs = [(r["seed"], r["fold"]) for r in runs]
            miou = [r["miou"] for r in runs]
            row: dict[str, Any] = {
                "n": len(runs),
                "pairs": pairs,
                "miou_mean": float(np.mean(miou)),
                "miou_sd": float(np.std(miou, ddof=1)) if len(miou) > 1 else math.nan,
                "epochs_mean": float(np.mean([r["epochs"] for r in runs])),
                "classes_above_0": float(
                    np.mean([class_counts(r["iou"], r["truth_classes"])[0] for r in runs])
                ),
                "classes_above_0_2": float(
                    np.mean([class_counts(r["iou"], r["truth_classes"])[1] for r in runs])
                ),
                "classes_scored": len(runs[0]["truth_classes"]),
                "iou_mean": {c: _nanmean([r["iou"].get(c) for r in runs]) for c in runs[0]["iou"]},
            }
            if recipe != "plain":
                plain = [by_key.get((real, "plain", s, f)) for s, f in pairs]
                paired = [(r["miou"], p["miou"]) for r, p in zip(runs, plain, strict=True) if p is not None]
                if paired:
                    ratio, low, high = ratio_interval([a for a, _ in paired], [b for _, b in paired])
                    row |= {"ratio": ratio, "ratio_low": low, "ratio_high": high, "n_paired": len(paired)}
                    if all(b > 0 and a > 0 for a, b in paired):
                        logs[recipe].append([math.log(a / b) for a, b in paired])
                if reference is not None and recipe != reference:
                    ref = [by_key.get((real, reference, s, f)) for s, f in pairs]
                    diffs = [r["miou"] - q["miou"] for r, q in zip(runs, ref, strict=True) if q is not None]
                    if diffs:
                        mean, low, high = t_interval(diffs)
                        row |= {"diff_to_reference": mean, "diff_low": low, "diff_high": high}
                        diffs_by_set[recipe].append(diffs)
            rows[recipe] = row
        out["sets"][real] = rows
    for recipe in recipes:
        every_set = len(logs[recipe]) == len(sets) and sets
        if every_set:
            ratio, low, high = geometric_mean_interval(logs[recipe])
            out["overall"][recipe] = {"geomean_ratio": ratio, "low": low, "high": high, "sets": len(sets)}
        if reference is not None and recipe != reference and len(diffs_by_set[recipe]) == len(sets) and sets:
            mean, low, high = mean_over_sets_interval(diffs_by_set[recipe])
            out["overall"].setdefault(recipe, {"sets": len(sets)})
            out["overall"][recipe] |= {"diff_to_reference": mean, "diff_low": low, "diff_high": high}
    out["reference"] = reference
    return out


def _nanmean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and v == v]
    return float(np.mean(kept)) if kept else None


def format_summary(summary: dict[str, Any], minutes: float) -> str:
    """The summary as Markdown tables: one per set, then the overall ratios."""
    lines = []
    for real, rows in summary["sets"].items():
        lines += [f"\n### {real} ({minutes:g} min per run)\n"]
        head = "| recipe | runs | epochs | test mIoU (mean ± sd) | ratio to plain [95 % CI] "
        head += "| classes > 0 / > 0.2 |"
        ref = summary["reference"]
        head += f" diff to {ref} [95 % CI] |" if ref else ""
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for recipe, row in rows.items():
            ratio = _ci(row.get("ratio"), row.get("ratio_low"), row.get("ratio_high"), "{:.2f}")
            cells = [
                recipe,
                str(row["n"]),
                f"{row['epochs_mean']:.0f}",
                f"{row['miou_mean']:.3f} ± {_num(row['miou_sd'])}",
                ratio,
                f"{row['classes_above_0']:.1f} / {row['classes_above_0_2']:.1f} of {row['classes_scored']}",
            ]
            if ref:
                cells.append(
                    _ci(row.get("diff_to_reference"), row.get("diff_low"), row.get("diff_high"), "{:+.3f}")
                )
            lines.append("| " + " | ".join(cells) + " |")
        classes = list(next(iter(rows.values()))["iou_mean"])
        lines += ["", "| per-class IoU | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
        for recipe, row in rows.items():
            lines.append(f"| {recipe} | " + " | ".join(_num(row["iou_mean"].get(c)) for c in classes) + " |")
    if summary["fingerprints"]:
        keys = list(next(iter(summary["fingerprints"].values())))
        lines += ["\n### The sets\n", "| set | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for real, print_ in summary["fingerprints"].items():
            cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in print_.values()]
            lines.append(f"| {real} | " + " | ".join(cells) + " |")
    if summary["overall"]:
        ref = summary["reference"]
        lines += ["\n### Over the sets: geometric mean of the ratios to the plain loop\n"]
        head = "| recipe | sets | geomean ratio [95 % CI] |"
        head += f" mean diff to {ref} [95 % CI] |" if ref else ""
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for recipe, row in summary["overall"].items():
            cells = [
                recipe,
                str(row["sets"]),
                _ci(row.get("geomean_ratio"), row.get("low"), row.get("high"), "{:.2f}"),
            ]
            if ref:
                cells.append(
                    _ci(row.get("diff_to_reference"), row.get("diff_low"), row.get("diff_high"), "{:+.3f}")
                )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def _ci(mean: float | None, low: float | None, high: float | None, fmt: str) -> str:
    if mean is None or mean != mean:
        return "-"
    if low is None or low != low:
        return fmt.format(mean) + " [n < 2]"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


if __name__ == "__main__":
    main()
