"""Benchmark: GPU training img/s fed by the real data loader vs the same model fed from GPU memory.

Trains one model recipe of the competition config (configs/trash.yaml; --model, default its first
recipe: 512 px, bf16 autocast where supported, channels_last, the recipe's arch and encoder with random
init) through `pipeline.training.train.train_one_epoch`, alternating per repeat:
  real       one loader for all passes, as `fit` keeps one for the run (runtime.num_workers persistent
             workers, set_epoch per pass): demo JPEGs generated at --size, their masks, the recipe's
             full training augmentation with rare-class elastic, oversampling, pinned memory and
             non-blocking copies;
  synthetic  one random batch already on the GPU, so the loader costs nothing.
A pass is one competition fold's epoch by default (2,617 training images x 4/5). Prints the median img/s
of each, the workers' start-up (time to the first batch of the first pass, not in the medians) and
real / synthetic (target >= 0.9: the loader keeps the GPU fed).

    python bench/train_gpu.py                   # exits 0 with a message when there is no CUDA device
    python bench/train_gpu.py --steps 100 --workers 12 --batch-size 16 --compile
    python bench/train_gpu.py --model segformer  # another recipe of configs/trash.yaml's `models`
    python bench/train_gpu.py --device cpu --arch Unet --encoder resnet18 --size 64 --steps 2  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness import demo_training_data
from pipeline.config import Params, Recipe, TrainParams, load_overlay
from pipeline.errors import run_main
from pipeline.models.losses import build_loss
from pipeline.training.dataset import SegmentationDataset, build_train_loader
from pipeline.training.fold_data import training_set
from pipeline.training.runtime import Runtime, setup_runtime
from pipeline.training.state import TrainState, build_train_state
from pipeline.training.train import train_one_epoch

TARGET_RATIO = 0.9
EPOCH_IMAGES = 2617 * 4 // 5  # one fold's training images in the competition (5 folds)
WARMUP_STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/trash.yaml"), help="params to train")
    parser.add_argument("--model", help="the recipe of the config's `models` to train (default: the first)")
    parser.add_argument("--arch", help="override the recipe's model.arch")
    parser.add_argument("--encoder", help="override the recipe's model.encoder")
    parser.add_argument("--size", type=int, help="override the recipe's augment.size (and the demo images')")
    parser.add_argument("--batch-size", type=int, help="override the recipe's train.batch_size")
    parser.add_argument("--workers", type=int, help="override runtime.num_workers (loader workers)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    parser.add_argument("--steps", type=int, help=f"batches per timed pass (default: {EPOCH_IMAGES} images)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each kind (median)")
    parser.add_argument("--images", type=int, default=64, help="demo images to generate and cycle through")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the benchmark runs (no target)"
    )
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine")
        return
    recipe, workers = bench_recipe(load_overlay(args.config), args)
    runtime = setup_runtime(recipe.train, workers, device=args.device)
    train = recipe.train
    steps = train.max_batches
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{device_name}: recipe {recipe.name}, {recipe.model.arch}/{recipe.model.encoder}, "
        f"{recipe.augment.size} px, batch {train.batch_size}, {workers} workers, "
        f"amp {runtime.amp_dtype}, channels_last {runtime.channels_last}, compile {train.compile}, "
        f"{steps} steps per pass"
    )

    with tempfile.TemporaryDirectory() as tmp:
        dataset, weights, n_classes = demo_dataset(Path(tmp), recipe, args.images, steps * train.batch_size)
        state = build_train_state(
            recipe.model, recipe.train, n_classes, runtime, total_steps=10**6, resume=None
        )
        loss_fn = build_loss(train.losses, train.class_weights).to(runtime.device)
        synthetic = synthetic_batches(runtime, train.batch_size, recipe.augment.size, n_classes, steps)

        pin = runtime.device.type == "cuda"
        loader = FirstBatchTimer(
            build_train_loader(dataset, train.batch_size, workers, weights, seed=0, pin_memory=pin)
        )

        # Warm-up: cuDNN autotuning (and compilation), the workers' start, and the images into the page
        # cache, as after epoch 1 of a run.
        warmup = train.model_copy(update=dict(max_batches=min(WARMUP_STEPS, steps)))
        timed_pass(state, synthetic, loss_fn, runtime, warmup, "warm-up synthetic")
        timed_pass(state, loader, loss_fn, runtime, warmup, "warm-up real")
        startup = loader.first_batch_at - loader.started_at
        real, fake = [], []
        for repeat in range(args.repeats):
            loader.loader.sampler.set_epoch(repeat + 1)
            real.append(timed_pass(state, loader, loss_fn, runtime, train, "real"))
            fake.append(timed_pass(state, synthetic, loss_fn, runtime, train, "synthetic"))

    images = steps * train.batch_size
    real_rate, fake_rate = images / statistics.median(real), images / statistics.median(fake)
    ratio = real_rate / fake_rate
    print(f"real loader:     {real_rate:8.1f} img/s  (median of {args.repeats} passes of {images} images)")
    print(f"  workers' start-up (first batch of the first pass, once per run): {startup:.2f} s")
    print(f"synthetic ({args.device}):  {fake_rate:8.1f} img/s")
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    if args.device == "cpu":
        verdict = "not judged: the target is for a GPU"
    print(f"real / synthetic = {ratio:.3f} (target >= {TARGET_RATIO}): {verdict}")


class FirstBatchTimer:
    """A loader wrapper that notes when iteration started and when the first batch arrived."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.started_at = self.first_batch_at = float("nan")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.started_at = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.first_batch_at = time.perf_counter()
            yield batch


