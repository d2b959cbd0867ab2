"""The two sides bench/realsets.py compares: the pipeline's stages in a DVC workspace and a plain loop.

The pipeline side is a workspace (dvc.yaml, pipeline/, stages/ copied) whose train stage runs for a set
number of epochs; the plain side (`--plain-loop`, its own process) trains smp's Unet/ResNet-18 from scratch
at 128 px (Adam 1e-3, cross-entropy, horizontal flips) on the same fold split and masks until its next epoch
would pass the budget, then predicts the test set upsampled to each image's size. Both are scored by one
dataset-level confusion matrix at native size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
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
from pipeline.config import Params, load_params, params_from_dict
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


def main() -> None:
    if sys.argv[1:2] != ["--plain-loop"]:
        raise SystemExit(
            "bench/recipe.py holds the plain loop and workspace helpers of bench/realsets.py; to compare a "
            "recipe with the plain loop: python bench/realsets.py --recipe NAME=PARAMS --sets DATA"
        )
    plain_main(sys.argv[2:])


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


if __name__ == "__main__":
    main()
