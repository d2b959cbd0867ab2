"""Benchmark: the pipeline's own stages vs a plain 40-line training loop, same minutes on the same cores.

The pipeline side is one model recipe (the first of the params' `models`, or --model) trained on one
fold through `dvc repro`, its single-member ensemble predicting the test set; the plain side trains on
the same fold split and masks in its own process. Both are scored on the test truth at native size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from pipeline import metrics
from pipeline.atomic import write_json
from pipeline.config import Params, complete, load_params, params_from_dict
from pipeline.data import coco, records
from pipeline.data.folds import read_folds
from pipeline.data.images import image_path, mask_relpath, read_image, read_mask
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# What a workspace needs to run the stages, as tests/conftest.py's make_dvc_project copies.
COPIED = ["dvc.yaml", "pipeline", "stages", "teacher", ".dvcignore"]
# The stages every train stage needs, run once with `dvc repro -s` before a train stage alone is.
DATA_STAGES = ("masks", "split", "pseudo")
PLAIN_SIZE = 128
PLAIN_BATCH = 8
PLAIN_LR = 1e-3
PLAIN_SEED = 0
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

EPILOG = """\
One workspace (dvc.yaml, pipeline/, stages/ copied; `dvc init --no-scm`) whose params.yaml is --params
with data.* pointed at DATA_DIR, split.n_splits = --n-splits, `models` cut down to one recipe M (--model,
default the first the file defines), ensemble.folds = [--fold] and submission.size = null (scored at each
image's own size, like the plain loop); `dvc repro -s` of masks, split and pseudo once. For each budget: a
calibration (`dvc repro -s -f train@M-k` with train.epochs = 1, then 1 + train.val_every, timed; a
train.epochs of M's own is dropped: the benchmark sets the shared one); epochs = max(1, floor(budget /
seconds per epoch)); then the timed `dvc repro -s -f train@M-k` and `dvc repro leaderboard` (oof@M-k,
ensemble of the one member, predict, leaderboard). Per-class IoUs come from reports/leaderboard.json.
Side by side, in its own process with the same torch thread count, the plain loop (Unet/ResNet-18 from
scratch at 128 px, Adam 1e-3, cross-entropy, horizontal flips) trains on the fold split and masks the
stages wrote (data/folds.csv, data/masks, the images of data/manifest.json) until its next epoch would
pass the budget, then predicts the test set at 128 px, upsampled to each image's size. Both are scored
by one dataset-level confusion matrix.

  python bench/recipe.py ../shared/data/medical-waste --params configs/real-cpu.yaml --minutes 5 10
  python bench/recipe.py ../shared/data/medical-waste --params configs/real-cpu.yaml --model fpn \\
      --minutes 5
"""


def main() -> None:
    if sys.argv[1:2] == ["--plain-loop"]:
        plain_main(sys.argv[2:])
        return
    args = parse_args(sys.argv[1:])
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run_benchmark(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="recipe-") as tmp:
            results = run_benchmark(args, Path(tmp))
    for budget in results["budgets"]:
        print(
            f"minutes={budget['minutes']:g} pipeline={budget['pipeline']['miou']:.3f} "
            f"plain={budget['plain']['miou']:.3f} ratio={budget['ratio']:.2f}"
        )
    if args.json is not None:
        write_json(args.json, results)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="train.json, test.json, test_truth.json, images")
    parser.add_argument("--params", type=Path, required=True, help="params file of the pipeline's run")
    parser.add_argument("--minutes", type=float, nargs="+", required=True, help="wall-clock budgets")
    parser.add_argument("--model", help="the recipe of the params' `models` to train (default: the first)")
    parser.add_argument("--fold", type=int, default=0, help="the held-out fold both recipes leave out")
    parser.add_argument("--n-splits", type=int, default=5, help="folds of the split stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each recipe")
    parser.add_argument("--keep", type=Path, help="workspace folder to use and keep (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not 0 <= args.fold < args.n_splits:
        parser.error(f"--fold {args.fold} is not one of the {args.n_splits} folds")
    if any(m <= 0 for m in args.minutes) or args.threads < 1:
        parser.error("--minutes must be > 0 and --threads >= 1")
    return args


# ---------------------------------------------------------------------------------------------------------
# The pipeline's side: a DVC workspace driven through its own stages


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Set the workspace up, build masks and folds once, then run every budget; returns the results."""
    data_dir = args.data_dir.resolve()
    models = "first" if args.model is None else [args.model]
    raw = complete(yaml.safe_load(args.params.read_text()) or {})
    params = workspace_params(raw, data_dir, [args.fold], args.n_splits, models, source=str(args.params))
    (model,) = params["models"]
    make_workspace(work)
    env = subprocess_env(args.threads)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    dvc_log = logs / "dvc.log"
    print(f"workspace {work}; dvc output streams to {dvc_log}")
    print(
        f"scoring: both recipes at each image's native size (workspace params: submission.size = null); "
        f"pipeline: model recipe '{model}' alone; fold {args.fold} of {args.n_splits} held out; "
        f"{args.threads} torch thread(s) each, side by side"
    )
    write_params(work, params)
    for stage in DATA_STAGES:
        seconds = dvc(work, ["repro", "-s", stage], env, dvc_log)
        print(f"  {stage}: {seconds:.0f} s")

    results: dict[str, Any] = {
        "data": str(data_dir),
        "params": str(args.params),
        "model": model,
        "fold": args.fold,
        "n_splits": args.n_splits,
        "threads": args.threads,
        "submission_size": None,
        "budgets": [],
    }
    seconds_per_epoch = calibrate(work, params, model, args.fold, env)
    results["calibration"] = {"pipeline_seconds_per_epoch": seconds_per_epoch}
    for minutes in args.minutes:
        budget = run_budget(work, params, model, args.fold, minutes, seconds_per_epoch, env)
        results["budgets"].append(budget)
        print_table(budget)
    return results


