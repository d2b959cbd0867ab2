"""Benchmark: the predict stage's peak memory on N vs 4N test images, and its TTA + ensembling throughput.

Memory: runs `stages/predict.py` in a child process on the first N and then all 4N demo test images
(an ensemble of --members models x --folds folds, one randomly initialised checkpoint copied into
every (model, fold), merged with equal fitted weights) and reads the child's peak RSS after its
imports and at the end. Prediction streams batch by batch, so the 4N run should peak no higher than
the N run: target ratio <= 1.15 (total peak RSS). The growth above the imports' baseline is printed
too, next to what keeping every image's probabilities would have added.

Throughput: images/s of the predict stage's own path, `infer.predict_members` (every member's folds
with TTA, probabilities merged with the fitted weights) and the argmax at the submission size, against
a bare forward + argmax of one model, on the same 2N images in one process, both reading them through
the inference loader (decoding included in both). The slowdown is printed next to the forward-pass
count members x folds x TTA implies; their quotient is the cost of the merging itself. Other processes
competing for the CPU skew these timings; run it on an idle machine.

    python bench/predict.py [--images 8] [--image-size 256] [--input-size 128] [--out-size 256]
                            [--members 2] [--folds 2] [--tta flips] [--batch-size 8] [--repeats 3]
                            [--workdir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from harness import predict_stage_rss
from pipeline.config import AugmentParams, DemoParams, ModelParams, complete
from pipeline.data import coco
from pipeline.data.demo import generate_demo
from pipeline.data.loaders import ImageDataset, build_inference_loader
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.ensemble.fit import FittedWeights, write_weights
from pipeline.inference import infer
from pipeline.models.checkpoints import checkpoint_state, save_checkpoint
from pipeline.models.factory import build_model

TARGET_RSS_RATIO = 1.15


def make_project(work: Path, args: argparse.Namespace) -> dict[str, list[Path]]:
    """Demo test images, manifests of N and 4N test images, (model, fold) checkpoints, fitted weights and
    params.yaml; -> every member's checkpoints, by member."""
    demo = DemoParams(n_train=1, n_test=4 * args.images, image_size=args.image_size, max_objects=4)
    generate_demo(work / "data", demo)
    test = coco.load_coco(work / "data/test.json")
    classes = test.classes
    for n in (args.images, 4 * args.images):
        manifest = Manifest(
            classes, test.category_ids, [], np.zeros((0, len(classes)), bool), test.images[:n], {}
        )
        write_manifest(work / f"data/manifest_{n}.json", manifest)
    model_params = ModelParams(arch="Unet", encoder=args.encoder, decoder_channels=[128, 64, 32, 16, 8])
    state = checkpoint_state(
        build_model(model_params, len(classes)),
        model_params,
        classes,
        AugmentParams(size=args.input_size, hflip=0.5, vflip=0.5, rot90=0.5),  # every TTA allowed
        0,
        0.0,
        0,
    )
    members = [f"m{i}" for i in range(args.members)]
    for name in members:
        for k in range(args.folds):
            save_checkpoint(work / f"models/{name}/fold{k}/best.pt", state)
    weights = [[1.0 / len(members)] * len(classes) for _ in members]
    write_weights(work / "weights.json", FittedWeights(members, list(range(args.folds)), classes, weights))
    params = {
        "split": {"n_splits": max(2, args.folds)},
        "ensemble": {"folds": list(range(args.folds))},
        "predict": {"tta": args.tta, "batch_size": args.batch_size, "num_workers": 0},
        "submission": {"format": "rle", "size": args.out_size},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(complete(params), sort_keys=False))
    return {name: [work / f"models/{name}/fold{k}/best.pt" for k in range(args.folds)] for name in members}


def stage_peak_rss(work: Path, n: int) -> tuple[int, int]:
    """(peak RSS after imports, peak RSS of the whole run), in bytes, of `stages/predict.py` on `n` images."""
    flags = {
        "--models": "models",
        "--weights": "weights.json",
        "--root": "data",
        "--manifest": f"data/manifest_{n}.json",
        "--out": f"sub_{n}.csv",
        "--probabilities": f"probabilities_{n}.npz",
        "--refits": "refits",
    }
    args = [part for flag in flags.items() for part in flag]
    return predict_stage_rss(work, args, work / f"predict_{n}.log")