def bench_recipe(params: Params, args: argparse.Namespace) -> tuple[Recipe, int]:
    """(the recipe --model names, or the config's first, with the command line's overrides; the loader
    workers: runtime.num_workers or --workers). No pretrained weights (encoder or whole-model) are loaded."""
    recipe = params.recipe(args.model or next(iter(params.models)))
    model = recipe.model.model_copy(
        update=dict(
            arch=args.arch or recipe.model.arch,
            encoder=args.encoder or recipe.model.encoder,
            encoder_weights=None,
            from_pretrained=None,
        )
    )
    aug = recipe.augment.model_copy(update=dict(size=args.size or recipe.augment.size))
    train = recipe.train.model_copy(
        update=dict(
            batch_size=args.batch_size or recipe.train.batch_size,
            compile=args.compile or recipe.train.compile,
        )
    )
    train = train.model_copy(update=dict(max_batches=args.steps or max(1, EPOCH_IMAGES // train.batch_size)))
    workers = params.runtime.num_workers if args.workers is None else args.workers
    return recipe.model_copy(update=dict(model=model, augment=aug, train=train)), workers


def demo_dataset(
    root: Path, recipe: Recipe, n_images: int, length: int
) -> tuple[SegmentationDataset, np.ndarray | None, int]:
    """Demo images and masks at the training size, as the training Dataset of `fit`, cycled to `length`.

    Returns (dataset, per-item oversampling weights or None, number of classes).
    """
    names, presence = demo_training_data(root, n_images, recipe.augment.size)
    cycle = [i % len(names) for i in range(length)]
    dataset, weights = training_set(
        recipe.augment, root / "demo", [names[i] for i in cycle], root / "masks", presence[cycle]
    )
    return dataset, weights, presence.shape[1]


def synthetic_batches(
    runtime: Runtime, batch_size: int, size: int, n_classes: int, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` references to one random (images, masks) batch, already on the device in the model's layout."""
    images = runtime.to_device(torch.randn(batch_size, 3, size, size))
    masks = torch.randint(0, n_classes, (batch_size, size, size), device=runtime.device)
    return [(images, masks)] * steps


def timed_pass(
    state: TrainState,
    batches: Iterable,
    loss_fn: torch.nn.Module,
    runtime: Runtime,
    train: TrainParams,
    desc: str,
) -> float:
    """Seconds for one `train_one_epoch` over `batches` (it ends in a host sync, so the GPU is done)."""
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_one_epoch(state, batches, loss_fn, runtime, train, desc)
    return time.perf_counter() - start


if __name__ == "__main__":
    run_main(main)