def calibrate(work: Path, params: dict[str, Any], model: str, fold: int, env: dict[str, str]) -> float:
    """Seconds one more epoch adds to the pipeline's train stage: runs of 1 and 1 + N epochs, N = the
    recipe's train.val_every, (difference) / N.

    The difference leaves out what does not grow with epochs (start-up, reading the data, writing the
    metrics) and keeps what does (training, and one validation per N epochs). The plain loop trains
    alongside, so the figure is taken under the same two-process load as the real runs.
    """
    n = checked(params, "workspace params").recipe(model).train.val_every
    stage = train_stage_name(model, fold)
    print(f"calibrating: the pipeline's {stage} stage at 1 and {1 + n} epochs, the plain loop alongside")
    with plain_loop(work, fold, math.inf, 2 + n, False, env, work / "logs" / "plain-calibration") as plain:
        one = train_stage(work, params, model, fold, 1, env)
        more = train_stage(work, params, model, fold, 1 + n, env)
    per_epoch = max((more - one) / n, 1.0)
    print(
        f"  pipeline {stage} stage: {one:.1f} s at 1 epoch, {more:.1f} s at {1 + n} -> "
        f"{per_epoch:.1f} s per epoch; plain loop: {plain['train_seconds'] / plain['epochs']:.1f} s per epoch"
    )
    return per_epoch


def run_budget(
    work: Path,
    params: dict[str, Any],
    model: str,
    fold: int,
    minutes: float,
    seconds_per_epoch: float,
    env: dict[str, str],
) -> dict:
    """Train and score both recipes side by side for `minutes` of training wall clock.

    The pipeline gets floor(budget / seconds per epoch) epochs (its cosine schedule needs the count up
    front); the plain loop trains until its next epoch would pass the budget.
    """
    budget_s = minutes * 60
    tag = f"{minutes:g}min"
    logs = work / "logs"
    epochs = max(1, math.floor(budget_s / seconds_per_epoch))
    print(f"budget {minutes:g} min: pipeline {epochs} epochs; training both ({logs / 'dvc.log'}, ", end="")
    print(f"{logs / f'plain-{tag}.log'})")
    with plain_loop(work, fold, budget_s, None, True, env, logs / f"plain-{tag}") as plain_result:
        train_s = train_stage(work, params, model, fold, epochs, env)
        dvc(work, ["repro", "leaderboard"], env, logs / "dvc.log")
    pipeline_result = {
        "train_minutes": train_s / 60,
        "loop_minutes": epochs * seconds_per_epoch / 60,
        "epochs": epochs,
        **pipeline_score(work),
    }
    plain_result["train_minutes"] = plain_result.pop("train_seconds") / 60
    return {
        "minutes": minutes,
        "pipeline": pipeline_result,
        "plain": plain_result,
        "ratio": _ratio(pipeline_result["miou"], plain_result["miou"]),
    }