def median_seconds(runs: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median wall time of each of `runs` over `repeats` rounds, after one warm-up call of each.

    The runs alternate within a round, so a slow spell of the machine slows all of them alike.
    """
    for run in runs:
        run()  # warm-up: oneDNN kernels and allocator pools are set up on first use
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def throughput(
    work: Path, checkpoints: dict[str, list[Path]], args: argparse.Namespace
) -> tuple[float, float]:
    """(bare, predict stage) images per second on the same 2N images."""
    members = [
        infer.Member(name, folds, args.tta)
        for name, folds in ((name, infer.load_ensemble(paths)) for name, paths in checkpoints.items())
    ]
    classes = members[0].folds.classes
    weights = torch.full((len(members), len(classes)), 1.0 / len(members))
    records = coco.load_coco(work / "data/test.json").images[: 2 * args.images]
    data = ImageDataset(work / "data", records, members[0].folds.geometry)
    model = members[0].folds.models[0]
    cpu = torch.device("cpu")

    def bare() -> None:
        with torch.inference_mode():
            for batch in build_inference_loader(data, args.batch_size, 0):
                model(batch.images).argmax(1)

    def stage() -> None:
        stream = infer.predict_members(
            members, weights, work / "data", records, [1.0], args.batch_size, 0, cpu
        )
        for index, probs in stream:
            infer.probabilities_to_mask(probs, infer.output_shape(records[index], args.out_size))

    bare_s, stage_s = median_seconds([bare, stage], args.repeats)
    return len(data) / bare_s, len(data) / stage_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8, help="N: the small run's test images (large: 4N)")
    parser.add_argument("--image-size", type=int, default=256, help="demo photo size (px)")
    parser.add_argument("--input-size", type=int, default=128, help="the checkpoint's model input size")
    parser.add_argument("--out-size", type=int, default=256, help="submission mask size")
    parser.add_argument("--members", type=int, default=2, help="models (recipes) in the ensemble")
    parser.add_argument("--folds", type=int, default=2, help="fold checkpoints of each model")
    parser.add_argument("--tta", choices=list(infer.TTA_TRANSFORMS), default="flips")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is kept)")
    parser.add_argument("--workdir", type=Path, help="keep the generated project here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        work = args.workdir or Path(tmp)
        checkpoints = make_project(work, args)
        sizes = (args.images, 4 * args.images)
        runs = {n: [stage_peak_rss(work, n) for _ in range(args.repeats)] for n in sizes}
        bare, full = throughput(work, checkpoints, args)
    imports = statistics.median(first for n in sizes for first, _ in runs[n])
    peaks = {n: statistics.median(peak for _, peak in runs[n]) for n in sizes}
    print(report(args, imports, peaks, bare, full))


def report(
    args: argparse.Namespace, imports: float, peaks: dict[int, float], bare: float, full: float
) -> str:
    mb = 2**20
    small, large = sorted(peaks)
    n_classes = 11  # the demo's 10 classes + background
    kept = (large - small) * n_classes * args.out_size**2 * 4  # float32 probabilities of the extra images
    ratio = peaks[large] / peaks[small]
    above = {n: (peaks[n] - imports) / mb for n in peaks}
    passes = len(infer.build_tta(args.tta)) * args.folds * args.members
    status = "OK" if ratio <= TARGET_RSS_RATIO else "ABOVE TARGET"
    lines = [
        f"predict stage: {args.members} models x {args.folds} folds ({passes} passes per image), "
        f"tta {args.tta}, {args.image_size} px photos, "
        f"{args.input_size} px model input, {args.out_size} px masks, batch {args.batch_size}; "
        f"medians of {args.repeats} runs",
        f"  peak RSS after imports     {imports / mb:8.1f} MB",
        *(
            f"  peak RSS, {n:4d} images    {peaks[n] / mb:8.1f} MB  ({above[n]:.1f} MB above imports)"
            for n in peaks
        ),
        f"  (keeping the {large - small} extra images' probabilities would add {kept / mb:.0f} MB)",
        f"  peak RSS ratio 4N/N {ratio:.3f}  target <= {TARGET_RSS_RATIO}  {status}"
        + (f"  (above imports: {above[large] / above[small]:.3f})" if above[small] > 0 else ""),
        f"  bare forward, 1 model      {bare:8.1f} images/s",
        f"  predict stage path, {passes} passes {full:8.1f} images/s",
        f"  slowdown {bare / full:.2f}x for {passes} forward passes per image "
        f"(merging and resizing: {bare / full / passes:.2f}x)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
