"""Benchmark: parameter count and forward/backward time of UNet3Plus vs smp's Unet and UnetPlusPlus at 512 px.

Every model is built as trashseg builds it (models.factory.build_model: the arch, --encoder with random
init, --classes logits, model.options), on the CPU with --threads torch threads. Variants: smp's Unet and
UnetPlusPlus (trashseg's, which without deep supervision is smp's), UnetPlusPlus with deep supervision,
UNet3Plus, and UNet3Plus with deep supervision and the classification-guided module. Figures are medians
over --repeats, the models taking turns within each repeat:
  forward           eval mode under no_grad, what prediction costs (side outputs and the CGM's presence
                    head are training-only, so they cost nothing here; the CGM gate's head would);
  forward+backward  train mode, cross-entropy on the logits and every side output (+ BCE on the presence
                    logits), then backward: a training step less the optimizer.
The ratios are to Unet's.

    python bench/architectures.py                            # resnet34, 512 px, batch 2, 5 repeats
    python bench/architectures.py --threads 1 --repeats 3
    python bench/architectures.py --size 64 --repeats 1 --encoder resnet18  # smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness import median_seconds
from pipeline.config import ModelParams
from pipeline.errors import run_main
from pipeline.models.factory import build_model

# (row label, model.arch, model.options); the first is the baseline of the ratios.
VARIANTS: list[tuple[str, str, dict[str, bool]]] = [
    ("Unet", "Unet", {}),
    ("UnetPlusPlus", "UnetPlusPlus", {}),
    ("UnetPlusPlus +ds", "UnetPlusPlus", {"deep_supervision": True}),
    ("UNet3Plus", "UNet3Plus", {}),
    ("UNet3Plus +ds +cgm", "UNet3Plus", {"deep_supervision": True, "cgm": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="input height and width (px)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model (median taken)")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument(
        "--classes", type=int, default=11, help="logit maps (the competition's 10 + background)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    target = torch.randint(0, args.classes, (args.batch_size, args.size, args.size))
    base = ModelParams(encoder=args.encoder, encoder_weights=None)
    models = {
        label: build_model(base.model_copy(update=dict(arch=arch, options=options)), args.classes)
        for label, arch, options in VARIANTS
    }
    forward = median_seconds({label: _forward(model, x) for label, model in models.items()}, args.repeats)
    step = median_seconds({label: _step(model, x, target) for label, model in models.items()}, args.repeats)

    print(
        f"{args.encoder}, {args.size}x{args.size} px, batch {args.batch_size}, {args.classes} classes, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"  {'':20} {'params (M)':>10} {'forward ms':>11} {'x Unet':>7} {'fwd+bwd ms':>11} {'x Unet':>7}")
    baseline = VARIANTS[0][0]
    for label, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fwd, fwd_bwd = forward[label], step[label]
        print(
            f"  {label:20} {params:10.2f} {fwd * 1e3:11.0f} {fwd / forward[baseline]:7.2f}"
            f" {fwd_bwd * 1e3:11.0f} {fwd_bwd / step[baseline]:7.2f}"
        )
    print(f"UNet3Plus / Unet forward+backward: {step['UNet3Plus'] / step[baseline]:.2f}x")


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x)
        if isinstance(out, torch.Tensor):
            out = {"logits": out, "side": []}
        loss = sum(F.cross_entropy(logits, target) for logits in [out["logits"], *out["side"]])
        if "presence" in out:
            present = F.one_hot(target.flatten(1), out["presence"].shape[1]).amax(1).float()
            loss = loss + F.binary_cross_entropy_with_logits(out["presence"], present)
        loss.backward()

    return run


if __name__ == "__main__":
    run_main(main)