def checked(params: dict[str, Any], source: str) -> Params:
    """`params` as the stages will read them; a mistake in them exits with the config's message."""
    try:
        return params_from_dict(params, source)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


def workspace_params(
    raw: dict[str, Any],
    data_dir: Path,
    folds: list[int],
    n_splits: int,
    models: str | list[str] = "first",
    source: str = "params",
) -> dict[str, Any]:
    """The workspace's params: `raw` (a params file's contents) with data.* at `data_dir`, split.n_splits
    = `n_splits`, ensemble.folds = `folds`, a native-size submission, and `models` cut down to the
    recipes named: a list of names, "first" (the first `raw` defines; "model" where it has no `models`
    section) or "all".

    The kept recipes lose any train.epochs of their own, so the shared train.epochs (`with_epochs`) is
    what every one trains. Exits with the config's message if the result is not valid params.
    """
    params = copy.deepcopy(raw)
    params.setdefault("data", {}).update(
        root=str(data_dir),
        train_json=str(data_dir / "train.json"),
        test_json=str(data_dir / "test.json"),
        test_truth_json=str(data_dir / "test_truth.json"),
    )
    params.setdefault("split", {})["n_splits"] = n_splits
    params.setdefault("ensemble", {})["folds"] = list(folds)
    params.setdefault("submission", {})["size"] = None  # score at each image's own size, like the plain loop
    overrides = params.get("models", {"model": {}})  # config's default: one recipe of the shared sections
    if not isinstance(overrides, dict) or not overrides:
        checked(params, source)  # exits with the config's message
        raise SystemExit(f"error: {source}: 'models' must map recipe names to their settings")
    defined = list(overrides)
    keep = {"first": defined[:1], "all": defined}[models] if isinstance(models, str) else models
    unknown = [name for name in keep if name not in defined]
    if unknown:
        raise SystemExit(f"error: {source}: no model recipe '{unknown[0]}' (defined: {', '.join(defined)})")
    params["models"] = {}
    for name in keep:
        override = copy.deepcopy(overrides.get(name) or {})
        if (
            isinstance(override, dict)
            and isinstance(override.get("train"), dict)
            and "epochs" in override["train"]
        ):
            print(f"note: models.{name}.train.epochs dropped: the benchmark sets train.epochs")
            del override["train"]["epochs"]
        params["models"][name] = override
    checked(params, source)
    return params


def with_epochs(params: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A copy of workspace params with the shared train.epochs = `epochs` (every recipe's, see above)."""
    return {**params, "train": {**params.get("train", {}), "epochs": epochs}}


def train_stage_name(model: str, fold: int) -> str:
    """The train stage of (model recipe, fold) in dvc.yaml's matrix."""
    return f"train@{model}-{fold}"


def make_workspace(work: Path) -> None:
    """Copy the repository's dvc.yaml, pipeline/ and stages/ into `work` and make it a DVC project."""
    for name in COPIED:
        src, dst = REPO / name, work / name
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    if not (work / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, check=True)


def write_params(work: Path, params: dict[str, Any]) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def subprocess_env(threads: int) -> dict[str, str]:
    """Environment of the stages and the plain loop: this venv first, `threads` threads, no GPU."""
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",  # the same cores for both: a CPU benchmark even where a GPU is present
        NO_ALBUMENTATIONS_UPDATE="1",
        DVC_NO_ANALYTICS="1",
    )


def dvc(work: Path, args: list[str], env: dict[str, str], log: Path) -> float:
    """Run `dvc ARGS` in `work`, appending its output to `log`; its wall seconds. Exits on failure."""
    # The stages import `pipeline` from the workspace's own copy, not from the editable install (this
    # checkout), which may change while a long benchmark runs.
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(work), env.get("PYTHONPATH")])))
    with log.open("a") as handle:
        handle.write(f"\n$ dvc {' '.join(args)}\n")
        handle.flush()
        start = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
        seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"dvc {' '.join(args)} failed (exit {code}); end of {log}:\n{tail}")
    return seconds


def train_stage(
    work: Path, params: dict[str, Any], model: str, fold: int, epochs: int, env: dict[str, str]
) -> float:
    """Wall seconds of `dvc repro -s -f train@model-fold` with train.epochs = `epochs`, from scratch."""
    write_params(work, with_epochs(params, epochs))
    # The model dir persists for resuming: without it a run whose fingerprint matches would not train.
    shutil.rmtree(work / "models" / model / f"fold{fold}", ignore_errors=True)
    stage = train_stage_name(model, fold)
    return dvc(work, ["repro", "-s", "-f", stage], env, work / "logs" / "dvc.log")


def pipeline_score(work: Path) -> dict[str, Any]:
    """mIoU and per-class IoU of the leaderboard stage (its report, `reports/leaderboard.json`)."""
    path = work / "reports" / "leaderboard.json"
    board = json.loads(path.read_text())
    if board.get("miou") is None:
        raise SystemExit(f"{path}: not scored ({board.get('reason')})")
    return {"miou": board["miou"], "iou": board["iou"]}


# ---------------------------------------------------------------------------------------------------------
# The plain loop: run in its own process (`--plain-loop`), so both recipes progress on separate cores


@contextlib.contextmanager
def plain_loop(
    work: Path,
    fold: int,
    budget_s: float,
    max_epochs: int | None,
    score: bool,
    env: dict[str, str],
    stem: Path,
    seed: int = PLAIN_SEED,
) -> Iterator[dict[str, Any]]:
    """Run the plain loop in its own process while the `with` block runs; the dict it yields is filled
    with its results when the block ends (after waiting for it). Progress goes to `stem`.log.

    If the block raises, the process is killed.
    """
    args = ["--workspace", str(work), "--fold", str(fold), "--budget-seconds", str(budget_s)]
    args += ["--threads", env["OMP_NUM_THREADS"], "--out", f"{stem}.json", "--seed", str(seed)]
    args += ["--max-epochs", str(max_epochs)] if max_epochs is not None else []
    args += [] if score else ["--no-score"]
    Path(f"{stem}.json").unlink(missing_ok=True)
    result: dict[str, Any] = {}
    with open(f"{stem}.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--plain-loop", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield result
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.wait() != 0:
        tail = "".join(Path(f"{stem}.log").read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the plain loop failed (exit {process.returncode}); end of {stem}.log:\n{tail}")
    result.update(json.loads(Path(f"{stem}.json").read_text()))


def plain_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="internal: the plain loop of bench/recipe.py")
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--budget-seconds", type=float, required=True)
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=PLAIN_SEED, help="weights, order and flips")
    parser.add_argument("--no-score", action="store_true", help="train only (calibration)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    data = load_params(args.workspace / "params.yaml").data

    # The training images, classes, folds and masks the stages wrote, as the train stage reads them.
    manifest_path = args.workspace / "data" / "manifest.json"
    manifest = read_manifest(manifest_path)
    folds = read_folds(args.workspace / "data" / "folds.csv", manifest.train_names(), manifest_path)
    images = [image for image in manifest.train if folds[image.file_name] != args.fold]
    masks = args.workspace / "data" / "masks"
    x = torch.stack([to_input(read_image(image_path(data.root, im.file_name))) for im in images])
    y = torch.stack([to_target(read_mask(masks / mask_relpath(im.file_name))) for im in images])
    n_classes = manifest.n_classes
    print(f"plain loop: {len(images)} training images (fold != {args.fold}), {n_classes} classes")
    model, epochs, seconds = plain_train(x, y, n_classes, args.budget_seconds, args.max_epochs, args.seed)
    result: dict[str, Any] = {"epochs": epochs, "train_seconds": seconds, "seed": args.seed}
    if not args.no_score:
        # The test truth with the training json's classes, loaded as the leaderboard stage loads it.
        truth = coco.load_with_training_classes(
            data.test_truth_json, data.train_json, data.root, data.on_bad_annotation, data.unused_categories
        )
        if truth.classes != manifest.classes:
            raise SystemExit(
                f"{data.test_truth_json}: classes {truth.classes} differ from {manifest.classes}"
            )
        cm = plain_confusion(model, truth, data.overlap)
        iou = metrics.iou_per_class(cm).tolist()
        result |= {"miou": metrics.mean_iou(cm), "iou": dict(zip(truth.classes, iou, strict=True))}
    write_json(args.out, result)


def to_input(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 HxWx3 -> ImageNet-normalised float (3, PLAIN_SIZE, PLAIN_SIZE)."""
    small = cv2.resize(image, (PLAIN_SIZE, PLAIN_SIZE), interpolation=cv2.INTER_LINEAR)
    normalised = ((small / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    return torch.from_numpy(normalised).permute(2, 0, 1)


def to_target(mask: np.ndarray) -> torch.Tensor:
    """Class-index uint8 HxW -> int64 (PLAIN_SIZE, PLAIN_SIZE), nearest neighbour."""
    small = cv2.resize(mask, (PLAIN_SIZE, PLAIN_SIZE), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(small).long()


def plain_train(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    budget_s: float,
    max_epochs: int | None,
    seed: int = PLAIN_SEED,
) -> tuple[torch.nn.Module, int, float]:
    """Unet/ResNet-18 from scratch: Adam 1e-3, cross-entropy, horizontal flips, batch 8, seeded shuffle.

    x: float (N, 3, S, S), y: int64 (N, S, S). Trains whole epochs until the next one would end past
    `budget_s` (at least one; at most `max_epochs`). Returns (model, epochs, training seconds).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = smp.Unet("resnet18", encoder_weights=None, classes=n_classes).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=PLAIN_LR)
    start, last, epochs = time.perf_counter(), 0.0, 0
    bar = tqdm(desc="plain loop", unit="epoch", file=sys.stdout, mininterval=0)
    while epochs == 0 or (
        time.perf_counter() - start + last <= budget_s and (max_epochs is None or epochs < max_epochs)
    ):
        epoch_start = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(x)))
        for batch in order.split(PLAIN_BATCH):
            images, masks = x[batch], y[batch]
            flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
            loss = F.cross_entropy(model(images), masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        last, epochs = time.perf_counter() - epoch_start, epochs + 1
        bar.set_postfix(loss=f"{loss.item():.3f}", elapsed=f"{time.perf_counter() - start:.0f}s")
        bar.update()
    bar.close()
    return model, epochs, time.perf_counter() - start


@torch.no_grad()
def plain_confusion(model: torch.nn.Module, truth: records.CocoSet, overlap: records.Overlap) -> np.ndarray:
    """Dataset confusion matrix of the model on `truth`'s images: predicted at PLAIN_SIZE, logits
    upsampled bilinearly to each image's own size, against the truth rasterized at that size."""
    model.eval()
    cm = np.zeros((truth.n_classes, truth.n_classes), dtype=np.int64)
    for image in tqdm(truth.images, desc="plain predict", unit="img", file=sys.stdout):
        pixels = read_image(truth.image_file(image), (image.height, image.width))
        logits = model(to_input(pixels)[None])
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy().astype(np.uint8)
        cm += metrics.confusion_matrix(coco.rasterize(truth, image, overlap), pred, truth.n_classes)
    return cm


# ---------------------------------------------------------------------------------------------------------
# Output


def print_table(budget: dict[str, Any]) -> None:
    """One budget's results: a row per recipe with its per-class IoU, then the ratio."""
    classes = list(budget["pipeline"]["iou"])
    classes += [name for name in budget["plain"]["iou"] if name not in classes]
    widths = [max(len(name), 5) for name in classes]
    head = f"{'recipe':<9} {'train min':>9} {'epochs':>6} {'test mIoU':>9}  "
    print(f"\nbudget {budget['minutes']:g} min (per-class IoU; '-' = class absent from truth and prediction)")
    print(head + "  ".join(f"{name:>{w}}" for name, w in zip(classes, widths, strict=True)))
    for recipe in ("pipeline", "plain"):
        row = budget[recipe]
        cells = [_fmt(row["iou"].get(name), w) for name, w in zip(classes, widths, strict=True)]
        print(
            f"{recipe:<9} {row['train_minutes']:>9.2f} {row['epochs']:>6d} {row['miou']:>9.3f}  "
            + "  ".join(cells)
        )
    print(
        "train min: pipeline = wall of `dvc repro -s train@M-k` (start-up and validation included; "
        f"its epochs alone: {budget['pipeline']['loop_minutes']:.2f} min); plain = its epochs only"
    )
    print(f"ratio pipeline/plain: {budget['ratio']:.3f}\n")


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None or value != value else f"{value:>{width}.3f}"


def _ratio(pipeline: float, plain: float) -> float:
    return pipeline / plain if plain > 0 else math.nan


if __name__ == "__main__":
    main()
